"""ViLT's original checkpoints, written here independently of the converter, and the original
architecture's forward pass in plain torch, to check the conversion against.

The layout is `ViLTransformerSS`'s (dandelin/ViLT, `vilt/modules/vilt_module.py`): a BERT
embedding `text_embeddings.*`, the modality type embedding `token_type_embeddings.weight`, timm's
ViT under `transformer.` (`vilt/modules/vision_transformer.py`: `cls_token`, `pos_embed`,
`patch_embed.proj`, pre-norm `blocks.N` with a fused `attn.qkv`, final `norm`), `pooler.dense`
and the heads. The file is what ViLT's training saved: a PyTorch Lightning checkpoint whose
`hyper_parameters` is Lightning's `AttributeDict` and whose `callbacks` are keyed by callback
class, both pickled under their Lightning module paths (registered only while writing).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

#: ViLT's LayerNorm epsilons: BERT's for the text embedding, timm ViT's for the encoder
BERT_EPS, VIT_EPS = 1e-12, 1e-6


def original_state(
    *,
    hidden: int = 128,
    intermediate: int = 256,
    layers: int = 4,
    vocab: int = 30522,
    image_size: int = 64,
    patch_size: int = 16,
    max_text_len: int = 40,
    modality_types: int = 2,
    seed: int = 0,
    heads_too: bool = True,
) -> dict[str, torch.Tensor]:
    """A random state dict of ViLTransformerSS, keys and shapes as the original's. Biases and
    LayerNorm parameters are random too (the original starts them at 0 and 1), so a bias or
    norm read from the wrong tensor shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    def linear(name: str, rows: int, columns: int, std: float = 0.02) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": normal(rows, columns, std=std), f"{name}.bias": normal(rows)}

    def norm(name: str, width: int = hidden) -> dict[str, torch.Tensor]:
        return {
            f"{name}.weight": 1 + normal(width, std=0.1),
            f"{name}.bias": normal(width, std=0.1),
        }

    grid = image_size // patch_size
    state = {
        "text_embeddings.word_embeddings.weight": normal(vocab, hidden),
        "text_embeddings.position_embeddings.weight": normal(max_text_len, hidden),
        "text_embeddings.token_type_embeddings.weight": normal(2, hidden),
        **norm("text_embeddings.LayerNorm"),
        # transformers 4.2 (ViLT's) saved BertEmbeddings' position ids as a buffer
        "text_embeddings.position_ids": torch.arange(max_text_len)[None],
        "token_type_embeddings.weight": normal(modality_types, hidden),
        "transformer.cls_token": normal(1, 1, hidden),
        "transformer.pos_embed": normal(1, grid * grid + 1, hidden),
        "transformer.patch_embed.proj.weight": normal(hidden, 3, patch_size, patch_size),
        "transformer.patch_embed.proj.bias": normal(hidden),
    }
    for n in range(layers):
        block = f"transformer.blocks.{n}"
        state.update(norm(f"{block}.norm1"))
        # Larger than ViLT's initial 0.02, as trained attention is: at 0.02 every token attends
        # almost uniformly, and a query/key mix-up would hardly show in the outputs.
        state.update(linear(f"{block}.attn.qkv", 3 * hidden, hidden, std=0.1))
        state.update(linear(f"{block}.attn.proj", hidden, hidden))
        state.update(norm(f"{block}.norm2"))
        state.update(linear(f"{block}.mlp.fc1", intermediate, hidden))
        state.update(linear(f"{block}.mlp.fc2", hidden, intermediate))
    state.update(norm("transformer.norm"))
    state.update(linear("pooler.dense", hidden, hidden))
    if heads_too:
        state.update(linear("mlm_score.transform.dense", hidden, hidden))
        state.update(norm("mlm_score.transform.LayerNorm"))
        state["mlm_score.decoder.weight"] = normal(vocab, hidden)
        state["mlm_score.bias"] = normal(vocab)
        state.update(linear("itm_score.fc", 2, hidden))
        if modality_types > 2:  # NLVR2 fine-tuning adds the second image's type and this head
            state.update(linear("nlvr2_classifier.0", 2 * hidden, 2 * hidden))
            state.update(norm("nlvr2_classifier.1", 2 * hidden))
            state.update(linear("nlvr2_classifier.3", 2, 2 * hidden))
    return state


def write_original_vilt(
    path: Path,
    *,
    hidden: int = 128,
    heads: int = 4,
    intermediate: int = 256,
    layers: int = 4,
    vocab: int = 30522,
    image_size: int = 64,
    patch_size: int = 16,
    max_text_len: int = 40,
    modality_types: int = 2,
    seed: int = 0,
    heads_too: bool = True,
    lightning: bool = True,
) -> dict[str, torch.Tensor]:
    """Write a ViLT checkpoint as its training saved it (`heads` is the attention heads, which
    only the hyper-parameters record) and return its state dict. Without `lightning` the file
    is `{"state_dict": ...}` alone."""
    state = original_state(
        hidden=hidden,
        intermediate=intermediate,
        layers=layers,
        vocab=vocab,
        image_size=image_size,
        patch_size=patch_size,
        max_text_len=max_text_len,
        modality_types=modality_types,
        seed=seed,
        heads_too=heads_too,
    )
    config = {
        "hidden_size": hidden,
        "num_heads": heads,
        "num_layers": layers,
        "mlp_ratio": intermediate // hidden,
        "vocab_size": vocab,
        "max_text_len": max_text_len,
        "image_size": image_size,
        "patch_size": patch_size,
        "max_image_len": -1,
        "drop_rate": 0.1,
        "loss_names": {"itm": 1, "mlm": 1, "mpp": 0, "vqa": 0, "nlvr2": int(modality_types > 2)},
    }
    save_checkpoint(path, state, config if lightning else None)
    return state


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], config: dict | None) -> None:
    """`torch.save` of `{"state_dict": state}`, with a Lightning 1.1 checkpoint's other entries
    when a ViLT `config` is given."""
    if config is None:
        torch.save({"state_dict": state}, path)
        return
    with _lightning_classes() as (attribute_dict, model_checkpoint):
        first = next(iter(state.values()))
        torch.save(
            {
                "epoch": 9,
                "global_step": 200_000,
                "pytorch-lightning_version": "1.1.4",
                "callbacks": {
                    model_checkpoint: {
                        "monitor": "val/the_metric",
                        "best_model_score": torch.tensor(0.75),
                        "best_model_path": "result/epoch=9-step=200000.ckpt",
                    }
                },
                "optimizer_states": [
                    {
                        "state": {0: {"exp_avg": torch.zeros_like(first), "step": 200_000}},
                        "param_groups": [{"lr": 1e-4, "weight_decay": 0.01, "params": [0]}],
                    }
                ],
                "lr_schedulers": [
                    {"base_lrs": [1e-4], "last_epoch": 200_000, "lr_lambdas": [None]}
                ],
                "native_amp_scaling_state": {"scale": 65536.0, "_growth_tracker": 7},
                "state_dict": state,
                "hyper_parameters": attribute_dict(config=config),
            },
            path,
        )


@contextmanager
def _lightning_classes() -> Iterator[tuple[type, type]]:
    """Stand-ins for Lightning's `AttributeDict` and `ModelCheckpoint`, importable under their
    real module paths while the checkpoint is written (pickle names classes by those), and gone
    after, so reading cannot import them."""
    paths = {
        "pytorch_lightning.utilities.parsing": "AttributeDict",
        "pytorch_lightning.callbacks.model_checkpoint": "ModelCheckpoint",
    }
    packages = {"pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.callbacks"}
    if any(name in sys.modules for name in [*paths, *packages]):
        raise RuntimeError("pytorch_lightning is imported: the fixture would not be a stand-in")
    classes = []
    for module_name, class_name in paths.items():
        module = types.ModuleType(module_name)
        base = dict if class_name == "AttributeDict" else object
        cls = type(class_name, (base,), {"__module__": module_name})
        setattr(module, class_name, cls)
        sys.modules[module_name] = module
        classes.append(cls)
    for package in packages:
        sys.modules[package] = types.ModuleType(package)
    try:
        yield classes[0], classes[1]
    finally:
        for name in [*paths, *packages]:
            del sys.modules[name]


def reference_forward(
    state: dict[str, torch.Tensor],
    input_ids: torch.Tensor,
    text_masks: torch.Tensor,
    pixels: torch.Tensor,
    *,
    heads: int,
    image_token_type: int = 1,
    max_image_len: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ViLT's `infer` on the original state dict, in plain torch: text states, image states
    (class token first), pooled output. Padding pixels are exact zeros, as ViLT's collation
    leaves them (it has no pixel mask). Patches are drawn as the original draws them, with one
    `torch.multinomial` per image, so the same seed gives the same patch order."""
    text = _text_embeddings(state, input_ids)
    image, image_masks = _visual_embed(state, pixels, max_image_len)
    types = state["token_type_embeddings.weight"]
    x = torch.cat([text + types[0], image + types[image_token_type]], dim=1)
    keep = torch.cat([text_masks, image_masks], dim=1).bool()
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.blocks."))
    for n in range(layers):
        x = _block(state, f"transformer.blocks.{n}", x, keep, heads)
    x = _norm(state, "transformer.norm", x, VIT_EPS)
    pooled = torch.tanh(_linear(state, "pooler.dense", x[:, 0]))
    length = input_ids.shape[1]
    return x[:, :length], x[:, length:], pooled


def _linear(state: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])


def _norm(state: dict[str, torch.Tensor], name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    weight, bias = state[f"{name}.weight"], state[f"{name}.bias"]
    return F.layer_norm(x, weight.shape, weight, bias, eps)


def _text_embeddings(state: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """BertEmbeddings with token type 0 (ViLT passes no token types): words + positions +
    type, LayerNorm."""
    words = state["text_embeddings.word_embeddings.weight"][input_ids]
    positions = state["text_embeddings.position_embeddings.weight"][: input_ids.shape[1]]
    kinds = state["text_embeddings.token_type_embeddings.weight"][0]
    return _norm(state, "text_embeddings.LayerNorm", words + positions + kinds, BERT_EPS)


def _visual_embed(
    state: dict[str, torch.Tensor], pixels: torch.Tensor, max_image_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ViT's patch embedding as ViLT uses it: conv patches; the grid of position
    embeddings resized (bilinear, corners aligned) to each image's valid patches and zero-padded
    to the batch's grid; patches drawn per image (all valid ones in a random order, topped up
    with padding patches, or `max_image_len` of them); class token and its position first."""
    weight = state["transformer.patch_embed.proj.weight"]
    patch = weight.shape[-1]
    patches = F.conv2d(pixels, weight, state["transformer.patch_embed.proj.bias"], stride=patch)
    batch, width, rows, columns = patches.shape
    valid = (pixels.sum(dim=1) != 0).float()[:, None]
    valid = F.interpolate(valid, size=(rows, columns)).long()[:, 0]  # nearest: B × rows × cols
    heights, widths = valid[:, :, 0].sum(dim=1), valid[:, 0, :].sum(dim=1)

    pos_embed = state["transformer.pos_embed"]
    side = int((pos_embed.shape[1] - 1) ** 0.5)
    grid = pos_embed[0, 1:].t().reshape(1, width, side, side)
    positions = torch.cat(
        [
            F.pad(
                F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True),
                (0, columns - w, 0, rows - h),
            )
            for h, w in zip(heights.tolist(), widths.tolist(), strict=True)
        ]
    )
    patches = patches.flatten(2).transpose(1, 2)
    positions = positions.flatten(2).transpose(1, 2)
    valid = valid.flatten(1)

    count = int((heights * widths).max())
    if max_image_len >= 0:
        count = min(count, max_image_len)
    chosen = []
    for row in valid:
        inside, outside = row.nonzero()[:, 0], (row == 0).nonzero()[:, 0]
        if len(inside) >= count:
            chosen.append(inside[torch.multinomial(torch.ones(len(inside)), count)])
        else:
            extra = torch.multinomial(torch.ones(len(outside)), count - len(inside), True)
            chosen.append(torch.cat([inside, outside[extra]]))
    index = torch.stack(chosen)
    pick = index[:, :, None].expand(-1, -1, width)
    patches, positions = patches.gather(1, pick), positions.gather(1, pick)
    masks = valid.gather(1, index)

    cls = state["transformer.cls_token"].expand(batch, -1, -1)
    x = torch.cat([cls, patches], dim=1)
    x = x + torch.cat([pos_embed[:, :1].expand(batch, -1, -1), positions], dim=1)
    return x, torch.cat([torch.ones(batch, 1, dtype=masks.dtype), masks], dim=1)


def _block(
    state: dict[str, torch.Tensor], name: str, x: torch.Tensor, keep: torch.Tensor, heads: int
) -> torch.Tensor:
    """A timm pre-norm block: x + attention(norm1(x)), then x + mlp(norm2(x)). The fused qkv
    projection's output features are (query, key, value) × heads × head size."""
    batch, length, width = x.shape
    fused = _linear(state, f"{name}.attn.qkv", _norm(state, f"{name}.norm1", x, VIT_EPS))
    query, key, value = fused.reshape(batch, length, 3, heads, width // heads).permute(
        2, 0, 3, 1, 4
    )
    scores = (query @ key.transpose(-2, -1)) * (width // heads) ** -0.5
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    attended = (scores.softmax(dim=-1) @ value).transpose(1, 2).reshape(batch, length, width)
    x = x + _linear(state, f"{name}.attn.proj", attended)
    hidden = F.gelu(_linear(state, f"{name}.mlp.fc1", _norm(state, f"{name}.norm2", x, VIT_EPS)))
    return x + _linear(state, f"{name}.mlp.fc2", hidden)
