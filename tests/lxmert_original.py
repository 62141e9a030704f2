"""Independent writer of checkpoints in the layout of LXMERT's original release, and a forward
pass of the original architecture over such a checkpoint.

Built by reading airsplay/lxmert, sharing no code with it (and none with ``vl_prune``):

- ``src/lxrt/modeling.py``: the module names of ``LXRTPretraining`` (the backbone ``bert``, an
  ``LXRTModel``; the heads ``cls``, ``obj_predict_head``, ``answer_head``), the sizes of the
  heads (``VisualConfig.visual_loss_config``), and the math that :func:`original_forward`
  re-implements: BERT embeddings, BERT layers for language and for object relationships, the
  visual feature encoder, cross-modality layers, the pooler;
- ``src/pretrain/lxmert_pretrain.py``: ``Epoch20_LXRT.pth`` is ``state_dict()`` of the
  pre-training model inside ``nn.DataParallel`` (every key behind ``module.``), trained with
  the visual losses ``obj,attr,feat`` and the 9500 answers of ``data/lxmert/all_ans.json``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

PARALLEL, BACKBONE = "module.", "bert."
# VisualConfig.visual_loss_config: object classes, attribute classes, feature regression width
# (2048 whatever the features' width), and the pre-training answer table's size.
VISUAL_LOSSES = {"obj": 1600, "attr": 400, "feat": 2048}
ANSWERS = 9500
EPS = 1e-12  # every BertLayerNorm of the original
MASKED = -10000.0  # what the original adds to the scores of padding


def write_original_lxmert(
    path: Path,
    *,
    hidden: int = 128,
    heads: int = 4,
    intermediate: int = 256,
    l_layers: int = 2,
    x_layers: int = 1,
    r_layers: int = 1,
    vocab: int = 30522,
    visual_feat_dim: int = 64,
    max_position: int = 64,
    seed: int = 0,
    heads_too: bool = True,
) -> dict[str, torch.Tensor]:
    """Write with `torch.save` a state dict keyed as `Epoch20_LXRT.pth` is (`module.bert.*`,
    with the pre-training heads `module.cls.*`, `module.obj_predict_head.*` and
    `module.answer_head.*` if `heads_too`), random values drawn from `seed`; return it.
    `heads` (attention heads) shapes no tensor; it must divide `hidden`, as the original
    requires."""
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not a multiple of {heads} attention heads")
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    def linear(name: str, out: int, into: int) -> None:
        state[f"{name}.weight"] = normal(out, into, std=0.1)
        state[f"{name}.bias"] = normal(out, std=0.1)

    def layer_norm(name: str, size: int = hidden) -> None:
        state[f"{name}.weight"] = 1 + normal(size, std=0.1)
        state[f"{name}.bias"] = normal(size, std=0.1)

    def attention(name: str) -> None:  # BertAttention
        for part in ("query", "key", "value"):
            linear(f"{name}.{part}", hidden, hidden)

    def attention_block(name: str, inner: str) -> None:  # BertSelfattLayer / BertCrossattLayer
        attention(f"{name}.{inner}")
        linear(f"{name}.output.dense", hidden, hidden)
        layer_norm(f"{name}.output.LayerNorm")

    def feed_forward(inter: str, out: str) -> None:  # BertIntermediate + BertOutput
        linear(f"{inter}.dense", intermediate, hidden)
        linear(f"{out}.dense", hidden, intermediate)
        layer_norm(f"{out}.LayerNorm")

    def bert_layer(name: str) -> None:  # BertLayer
        attention_block(f"{name}.attention", "self")
        feed_forward(f"{name}.intermediate", f"{name}.output")

    bert = PARALLEL + BACKBONE
    for table, rows in [("word", vocab), ("position", max_position), ("token_type", 2)]:
        state[f"{bert}embeddings.{table}_embeddings.weight"] = normal(rows, hidden, std=0.5)
    layer_norm(f"{bert}embeddings.LayerNorm")
    encoder = f"{bert}encoder."
    linear(f"{encoder}visn_fc.visn_fc", hidden, visual_feat_dim)
    layer_norm(f"{encoder}visn_fc.visn_layer_norm")
    linear(f"{encoder}visn_fc.box_fc", hidden, 4)
    layer_norm(f"{encoder}visn_fc.box_layer_norm")
    for i in range(l_layers):
        bert_layer(f"{encoder}layer.{i}")
    for i in range(x_layers):
        x = f"{encoder}x_layers.{i}"
        attention_block(f"{x}.visual_attention", "att")
        attention_block(f"{x}.lang_self_att", "self")
        attention_block(f"{x}.visn_self_att", "self")
        feed_forward(f"{x}.lang_inter", f"{x}.lang_output")
        feed_forward(f"{x}.visn_inter", f"{x}.visn_output")
    for i in range(r_layers):
        bert_layer(f"{encoder}r_layers.{i}")
    linear(f"{bert}pooler.dense", hidden, hidden)
    if heads_too:  # LXRTPretraining's heads, in the order its state dict lists them
        head = PARALLEL + "cls.predictions"
        state[f"{head}.bias"] = normal(vocab, std=0.1)
        linear(f"{head}.transform.dense", hidden, hidden)
        layer_norm(f"{head}.transform.LayerNorm")
        # The masked-LM decoder is the word embedding (tied): the file holds it a second time.
        state[f"{head}.decoder.weight"] = state[f"{bert}embeddings.word_embeddings.weight"]
        linear(f"{PARALLEL}cls.seq_relationship", 2, hidden)
        head = PARALLEL + "obj_predict_head"
        linear(f"{head}.transform.dense", hidden, hidden)
        layer_norm(f"{head}.transform.LayerNorm")
        for loss, classes in VISUAL_LOSSES.items():
            linear(f"{head}.decoder_dict.{loss}", classes, hidden)
        head = PARALLEL + "answer_head.logit_fc"  # Linear, GeLU, LayerNorm, Linear
        linear(f"{head}.0", 2 * hidden, hidden)
        layer_norm(f"{head}.2", 2 * hidden)
        linear(f"{head}.3", ANSWERS, 2 * hidden)
    # The release predates torch 1.6: torch's legacy (non-zip) format.
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return state


def original_forward(
    state: dict[str, torch.Tensor],
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    feats: torch.Tensor,
    boxes: torch.Tensor,
    visual_mask: torch.Tensor | None,
    *,
    heads: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LXRTModel's forward (eval mode: no dropout) on an original-layout state dict, with or
    without `module.`: language states, vision states and the pooled vector. `boxes` are the
    4 box coordinates; `visual_mask` None attends to every region; `heads` is the number of
    attention heads, which the weights do not record."""
    w = {
        key.removeprefix(PARALLEL).removeprefix(BACKBONE): value
        for key, value in state.items()
        if key.removeprefix(PARALLEL).startswith(BACKBONE)
    }

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ w[f"{name}.weight"].t() + w[f"{name}.bias"]

    def layer_norm(x: torch.Tensor, name: str) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        variance = ((x - mean) ** 2).mean(-1, keepdim=True)
        normed = (x - mean) / torch.sqrt(variance + EPS)
        return normed * w[f"{name}.weight"] + w[f"{name}.bias"]

    def gelu(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    def additive(mask: torch.Tensor | None) -> torch.Tensor | float:
        return 0.0 if mask is None else (1 - mask.float())[:, None, None, :] * MASKED

    def split(x: torch.Tensor) -> torch.Tensor:  # B × T × H → B × heads × T × H/heads
        return x.view(*x.shape[:2], heads, -1).transpose(1, 2)

    def attend(x: torch.Tensor, context: torch.Tensor, mask, name: str) -> torch.Tensor:
        query = split(linear(x, f"{name}.query"))
        key, value = split(linear(context, f"{name}.key")), split(linear(context, f"{name}.value"))
        scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1]) + mask
        mixed = torch.softmax(scores, dim=-1) @ value
        return mixed.transpose(1, 2).reshape(x.shape)

    def attention_block(x: torch.Tensor, context: torch.Tensor, mask, name: str, inner: str):
        attended = attend(x, context, mask, f"{name}.{inner}")
        return layer_norm(linear(attended, f"{name}.output.dense") + x, f"{name}.output.LayerNorm")

    def feed_forward(x: torch.Tensor, inter: str, out: str) -> torch.Tensor:
        expanded = gelu(linear(x, f"{inter}.dense"))
        return layer_norm(linear(expanded, f"{out}.dense") + x, f"{out}.LayerNorm")

    def bert_layer(x: torch.Tensor, mask, name: str) -> torch.Tensor:
        attended = attention_block(x, x, mask, f"{name}.attention", "self")
        return feed_forward(attended, f"{name}.intermediate", f"{name}.output")

    def count(stack: str) -> int:
        return len({m[1] for key in w if (m := re.match(rf"encoder\.{stack}\.(\d+)\.", key))})

    lang_mask, visn_mask = additive(attention_mask), additive(visual_mask)
    positions = torch.arange(input_ids.shape[1])
    embedded = (
        w["embeddings.word_embeddings.weight"][input_ids]
        + w["embeddings.position_embeddings.weight"][positions][None]
        + w["embeddings.token_type_embeddings.weight"][token_type_ids]
    )
    lang = layer_norm(embedded, "embeddings.LayerNorm")
    visual = "encoder.visn_fc."
    feat_part = layer_norm(linear(feats, f"{visual}visn_fc"), f"{visual}visn_layer_norm")
    box_part = layer_norm(linear(boxes, f"{visual}box_fc"), f"{visual}box_layer_norm")
    visn = (feat_part + box_part) / 2
    for i in range(count("layer")):
        lang = bert_layer(lang, lang_mask, f"encoder.layer.{i}")
    for i in range(count("r_layers")):
        visn = bert_layer(visn, visn_mask, f"encoder.r_layers.{i}")
    for i in range(count("x_layers")):
        x = f"encoder.x_layers.{i}"
        # One cross-attention module serves both directions, each from the layer's inputs.
        lang_cross = attention_block(lang, visn, visn_mask, f"{x}.visual_attention", "att")
        visn_cross = attention_block(visn, lang, lang_mask, f"{x}.visual_attention", "att")
        lang_self = attention_block(lang_cross, lang_cross, lang_mask, f"{x}.lang_self_att", "self")
        visn_self = attention_block(visn_cross, visn_cross, visn_mask, f"{x}.visn_self_att", "self")
        lang = feed_forward(lang_self, f"{x}.lang_inter", f"{x}.lang_output")
        visn = feed_forward(visn_self, f"{x}.visn_inter", f"{x}.visn_output")
    pooled = torch.tanh(linear(lang[:, 0], "pooler.dense"))
    return lang, visn, pooled
