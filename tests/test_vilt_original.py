"""ViLT's original Lightning checkpoints load into the `vilt` backbone: fused qkv split in the
right order, timm names mapped, heads reported, and the converted model computes what the
original architecture computes for the same weights (tests/vilt_original.py's own writer and
plain-torch forward)."""

from __future__ import annotations

import json
import pickle
import re
import sys

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tests.vilt_original import (
    original_state,
    reference_forward,
    save_checkpoint,
    write_original_vilt,
)
from vl_prune.backbone import VLBatch
from vl_prune.checkpoint import read_state_dict
from vl_prune.errors import VLPruneError
from vl_prune_cli.main import cli
from vl_prune_plugins.backbones.vilt import Vilt
from vl_prune_plugins.backbones.vilt_original import convert

HIDDEN, HEADS = 128, 4
TOLERANCE = 1e-5  # fp32


def _batch(vocab: int, high: int, wide: int, padded: bool, seed: int = 1) -> VLBatch:
    """Two texts, the second padded; two images of high × wide pixels, the second (if `padded`)
    a 64 × 64 image in the corner with zero padding, as ViLT's collation leaves it."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (2, 9), generator=generator)
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, 5:] = 0
    input_ids[1, 5:] = 0
    pixel_values = torch.rand(2, 3, high, wide, generator=generator) * 2 - 1
    pixel_mask = torch.ones(2, high, wide, dtype=torch.long)
    if padded:
        pixel_values[1, :, :, 64:] = 0
        pixel_mask[1, :, 64:] = 0
    return VLBatch(
        input_ids,
        attention_mask,
        torch.zeros_like(input_ids),
        pixel_values=pixel_values,
        pixel_mask=pixel_mask,
    )


def _outputs(model: Vilt, state: dict[str, torch.Tensor], batch: VLBatch, image_type: int = 1):
    """(converted, reference) outputs for the batch, each drawing its patches from the same
    seed."""
    batch.image_type = image_type
    with torch.no_grad():
        torch.manual_seed(0)
        out = model.eval()(batch)
        torch.manual_seed(0)
        expected = reference_forward(
            state,
            batch.input_ids,
            batch.attention_mask,
            batch.pixel_values,
            heads=HEADS,
            image_token_type=image_type,
        )
    return (out.text_states, out.image_states, out.pooled), expected


def _max_difference(found, expected) -> list[float]:
    return [(a - b).abs().max().item() for a, b in zip(found, expected, strict=True)]


@pytest.mark.parametrize(
    ("types", "image_type", "wide", "padded"),
    [(2, 1, 64, False), (3, 2, 96, True)],
    ids=["square-image", "nlvr2-second-image-padded-and-interpolated"],
)
def test_the_converted_model_computes_what_the_original_does(
    tmp_path, types, image_type, wide, padded
):
    path = tmp_path / "vilt.ckpt"
    state = write_original_vilt(path, modality_types=types)
    model = Vilt.build(checkpoint=path)
    assert model.preset == "tiny"  # the preset of its width; the architecture is the file's
    config = model.vilt.config
    assert (config.vocab_size, config.max_position_embeddings) == (30522, 40)
    assert config.modality_type_vocab_size == types
    batch = _batch(30522, 64, wide, padded)
    found, expected = _outputs(model, state, batch, image_type)
    assert found[2].shape == (2, HIDDEN)
    assert found[1].shape == (2, 1 + 4 * wide // 16, HIDDEN)  # class token + every patch
    text, image, pooled = _max_difference(found, expected)
    assert pooled <= TOLERANCE, pooled
    assert text <= TOLERANCE, text
    assert image <= TOLERANCE, image


def test_every_key_is_accounted_for_and_the_heads_are_reported(tmp_path):
    path = tmp_path / "nlvr2.ckpt"
    raw = write_original_vilt(path, modality_types=3)
    state, origin, report = convert(raw, str(path))
    model = Vilt.build(checkpoint=path)
    assert state.keys() == model.vilt.state_dict().keys()
    heads = sorted(k for k in raw if k.startswith(("mlm_score.", "itm_score.", "nlvr2_")))
    assert sorted(report.ignored) == heads
    assert report.accepted == ["text_embeddings.position_ids"]
    assert set(origin.values()) | set(heads) | set(report.accepted) == raw.keys()
    used = sum(raw[key].numel() for key in set(origin.values()))
    assert used == sum(tensor.numel() for tensor in state.values())
    assert str(model.load_report) == (
        f"loaded {path}: ignored {len(heads)} non-backbone keys (itm_score, mlm_score, "
        "nlvr2_classifier); converted 8 fused attn.qkv tensors → query/key/value, "
        "52 ViLT/timm names → ViltModel's; accepted text_embeddings.position_ids "
        "(buffers; not loaded)"
    )


def test_a_lightning_checkpoint_is_read_without_lightning_or_running_its_code(tmp_path):
    path = tmp_path / "vilt.ckpt"
    state = write_original_vilt(path)
    assert "pytorch_lightning" not in sys.modules
    # The fixture really holds Lightning's classes, which a plain weights-only load refuses.
    with pytest.raises(pickle.UnpicklingError, match="pytorch_lightning"):
        torch.load(path, weights_only=True)
    shapes = read_state_dict(path, shapes_only=True)
    assert {k: v.shape for k, v in shapes.items()} == {k: v.shape for k, v in state.items()}
    read = read_state_dict(path)
    assert read.keys() == state.keys()
    assert all(torch.equal(read[k], v) for k, v in state.items())
    assert "pytorch_lightning" not in sys.modules
    bare = tmp_path / "bare.ckpt"
    write_original_vilt(bare, lightning=False)
    assert (
        Vilt.build(checkpoint=bare).load_report.ignored
        == Vilt.build(checkpoint=path).load_report.ignored
    )


CALLED = []


def _record_call() -> str:
    CALLED.append(True)
    return "ran"


class _Payload:
    def __reduce__(self):
        return (_record_call, ())


def test_code_named_in_a_checkpoint_never_runs(tmp_path):
    """A function a zip checkpoint names is a stand-in, never called: beside the state dict it
    is ignored, inside it the state dict is refused."""
    state = original_state(layers=1, heads_too=False)
    beside = tmp_path / "beside.ckpt"
    torch.save({"state_dict": state, "callbacks": _Payload()}, beside)
    assert read_state_dict(beside).keys() == state.keys()
    inside = tmp_path / "inside.ckpt"
    torch.save({"state_dict": {**state, "pooler.dense.weight": _Payload()}}, inside)
    with pytest.raises(VLPruneError, match=r"inside\.ckpt: not a state dict of tensors"):
        read_state_dict(inside)
    assert not CALLED


def test_the_fused_qkv_splits_into_query_key_value_in_that_order(tmp_path):
    path = tmp_path / "vilt.ckpt"
    state = write_original_vilt(path, layers=2)
    attention = Vilt.build(checkpoint=path).vilt.encoder.layer[1].attention.attention
    fused_weight = state["transformer.blocks.1.attn.qkv.weight"]
    fused_bias = state["transformer.blocks.1.attn.qkv.bias"]
    for third, linear in enumerate((attention.query, attention.key, attention.value)):
        rows = slice(third * HIDDEN, (third + 1) * HIDDEN)
        assert torch.equal(linear.weight, fused_weight[rows])
        assert torch.equal(linear.bias, fused_bias[rows])


def test_the_split_is_not_symmetric_so_the_equivalence_test_sees_the_order(tmp_path):
    """Query and key swapped in the file: the converted model no longer matches the original's
    forward, so the equivalence above would fail for a split in the wrong order."""
    state = original_state(layers=2)
    swapped = dict(state)
    for key in [k for k in state if ".attn.qkv." in k]:
        query, key_part, value = state[key].chunk(3)
        swapped[key] = torch.cat([key_part, query, value])
    path = tmp_path / "swapped.ckpt"
    save_checkpoint(path, swapped, None)
    found, expected = _outputs(Vilt.build(checkpoint=path), state, _batch(30522, 64, 64, False))
    assert _max_difference(found, expected)[2] > 1e-2


def test_an_unmappable_or_missing_key_names_the_file_and_the_key(tmp_path):
    state = original_state(layers=1, heads_too=False)
    path = tmp_path / "odd.ckpt"
    save_checkpoint(path, {**state, "transformer.pre_norm.weight": torch.ones(HIDDEN)}, None)
    with pytest.raises(VLPruneError) as error:
        Vilt.build(checkpoint=path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: cannot map key transformer.pre_norm.weight onto")
    missing = {k: v for k, v in state.items() if k != "transformer.norm.bias"}
    save_checkpoint(path, missing, None)
    with pytest.raises(VLPruneError, match=r"backbone key transformer\.norm\.bias is missing"):
        Vilt.build(checkpoint=path)


def test_an_explicit_preset_must_fit_the_original_checkpoint(tmp_path):
    path = tmp_path / "vilt.ckpt"
    write_original_vilt(path, heads_too=False)
    with pytest.raises(VLPruneError, match=re.escape("vocab_size is 30522 but vilt-tiny has")):
        Vilt.build("tiny", path)


def test_the_cli_refuses_an_unmappable_key_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("VL_PRUNE_HOME", str(tmp_path / "home"))
    data = tmp_path / "nlvr2"
    (data / "images").mkdir(parents=True)
    for split in ("train", "dev"):
        lines = []
        for pair in range(2):
            name = f"{split}-0-{pair}"
            for side in ("img0", "img1"):
                Image.new("RGB", (64, 64), (40 * pair, 90, 200)).save(
                    data / "images" / f"{name}-{side}.png"
                )
            lines.append(
                {
                    "identifier": f"{name}-0",
                    "sentence": "there is a red circle .",
                    "label": "True" if pair else "False",
                    "left_url": f"images/{name}-img0.png",
                    "right_url": f"images/{name}-img1.png",
                }
            )
        (data / f"{split}.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    state = original_state(layers=1, heads_too=False)
    path = tmp_path / "odd.ckpt"
    save_checkpoint(path, {**state, "transformer.blocks.0.attn.rope.weight": torch.ones(2)}, None)
    args = ["find", "--model", "vilt", "--task", "nlvr2", "--checkpoint", str(path)]
    result = CliRunner().invoke(cli, [*args, "--data", str(data)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert str(path) in lines[0]
    assert "transformer.blocks.0.attn.rope.weight" in lines[0]
