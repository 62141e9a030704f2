"""The transformers-backed backbones, LXMERT and ViLT: tiny presets, prunable sets, checkpoints,
tickets, perturbations and the offline hub error."""

import copy
import pickle
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import LxmertForPreTraining, ViltForMaskedLM

from vl_prune import Ticket
from vl_prune.backbone import Backbone, VLBatch, VLOutput
from vl_prune.errors import VLPruneError
from vl_prune.pruning import GlobalMagnitude
from vl_prune_plugins.backbones.lxmert import Lxmert
from vl_prune_plugins.backbones.vilt import Vilt

REGIONS = 7
SENTENCES = ["two red circles left of a star .", "is there a blue square ?"]


@dataclass
class Kind:
    """What the shared tests need to know about one backbone class."""

    cls: type[Backbone]
    attribute: str  # where the transformers model sits
    pretraining: Any  # the transformers pre-training model with heads
    heads: tuple[str, ...]
    base: str
    hub_id: str


LXMERT = Kind(
    Lxmert,
    "lxmert",
    LxmertForPreTraining,
    ("answer_head", "cls", "obj_predict_head"),
    "base",
    "unc-nlp/lxmert-base-uncased",
)
VILT = Kind(Vilt, "vilt", ViltForMaskedLM, ("mlm_score",), "b32", "dandelin/vilt-b32-mlm")
KINDS = pytest.mark.parametrize("kind", [LXMERT, VILT], ids=["lxmert", "vilt"])


def tiny(kind: Kind, seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    return kind.cls.build("tiny").eval()


def make_batch(model: Backbone) -> VLBatch:
    """Two sentences from the model's own tokenizer with regions (LXMERT) or images passed
    through its image processor (ViLT): a wide one and a square one, so one is padded."""
    text = model.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    generator = torch.Generator().manual_seed(1)
    batch = VLBatch(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
    if model.image_input == "regions":
        dim = model.lxmert.config.visual_feat_dim
        batch.region_feats = torch.randn(2, REGIONS, dim, generator=generator).half()
        batch.region_boxes = torch.rand(2, REGIONS, 6, generator=generator)
        batch.region_mask = torch.tensor([[1] * REGIONS, [1] * (REGIONS - 2) + [0, 0]])
    else:
        rng = np.random.default_rng(1)
        images = [
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for h, w in [(50, 80), (64, 64)]
        ]
        pixels = model.image_processor(images, return_tensors="pt")
        batch.pixel_values, batch.pixel_mask = pixels["pixel_values"], pixels["pixel_mask"]
    return batch


def encode(model: Backbone, batch: VLBatch, *deltas: torch.Tensor | None) -> VLOutput:
    """A forward pass that repeats exactly: ViLT visits its patches in a random order."""
    torch.manual_seed(0)
    return model(batch, *deltas)


def assert_same(a: VLOutput, b: VLOutput, atol: float = 1e-6) -> None:
    for x, y in zip(
        (a.text_states, a.image_states, a.pooled),
        (b.text_states, b.image_states, b.pooled),
        strict=True,
    ):
        assert torch.allclose(x, y, atol=atol)


def inner(model: Backbone, kind: Kind) -> nn.Module:
    return getattr(model, kind.attribute)


@KINDS
def test_tiny_builds_offline_runs_forward_and_backward(kind):
    model = tiny(kind).train()
    assert model.preset == "tiny" and kind.cls.presets[0] == "tiny"
    batch = make_batch(model)
    out = model(batch)
    length, hidden = batch.input_ids.shape[1], model.hidden_size
    assert out.text_states.shape == (2, length, hidden)
    if kind is LXMERT:
        images = REGIONS
    else:
        _, _, rows, columns = model.perturbation_shapes(batch)[1]
        images = 1 + rows * columns  # ViLT's image [CLS] and every patch
    assert out.image_states.shape == (2, images, hidden)
    assert out.pooled.shape == (2, hidden)
    (
        out.text_states.square().mean() + out.image_states.square().mean() + out.pooled.sum()
    ).backward()
    for module, name in model.prunable():
        assert getattr(module, name).grad.abs().sum() > 0


@pytest.mark.parametrize("preset", ["tiny", "base"])
def test_lxmert_prunes_every_layer_linear_and_the_pooler(preset):
    with torch.device("meta"):
        model = Lxmert(preset)
    config = model.lxmert.config
    h, i = config.hidden_size, config.intermediate_size
    single, cross = 4 * h * h + 2 * h * i, 12 * h * h + 4 * h * i
    layers = config.l_layers + config.r_layers
    assert len(model.prunable()) == 6 * layers + 16 * config.x_layers + 1
    weights = sum(getattr(m, n).numel() for m, n in model.prunable())
    assert weights == layers * single + config.x_layers * cross + h * h
    if preset == "base":
        assert (len(model.prunable()), weights) == (165, 182_255_616)
    names = model.prunable_names()
    x_layer = [n.removeprefix("lxmert.encoder.x_layers.0.") for n in names if ".x_layers.0." in n]
    assert x_layer == [
        f"{block}.{m}.weight"
        for block, core in [
            ("visual_attention", "att"),
            ("lang_self_att", "self"),
            ("visn_self_att", "self"),
        ]
        for m in (f"{core}.query", f"{core}.key", f"{core}.value", "output.dense")
    ] + [f"{m}.dense.weight" for m in ("lang_inter", "lang_output", "visn_inter", "visn_output")]
    # Exactly the linear layers, less LXMERT's image embedding (the visual feature encoder).
    linears = {f"{p}.weight" for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    encoder = {"lxmert.encoder.visn_fc.visn_fc.weight", "lxmert.encoder.visn_fc.box_fc.weight"}
    assert set(names) == linears - encoder


@pytest.mark.parametrize("preset", ["tiny", "b32"])
def test_vilt_prunes_every_layer_linear_and_the_pooler(preset):
    with torch.device("meta"):
        model = Vilt(preset)
    config = model.vilt.config
    h, i = config.hidden_size, config.intermediate_size
    weights = sum(getattr(m, n).numel() for m, n in model.prunable())
    assert len(model.prunable()) == 6 * config.num_hidden_layers + 1
    assert weights == config.num_hidden_layers * (4 * h * h + 2 * h * i) + h * h
    if preset == "b32":
        assert (len(model.prunable()), weights) == (73, 85_524_480)
    names = model.prunable_names()
    assert names[:6] == [
        f"vilt.encoder.layer.0.{m}.weight"
        for m in (
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    ]
    assert names[-1] == "vilt.pooler.dense.weight"
    # The patch projection is a Conv2d: every nn.Linear of ViLT is in a layer or the pooler.
    linears = {f"{p}.weight" for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(names) == linears


@KINDS
def test_save_pretrained_folder_and_state_dict_file_load_back(kind, tmp_path):
    source = tiny(kind, seed=3)
    batch = make_batch(source)
    expected = encode(source, batch)
    inner(source, kind).save_pretrained(tmp_path / "folder")
    state = {k: v.clone() for k, v in inner(source, kind).state_dict().items()}
    save_file(state, tmp_path / "weights.safetensors")
    torch.save(state, tmp_path / "weights.pt")
    for checkpoint, preset in [
        (tmp_path / "folder", "tiny"),
        (tmp_path / "folder", None),
        (tmp_path / "weights.safetensors", "tiny"),
        (str(tmp_path / "weights.safetensors"), None),
        (tmp_path / "weights.pt", None),
    ]:
        model = kind.cls.build(preset, checkpoint)
        # from_pretrained returns eval mode; a build is in train mode whatever its source.
        assert all(module.training for module in model.modules())
        model.eval()
        assert model.preset == "tiny"
        assert model.load_report.ignored == []
        assert_same(encode(model, batch), expected)


@KINDS
def test_pretraining_checkpoint_loads_with_its_heads_reported(kind, tmp_path):
    source = tiny(kind, seed=3)
    pretraining = kind.pretraining(inner(source, kind).config)
    getattr(pretraining, kind.attribute).load_state_dict(inner(source, kind).state_dict())
    pretraining.save_pretrained(tmp_path / "folder")
    state = {k: v.clone() for k, v in pretraining.state_dict().items()}
    save_file(state, tmp_path / "weights.safetensors")
    batch = make_batch(source)
    for checkpoint in (tmp_path / "folder", tmp_path / "weights.safetensors"):
        model = kind.cls.build("tiny", checkpoint).eval()
        ignored = model.load_report.ignored
        assert ignored and {key.split(".")[0] for key in ignored} == set(kind.heads)
        assert f"({', '.join(kind.heads)})" in str(model.load_report)
        assert_same(encode(model, batch), encode(source, batch))


class Payload:
    """Runs code when unpickled: a checkpoint must never get that far."""

    def __reduce__(self):
        return (time.sleep, (0,))


@KINDS
def test_checkpoints_that_do_not_fit_are_clear_errors(kind, tmp_path):
    state = {k: v.clone() for k, v in inner(tiny(kind), kind).state_dict().items()}
    missing = dict(state)
    missing.pop("pooler.dense.weight")
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(VLPruneError, match=r"backbone key pooler\.dense\.weight is missing"):
        kind.cls.build("tiny", tmp_path / "missing.safetensors")
    save_file({**state, "pooler.dense.weight": torch.zeros(3, 3)}, tmp_path / "shape.safetensors")
    with pytest.raises(VLPruneError, match=re.escape("pooler.dense.weight has shape (3, 3)")):
        kind.cls.build("tiny", tmp_path / "shape.safetensors")
    (tmp_path / "garbled.safetensors").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(VLPruneError, match=r"garbled\.safetensors: not a safetensors file or"):
        kind.cls.build("tiny", tmp_path / "garbled.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\x40" + bytes(7) + b'{"a": ')
    with pytest.raises(VLPruneError, match=r"cut\.safetensors: cannot read checkpoint"):
        kind.cls.build("tiny", tmp_path / "cut.safetensors")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"pooler.dense.weight": Payload()}, f, protocol=2)
    with pytest.raises(VLPruneError, match=r"evil\.pt: refused: the pickle names time\.sleep"):
        kind.cls.build("tiny", tmp_path / "evil.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VLPruneError, match=r"empty: a folder without config\.json"):
        kind.cls.build("tiny", tmp_path / "empty")
    (tmp_path / "config-only").mkdir()
    inner(tiny(kind), kind).config.save_pretrained(tmp_path / "config-only")
    with pytest.raises(VLPruneError, match=r"config-only: cannot load"):
        kind.cls.build("tiny", tmp_path / "config-only")
    with pytest.raises(
        VLPruneError, match=re.escape(f"{tmp_path / 'nowhere'}: no such checkpoint")
    ):
        kind.cls.build(kind.base, tmp_path / "nowhere")


@KINDS
def test_a_checkpoint_of_another_shape_does_not_pass_for_the_preset(kind, tmp_path):
    inner(tiny(kind), kind).save_pretrained(tmp_path / "tiny")
    with pytest.raises(
        VLPruneError, match=f"vocab_size is 138 but {kind.attribute}-{kind.base} has 30522"
    ):
        kind.cls.build(kind.base, tmp_path / "tiny")


@KINDS
def test_unknown_preset_lists_the_known_ones(kind):
    with pytest.raises(VLPruneError, match=f"choose from tiny, {kind.base}"):
        kind.cls.build("huge")


@KINDS
def test_ticket_round_trip_onto_a_fresh_build(kind, tmp_path):
    model = tiny(kind)
    GlobalMagnitude.prune_group(model.prunable(), 0.5)
    Ticket.from_model(model, model.prunable(), backbone=kind.attribute, preset="tiny").save(
        tmp_path / "t.safetensors"
    )
    ticket = Ticket.load(tmp_path / "t.safetensors")
    assert set(ticket.masks) == set(model.prunable_names())
    assert ticket.sparsity == pytest.approx(0.5, abs=1e-3)
    fresh = tiny(kind)
    ticket.apply(fresh)
    for (a, name), (b, _) in zip(model.prunable(), fresh.prunable(), strict=True):
        assert torch.equal(getattr(a, name + "_mask"), getattr(b, name + "_mask"))
    batch = make_batch(model)
    assert_same(encode(fresh, batch), encode(model, batch))


@KINDS
def test_perturbations_are_additive_and_differentiable(kind):
    model = tiny(kind)
    batch = make_batch(model)
    text_shape, image_shape = model.perturbation_shapes(batch)
    clean = encode(model, batch)
    assert_same(encode(model, batch, torch.zeros(text_shape), torch.zeros(image_shape)), clean)
    # Random deltas: a constant one on the words would vanish in the embedding LayerNorm.
    generator = torch.Generator().manual_seed(2)
    for text_scale, image_scale in [(0.5, 0.0), (0.0, 0.5)]:
        text_delta = (text_scale * torch.randn(text_shape, generator=generator)).requires_grad_()
        image_delta = (image_scale * torch.randn(image_shape, generator=generator)).requires_grad_()
        perturbed = encode(model, batch, text_delta, image_delta).pooled
        assert not torch.allclose(clean.pooled, perturbed, atol=1e-4)
        perturbed.sum().backward()
        assert text_delta.grad.abs().sum() > 0 and image_delta.grad.abs().sum() > 0
    # The hook that adds ViLT's image delta is gone after the call.
    assert_same(encode(model, batch), clean)


def test_lxmert_padded_regions_do_not_change_the_output():
    model = tiny(LXMERT)
    batch = make_batch(model)
    before = model(batch).pooled[1]
    batch.region_feats[1, -2:] = 100.0
    assert torch.allclose(model(batch).pooled[1], before, atol=1e-5)


def test_lxmert_masked_regions_are_zeroed():
    model = tiny(LXMERT)
    batch = make_batch(model)
    clean = model(batch).pooled
    batch.masked_regions = torch.zeros(2, REGIONS, dtype=torch.bool)
    batch.masked_regions[:, 0] = True
    masked = model(batch).pooled
    assert not torch.allclose(masked, clean, atol=1e-4)
    batch.masked_regions = None
    batch.region_feats[:, 0] = 0
    assert torch.allclose(model(batch).pooled, masked, atol=1e-6)


def test_lxmert_image_types_are_a_no_op():
    model = tiny(LXMERT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.ensure_image_types(2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_vilt_grows_image_types_from_the_first_image(tmp_path):
    model = tiny(VILT)
    batch = make_batch(model)
    first = encode(model, batch)
    model.ensure_image_types(2)  # tiny is born with text + two image types
    assert model.vilt.embeddings.token_type_embeddings.num_embeddings == 3
    batch.image_type = 2
    assert not torch.allclose(encode(model, batch).pooled, first.pooled, atol=1e-4)
    model.ensure_image_types(3)
    types = model.vilt.embeddings.token_type_embeddings.weight
    assert types.shape[0] == 4 and torch.equal(types[3], types[1])
    batch.image_type = 3
    assert_same(encode(model, batch), first)
    model.vilt.save_pretrained(tmp_path / "grown")
    assert Vilt.build("tiny", tmp_path / "grown").vilt.config.modality_type_vocab_size == 4


def test_vilt_without_a_pixel_mask_sees_the_whole_image():
    model = tiny(VILT)
    batch = make_batch(model)
    batch.pixel_values = torch.randn(2, 3, 96, 64)
    batch.pixel_mask = None
    unmasked = encode(model, batch)
    batch.pixel_mask = torch.ones(2, 96, 64, dtype=torch.long)
    assert_same(encode(model, batch), unmasked)


@KINDS
def test_a_local_folder_brings_its_own_architecture_tokenizer_and_processor(
    kind, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    small = tiny(kind)
    config = copy.deepcopy(inner(small, kind).config)
    config.hidden_size, config.num_attention_heads, config.intermediate_size = 64, 2, 96
    type(inner(small, kind))(config).save_pretrained(tmp_path)
    small.tokenizer.save_pretrained(tmp_path)
    if kind is VILT:
        small.image_processor.save_pretrained(tmp_path)
    # No preset: the checkpoint's config is taken as it is, named after the closest preset, and
    # the tokenizer (and image processor) come from the folder, not from the hub.
    model = kind.cls.build(checkpoint=tmp_path).eval()
    assert (model.preset, model.hidden_size) == (kind.base, 64)
    assert model.tokenizer(SENTENCES[0])["input_ids"] == small.tokenizer(SENTENCES[0])["input_ids"]
    assert model(make_batch(model)).pooled.shape == (2, 64)


@KINDS
def test_hub_ids_offline_fail_fast_with_one_clear_line(kind, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(VLPruneError, match=f"cannot download {kind.hub_id}: no network"):
        kind.cls.build(kind.base, kind.hub_id)
    with torch.device("meta"):
        model = kind.cls(kind.base)
    with pytest.raises(VLPruneError, match=f"cannot download {kind.hub_id}: no network"):
        model.tokenizer  # noqa: B018
    if kind is VILT:  # ViLT's preprocessing needs no download: it is made from the image size
        assert model.image_processor.size == {"shortest_edge": 384}
    assert time.perf_counter() - start < 10
