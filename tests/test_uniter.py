import pickle
import re
import time

import pytest
import torch
from safetensors.torch import save_file

from vl_prune import Ticket
from vl_prune.backbone import VLBatch
from vl_prune.errors import VLPruneError
from vl_prune.pruning import GlobalMagnitude
from vl_prune_plugins.backbones.uniter import Uniter

LAYER_MATRICES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


def tiny(seed: int = 0) -> Uniter:
    torch.manual_seed(seed)
    return Uniter.build("tiny").eval()


def make_batch(model: Uniter, regions: int = 7) -> VLBatch:
    text = model.tokenizer(
        ["two red circles left of a star .", "is there a blue square ?"],
        padding=True,
        return_tensors="pt",
    )
    generator = torch.Generator().manual_seed(1)
    return VLBatch(
        input_ids=text["input_ids"],
        attention_mask=text["attention_mask"],
        region_feats=torch.randn(2, regions, model.img_dim, generator=generator).half(),
        region_boxes=torch.rand(2, regions, 6, generator=generator),
        region_mask=torch.tensor([[1] * regions, [1] * (regions - 2) + [0, 0]]),
    )


def original_checkpoint(model: Uniter, token_types: int = 2) -> dict[str, torch.Tensor]:
    """The model's weights under the original UNITER key names: `uniter.` prefix, old-style
    LayerNorm gamma/beta in the text embeddings, and pre-training / task heads beside them."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("embeddings.LayerNorm."):
            key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
        state["uniter." + key] = value.clone()
    types = state["uniter.embeddings.token_type_embeddings.weight"]
    state["uniter.embeddings.token_type_embeddings.weight"] = torch.cat(
        [types, types[1:].repeat(token_types - 2, 1)]
    )
    state["cls.predictions.bias"] = torch.zeros(model.embeddings.word_embeddings.num_embeddings)
    state["itm_output.weight"] = torch.zeros(2, model.hidden_size)
    state["nlvr2_output.0.weight"] = torch.zeros(model.hidden_size, 2 * model.hidden_size)
    return state


def test_tiny_runs_forward_and_backward_on_cpu():
    model = tiny().train()
    batch = make_batch(model)
    out = model(batch)
    length = batch.input_ids.shape[1]
    assert out.text_states.shape == (2, length, model.hidden_size)
    assert out.image_states.shape == (2, 7, model.hidden_size)
    assert out.pooled.shape == (2, model.hidden_size)
    out.pooled.square().sum().backward()
    for module, name in model.prunable():
        assert getattr(module, name).grad is not None


def test_padded_regions_do_not_change_the_output():
    model = tiny()
    batch = make_batch(model)
    before = model(batch).pooled[1]
    batch.region_feats[1, -2:] = 100.0
    assert torch.allclose(model(batch).pooled[1], before, atol=1e-5)


@pytest.mark.parametrize(
    ("preset", "matrices", "weights"),
    [("base", 73, 85_524_480), ("large", 145, 24 * (4 * 1024**2 + 2 * 1024 * 4096) + 1024**2)],
)
def test_prunable_set_is_the_papers(preset, matrices, weights):
    with torch.device("meta"):
        model = Uniter(preset)
    names = model.prunable_names()
    assert len(names) == matrices
    assert sum(getattr(m, n).numel() for m, n in model.prunable()) == weights
    layers = model.encoder.layer
    expected = [f"encoder.layer.{i}.{m}.weight" for i in range(len(layers)) for m in LAYER_MATRICES]
    assert names == [*expected, "pooler.dense.weight"]


@pytest.mark.parametrize("token_types", [2, 3])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_original_checkpoint_loads_with_nothing_missing(tmp_path, token_types, suffix):
    source = tiny(seed=3)
    state = original_checkpoint(source, token_types)
    path = tmp_path / f"uniter-tiny{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, path)
    model = Uniter.build(checkpoint=path).eval()
    assert model.embeddings.token_type_embeddings.num_embeddings == token_types
    assert sorted(model.load_report.ignored) == [
        "cls.predictions.bias",
        "itm_output.weight",
        "nlvr2_output.0.weight",
    ]
    assert "ignored 3 non-backbone keys (cls, itm_output, nlvr2_output)" in str(model.load_report)
    batch = make_batch(source)
    assert torch.allclose(model(batch).pooled, source(batch).pooled, atol=1e-6)


def test_checkpoint_with_explicit_preset(tmp_path):
    torch.save(original_checkpoint(tiny(seed=3)), tmp_path / "ckpt.pt")
    assert Uniter.build("tiny", tmp_path / "ckpt.pt").preset == "tiny"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: s.pop("uniter.encoder.layer.1.output.dense.weight"), "is missing"),
        (lambda s: s.update({"uniter.encoder.extra.weight": torch.zeros(1)}), "does not exist"),
        (
            lambda s: s.update({"uniter.pooler.dense.weight": torch.zeros(3, 3)}),
            "uniter.pooler.dense.weight has shape (3, 3)",
        ),
    ],
)
def test_checkpoint_that_does_not_fit_names_the_key(tmp_path, damage, message):
    state = original_checkpoint(tiny())
    damage(state)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(VLPruneError, match=re.escape(message)):
        Uniter.build("tiny", tmp_path / "bad.pt")


def test_unreadable_checkpoints_are_clear_errors(tmp_path):
    (tmp_path / "garbled.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(VLPruneError, match=r"garbled\.pt: not a safetensors file or torch check"):
        Uniter.build(checkpoint=tmp_path / "garbled.pt")
    (tmp_path / "cut.pt").write_bytes(pickle.dumps({"a": 1}, protocol=2)[:-3])
    with pytest.raises(VLPruneError, match=r"cut\.pt: cannot read checkpoint"):
        Uniter.build(checkpoint=tmp_path / "cut.pt")
    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(2, 2)}, tmp_path / "b.pt")
    with pytest.raises(VLPruneError, match="not a UNITER checkpoint"):
        Uniter.build(checkpoint=tmp_path / "b.pt")
    with pytest.raises(VLPruneError, match="no such checkpoint file"):
        Uniter.build(checkpoint=tmp_path / "missing.pt")
    with pytest.raises(VLPruneError, match="UNITER weights are files"):
        Uniter.build(checkpoint="some-org/uniter-base")


class Payload:
    def __reduce__(self):
        return (time.sleep, (0,))


def test_checkpoints_are_never_unpickled_beyond_tensors(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"uniter.x": Payload()}, f, protocol=2)
    with pytest.raises(VLPruneError, match=r"evil\.pt: refused: the pickle names time\.sleep"):
        Uniter.build(checkpoint=tmp_path / "evil.pt")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(VLPruneError, match="choose from tiny, base, large"):
        Uniter.build("huge")


def test_perturbations_are_additive_and_differentiable():
    model = tiny()
    batch = make_batch(model)
    text_shape, image_shape = model.perturbation_shapes(batch)
    clean = model(batch).pooled
    zero = model(batch, torch.zeros(text_shape), torch.zeros(image_shape)).pooled
    assert torch.allclose(clean, zero, atol=1e-6)
    text_delta = torch.full(text_shape, 0.05, requires_grad=True)
    image_delta = torch.full(image_shape, 0.05, requires_grad=True)
    perturbed = model(batch, text_delta, image_delta).pooled
    assert not torch.allclose(clean, perturbed, atol=1e-4)
    perturbed.sum().backward()
    assert text_delta.grad.abs().sum() > 0 and image_delta.grad.abs().sum() > 0


def test_masked_regions_get_the_mask_embedding():
    model = tiny()
    batch = make_batch(model)
    with torch.no_grad():
        model.img_embeddings.mask_embedding.weight[0] = 5.0  # row 0 must never be used
        model.img_embeddings.mask_embedding.weight[1] = 1.0
    clean = model(batch).pooled
    batch.masked_regions = torch.zeros(2, 7, dtype=torch.bool)
    assert torch.allclose(model(batch).pooled, clean, atol=1e-6)
    batch.masked_regions[:, 0] = True
    assert not torch.allclose(model(batch).pooled, clean, atol=1e-4)


def test_second_image_type_starts_as_a_copy_of_the_first():
    model = tiny()
    model.ensure_image_types(2)
    types = model.embeddings.token_type_embeddings.weight
    assert types.shape[0] == 3 and torch.equal(types[2], types[1])
    batch = make_batch(model)
    first = model(batch).pooled
    batch.image_type = 2
    assert torch.allclose(model(batch).pooled, first, atol=1e-6)


def test_ticket_from_uniter_applies_to_a_fresh_build(tmp_path):
    model = tiny()
    GlobalMagnitude.prune_group(model.prunable(), 0.6)
    Ticket.from_model(model, model.prunable(), backbone="uniter", preset="tiny").save(
        tmp_path / "t.safetensors"
    )
    ticket = Ticket.load(tmp_path / "t.safetensors")
    assert set(ticket.masks) == set(model.prunable_names())
    fresh = tiny()
    ticket.apply(fresh)
    for (a, name), (b, _) in zip(model.prunable(), fresh.prunable(), strict=True):
        assert torch.equal(getattr(a, name + "_mask"), getattr(b, name + "_mask"))
    batch = make_batch(model)
    assert torch.allclose(fresh(batch).pooled, model(batch).pooled, atol=1e-6)


def test_base_tokenizer_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with torch.device("meta"):
        model = Uniter("base")
    start = time.perf_counter()
    with pytest.raises(VLPruneError, match="cannot download bert-base-cased: no network"):
        model.tokenizer  # noqa: B018
    assert time.perf_counter() - start < 10


def test_bare_backbone_state_dict_loads(tmp_path):
    source = tiny(seed=4)
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "t.safetensors"
    )
    model = Uniter.build(checkpoint=tmp_path / "t.safetensors").eval()
    batch = make_batch(source)
    assert torch.allclose(model(batch).pooled, source(batch).pooled, atol=1e-6)
