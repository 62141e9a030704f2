"""LXMERT's original checkpoints (airsplay/lxmert) loaded into the `lxmert` backbone.

The released `Epoch20_LXRT.pth` is the state dict of `LXRTPretraining` (`src/lxrt/modeling.py`)
as `src/pretrain/lxmert_pretrain.py` saves it from inside `nn.DataParallel`: the backbone
(`LXRTModel`) under `module.bert.`, the pre-training heads under `module.cls.`,
`module.obj_predict_head.` and `module.answer_head.`. `src/lxrt/entry.py` saves the same `bert.`
keys without `module.`. Below `bert.` transformers' `LxmertModel` kept the original module
names, so converting drops the prefixes. The file holds no configuration: the architecture is
read off its tensors. Every key is accounted for: the heads are reported as ignored, anything
else that is no backbone tensor is refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from transformers import LxmertConfig, LxmertModel

from vl_prune.backbone import LoadReport, is_local
from vl_prune.checkpoint import read_state_dict, reason
from vl_prune.errors import VLPruneError
from vl_prune_plugins.backbones.hf_checkpoint import preset_of_width, quiet_loading

PARALLEL = "module."  # what nn.DataParallel puts in front of every key
BACKBONE = "bert."  # LXRTPretraining.bert (and LXRTFeatureExtraction.bert): the LXRTModel
HEADS = ("cls.", "obj_predict_head.", "answer_head.")  # LXRTPretraining's heads


def is_original(checkpoint: str | os.PathLike) -> bool:
    """Whether `checkpoint` is a local weights file in the original layout (backbone keys under
    `bert.` or `module.bert.`), judged from its key names."""
    if not is_local(checkpoint) or not Path(checkpoint).expanduser().is_file():
        return False
    keys = read_state_dict(Path(checkpoint).expanduser(), shapes_only=True)
    return any(key.removeprefix(PARALLEL).startswith(BACKBONE) for key in keys)


def load_original(
    checkpoint: str | os.PathLike, presets: dict[str, dict], preset: str | None = None
) -> tuple[LxmertModel, LoadReport]:
    """The `LxmertModel` of an original-layout checkpoint and the report of what loading ignored
    (the heads) and converted (the prefixes). Under `preset` the checkpoint must have that
    architecture; without one it has its own, with the attention heads of the preset of its
    width (the file does not record them). A key that maps onto no backbone tensor, a missing
    backbone key or a wrong shape is an error naming the key as the file spells it."""
    source = str(checkpoint)
    state, prefix, report = convert(read_state_dict(Path(checkpoint).expanduser()), source)
    if preset is None:
        settings = _settings(state, prefix, source)
        settings = {**presets[preset_of_width(presets, settings["hidden_size"])], **settings}
    else:
        settings = presets[preset]
    try:
        config = LxmertConfig(**settings)
        with torch.device("meta"):
            expected = LxmertModel(config).state_dict()
    except ValueError as exc:
        raise VLPruneError(f"{source}: cannot build its LxmertModel ({reason(exc)})") from exc
    if unknown := [key for key in state if key not in expected]:
        raise _unmappable(source, prefix + unknown[0], "LxmertModel has no such tensor")
    for key, tensor in expected.items():
        if key not in state:
            raise VLPruneError(f"{source}: backbone key {prefix}{key} is missing")
        if state[key].shape != tensor.shape:
            raise VLPruneError(
                f"{source}: {prefix}{key} has shape {tuple(state[key].shape)}, "
                f"the model expects {tuple(tensor.shape)}"
            )
    with quiet_loading():
        model = LxmertModel.from_pretrained(None, config=config, state_dict=state)
    return model, report


def convert(
    raw: dict[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], str, LoadReport]:
    """The backbone tensors under LxmertModel's names, the prefix they had in the file, and the
    report: heads ignored (named without `module.`), prefixes dropped. A key neither under
    `bert.` nor in a head is refused."""
    report = LoadReport(source)
    parallel = sum(key.startswith(PARALLEL) for key in raw)
    state = {}
    for key, value in raw.items():
        inner = key.removeprefix(PARALLEL)
        if inner.startswith(HEADS):
            report.ignored.append(inner)
        elif inner.startswith(BACKBONE):
            state[inner.removeprefix(BACKBONE)] = value
        else:
            heads = ", ".join(head.rstrip(".") for head in HEADS)
            raise _unmappable(source, key, f"neither under {BACKBONE} nor a head: {heads}")
    if parallel:
        report.converted.append(f"{parallel} '{PARALLEL}' prefixes (DataParallel) dropped")
    report.converted.append(
        f"{len(state)} '{BACKBONE}' prefixes (LXMERT's original layout) dropped"
    )
    return state, (PARALLEL if parallel else "") + BACKBONE, report


def _settings(state: dict[str, torch.Tensor], prefix: str, source: str) -> dict[str, int]:
    """The LxmertConfig settings that the backbone's tensors give away: sizes and layer counts."""

    def matrix(key: str) -> torch.Size:
        if key not in state:
            raise VLPruneError(f"{source}: backbone key {prefix}{key} is missing")
        if state[key].dim() != 2:
            shape = tuple(state[key].shape)
            raise VLPruneError(f"{source}: {prefix}{key} has shape {shape}, not a matrix")
        return state[key].shape

    def layers(stack: str) -> int:
        found = (re.match(rf"encoder\.{stack}\.(\d+)\.", key) for key in state)
        return 1 + max((int(match[1]) for match in found if match), default=-1)

    vocab, hidden = matrix("embeddings.word_embeddings.weight")
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=matrix("encoder.x_layers.0.lang_inter.dense.weight")[0],
        max_position_embeddings=matrix("embeddings.position_embeddings.weight")[0],
        type_vocab_size=matrix("embeddings.token_type_embeddings.weight")[0],
        visual_feat_dim=matrix("encoder.visn_fc.visn_fc.weight")[1],
        visual_pos_dim=matrix("encoder.visn_fc.box_fc.weight")[1],
        l_layers=layers("layer"),
        x_layers=layers("x_layers"),
        r_layers=layers("r_layers"),
    )


def _unmappable(source: str, key: str, why: str) -> VLPruneError:
    return VLPruneError(f"{source}: cannot map key {key} onto the lxmert backbone ({why})")
