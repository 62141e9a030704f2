"""ViLT's original checkpoints (dandelin/ViLT) loaded into the `vilt` backbone.

The released `vilt_200k_mlm_itm.ckpt`, `vilt_vqa.ckpt`, `vilt_nlvr2.ckpt`, … are PyTorch
Lightning checkpoints of `ViLTransformerSS` (`vilt/modules/vilt_module.py`): a BERT embedding for
the text (`text_embeddings.`), the modality type embedding (`token_type_embeddings.`), a timm
ViT whose patch embedding, class token, position embeddings, pre-norm blocks and final norm
encode both modalities (`transformer.`, `vilt/modules/vision_transformer.py`), the pooler, and
the pre-training or task heads. Converting renames the timm modules to transformers' `ViltModel`
and splits each block's fused `attn.qkv` (rows: all query, then all key, then all value
features) into query, key and value. The file holds no configuration beside the weights that
`read_state_dict` keeps: the architecture is read off the tensors. Every key is accounted for:
heads are reported as ignored, the text's `position_ids` buffer as accepted, anything else that
maps onto no backbone tensor is refused.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from transformers import ViltConfig, ViltModel

from vl_prune.backbone import LoadReport, is_local
from vl_prune.checkpoint import read_state_dict, reason
from vl_prune.errors import VLPruneError
from vl_prune_plugins.backbones.hf_checkpoint import quiet_loading

#: the original's non-block tensors → ViltModel's
NAMES = {
    **{
        f"text_embeddings.{name}": f"embeddings.text_embeddings.{name}"
        for name in (
            "word_embeddings.weight",
            "position_embeddings.weight",
            "token_type_embeddings.weight",
            "LayerNorm.weight",
            "LayerNorm.bias",
        )
    },
    "token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
    "transformer.cls_token": "embeddings.cls_token",
    "transformer.pos_embed": "embeddings.position_embeddings",
    "transformer.patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "transformer.patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "transformer.norm.weight": "layernorm.weight",
    "transformer.norm.bias": "layernorm.bias",
    "pooler.dense.weight": "pooler.dense.weight",
    "pooler.dense.bias": "pooler.dense.bias",
}
#: a timm block's modules (transformer.blocks.N.*) → a ViltLayer's (encoder.layer.N.*)
BLOCK = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
FUSED = "attn.qkv"
SPLIT = ("query", "key", "value")  # the order of the fused rows
_BLOCK_KEY = re.compile(r"transformer\.blocks\.(\d+)\.(.+)\.(weight|bias)")
#: ViLTransformerSS's pre-training heads and its VQA, NLVR2 and retrieval heads
HEADS = (
    *("mlm_score.", "itm_score.", "mpp_score."),
    *("vqa_classifier.", "nlvr2_classifier.", "rank_output."),
)
#: a buffer that transformers 4.2 (ViLT's) saved and ViltModel rebuilds itself
BUFFERS = ("text_embeddings.position_ids",)
#: timm's ViT LayerNorms (blocks and final norm); the BERT text embedding keeps BERT's 1e-12
VIT_EPS, BERT_EPS = 1e-6, 1e-12


def is_original(checkpoint: str | os.PathLike) -> bool:
    """Whether `checkpoint` is a local weights file in the original layout (the ViT under
    `transformer.`), judged from its key names without reading the values."""
    if not is_local(checkpoint) or not Path(checkpoint).expanduser().is_file():
        return False
    keys = read_state_dict(Path(checkpoint).expanduser(), shapes_only=True)
    return any(key.startswith("transformer.") for key in keys)


def load_original(
    checkpoint: str | os.PathLike, presets: dict[str, dict], preset: str | None = None
) -> tuple[ViltModel, LoadReport]:
    """The `ViltModel` of an original-layout checkpoint and the report of what loading ignored
    (heads), converted (names, fused qkv) and accepted (a buffer). The architecture is the
    checkpoint's own; the attention heads, which no tensor records, are `preset`'s, else those
    of the preset of its width, else one per 64 features (ViT's). A key that maps onto no
    backbone tensor, a missing backbone key or a wrong shape is an error naming the key as the
    file spells it."""
    source = str(checkpoint)
    raw = read_state_dict(Path(checkpoint).expanduser())
    state, origin, report = convert(raw, source)
    settings = _settings(raw, source)
    width = settings["hidden_size"]
    chosen = preset or next((p for p, s in presets.items() if s["hidden_size"] == width), None)
    heads = presets[chosen]["num_attention_heads"] if chosen else max(1, width // 64)
    try:
        config = ViltConfig(**settings, num_attention_heads=heads, layer_norm_eps=VIT_EPS)
        with torch.device("meta"):
            expected = ViltModel(config).state_dict()
    except ValueError as exc:
        raise VLPruneError(f"{source}: cannot build its ViltModel ({reason(exc)})") from exc
    if unknown := [key for key in state if key not in expected]:
        raise _unmappable(source, origin[unknown[0]], f"ViltModel has no {unknown[0]}")
    for key, tensor in expected.items():
        if key not in state:
            raise VLPruneError(f"{source}: backbone key {original_name(key)} is missing")
        if state[key].shape != tensor.shape:
            found = tuple(raw[origin[key]].shape)
            raise VLPruneError(
                f"{source}: {origin[key]} has shape {found}, which does not fit ViltModel's "
                f"{key} {tuple(tensor.shape)}"
            )
    with quiet_loading():
        model = ViltModel.from_pretrained(None, config=config, state_dict=state)
    # ViltConfig has one eps; the BERT text embedding has its own. With 1e-12 throughout (as
    # transformers' own conversion has it), tests/test_vilt_original.py's image states are off
    # by 2e-3; with 1e-6 throughout, its text states by 5e-4.
    model.embeddings.text_embeddings.LayerNorm.eps = BERT_EPS
    return model, report


def convert(
    raw: dict[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], dict[str, str], LoadReport]:
    """The backbone tensors under ViltModel's names, the original key each came from, and the
    report. Each fused `attn.qkv` becomes three tensors (its rows in thirds: query, key,
    value). A key that is neither a backbone tensor, a head nor the known buffer is refused."""
    report = LoadReport(source)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    fused = renamed = 0
    for key, value in raw.items():
        if key.startswith(HEADS):
            report.ignored.append(key)
            continue
        if key in BUFFERS:
            report.accepted.append(key)
            continue
        block = _BLOCK_KEY.fullmatch(key)
        if key in NAMES:
            targets = {NAMES[key]: value}
            renamed += NAMES[key] != key
        elif block and block[2] == FUSED:
            layer, kind = block[1], block[3]
            parts = value.chunk(len(SPLIT))
            targets = {
                f"encoder.layer.{layer}.attention.attention.{name}.{kind}": part.clone()
                for name, part in zip(SPLIT, parts, strict=False)
            }
            fused += 1
        elif block and block[2] in BLOCK:
            targets = {f"encoder.layer.{block[1]}.{BLOCK[block[2]]}.{block[3]}": value}
            renamed += 1
        else:
            raise _unmappable(source, key, "not a tensor of ViLT's backbone nor of its heads")
        state.update(targets)
        origin.update(dict.fromkeys(targets, key))
    if fused:
        report.converted.append(f"{fused} fused attn.qkv tensors → query/key/value")
    if renamed:
        report.converted.append(f"{renamed} ViLT/timm names → ViltModel's")
    return state, origin, report


def original_name(key: str) -> str:
    """The original key that ViltModel's `key` is read from (the fused qkv for query, key and
    value)."""
    inverse = {vilt: original for original, vilt in NAMES.items()}
    if key in inverse:
        return inverse[key]
    layer = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", key)
    if layer is None:
        return key
    modules = {vilt: original for original, vilt in BLOCK.items()}
    modules.update({f"attention.attention.{name}": FUSED for name in SPLIT})
    return f"transformer.blocks.{layer[1]}.{modules.get(layer[2], layer[2])}.{layer[3]}"


def _settings(raw: dict[str, torch.Tensor], source: str) -> dict[str, int | bool]:
    """The ViltConfig settings that the original tensors give away: sizes, layers, patches."""

    def shape(key: str, dims: int) -> torch.Size:
        if key not in raw:
            raise VLPruneError(f"{source}: backbone key {key} is missing")
        if raw[key].dim() != dims:
            found = tuple(raw[key].shape)
            raise VLPruneError(f"{source}: {key} has shape {found}, not {dims}-dimensional")
        return raw[key].shape

    vocab, hidden = shape("text_embeddings.word_embeddings.weight", 2)
    _, channels, patch, _ = shape("transformer.patch_embed.proj.weight", 4)
    patches = shape("transformer.pos_embed", 3)[1] - 1  # after the class token's
    side = math.isqrt(patches)
    if side * side != patches:
        raise VLPruneError(
            f"{source}: transformer.pos_embed holds {patches} patch positions, not a square grid"
        )
    blocks = (_BLOCK_KEY.fullmatch(key) for key in raw)
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        max_position_embeddings=shape("text_embeddings.position_embeddings.weight", 2)[0],
        type_vocab_size=shape("text_embeddings.token_type_embeddings.weight", 2)[0],
        modality_type_vocab_size=shape("token_type_embeddings.weight", 2)[0],
        num_hidden_layers=1 + max((int(block[1]) for block in blocks if block), default=-1),
        intermediate_size=shape("transformer.blocks.0.mlp.fc1.weight", 2)[0],
        num_channels=channels,
        patch_size=patch,
        image_size=side * patch,
        qkv_bias="transformer.blocks.0.attn.qkv.bias" in raw,
    )


def _unmappable(source: str, key: str, why: str) -> VLPruneError:
    return VLPruneError(f"{source}: cannot map key {key} onto the vilt backbone ({why})")
