"""examples/visualbert-plugin, the worked example of a third-party backbone, really installed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vl_prune import Ticket, registry
from vl_prune.backbone import Backbone, VLBatch
from vl_prune.errors import VLPruneError
from vl_prune.pruning import GlobalMagnitude
from vl_prune.ticket import current_weights, fingerprint

EXAMPLE = Path(__file__).parents[1] / "examples" / "visualbert-plugin"
LAYER_MATRICES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


@pytest.fixture(scope="module", autouse=True)
def visualbert_site(tmp_path_factory):
    """The example distribution installed by pip into a temporary folder, on sys.path and
    PYTHONPATH for this module's tests (and their subprocesses) only.

    pip builds from a copy, so the build leaves no build/ or egg-info in examples/.
    """
    source = tmp_path_factory.mktemp("visualbert-src") / "visualbert-plugin"
    shutil.copytree(
        EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    target = tmp_path_factory.mktemp("visualbert-site")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"),
            *("--no-build-isolation", "--target", str(target), str(source)),
        ],
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(target))
        path = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
        patch.setenv("PYTHONPATH", path)
        yield target
        for name in [m for m in sys.modules if m.partition(".")[0] == "vlprune_visualbert"]:
            del sys.modules[name]


def visualbert() -> type[Backbone]:
    return registry.load("backbones", "visualbert")


def tiny(seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    return visualbert().build("tiny")


def make_batch(model: Backbone, regions: int = 6) -> VLBatch:
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


def test_vlprune_list_shows_the_example_backbone_and_its_distribution():
    done = subprocess.run(
        ["vlprune", "list", "backbones", "--json"], capture_output=True, text=True, check=True
    )
    rows = {row["name"]: row for row in json.loads(done.stdout)["backbones"]}
    row = rows["visualbert"]
    assert row["error"] is None
    assert row["distribution"] == "vlprune-visualbert"
    assert row["target"] == "vlprune_visualbert:VisualBert"
    assert row["presets"] == "tiny, base"
    assert row["input"] == "regions"
    assert row["description"].startswith("VisualBERT")


def test_the_backbone_comes_from_the_pip_installed_distribution(visualbert_site):
    module = sys.modules[visualbert().__module__]
    assert Path(module.__file__).is_relative_to(visualbert_site)


def test_tiny_runs_forward_and_backward_with_perturbations():
    model = tiny().train()
    assert model.preset == "tiny" and model.image_input == "regions"
    batch = make_batch(model)
    text_shape, image_shape = model.perturbation_shapes(batch)
    text_delta = torch.zeros(text_shape, requires_grad=True)
    image_delta = torch.zeros(image_shape, requires_grad=True)
    out = model(batch, text_delta, image_delta)
    length = batch.input_ids.shape[1]
    assert out.text_states.shape == (2, length, model.hidden_size)
    assert out.image_states.shape == (2, 6, model.hidden_size)
    assert out.pooled.shape == (2, model.hidden_size)
    out.pooled.square().sum().backward()
    for module, name in model.prunable():
        assert getattr(module, name).grad is not None
    # Adversarial training ascends on these gradients; padded regions get none.
    assert text_delta.grad.abs().sum() > 0
    assert image_delta.grad[0].abs().sum() > 0
    assert torch.equal(image_delta.grad[1, -2:], torch.zeros_like(image_delta.grad[1, -2:]))


def test_deltas_are_added_to_word_embeddings_and_region_features():
    model = tiny().eval()
    batch = make_batch(model)
    swapped = batch.input_ids.clone()
    swapped[:, 1] = model.tokenizer.convert_tokens_to_ids("green")
    words = model.visual_bert.embeddings.word_embeddings
    text_delta = (words(swapped) - words(batch.input_ids)).detach()
    image_delta = torch.randn(model.perturbation_shapes(batch)[1])
    perturbed = model(batch, text_delta, image_delta).pooled
    batch.input_ids = swapped
    batch.region_feats = batch.region_feats.float() + image_delta
    assert torch.allclose(model(batch).pooled, perturbed, atol=1e-6)


def test_prunable_is_every_layer_linear_weight_and_the_pooler_only():
    model = tiny()
    names = model.prunable_names()
    expected = [
        f"visual_bert.encoder.layer.{i}.{matrix}.weight"
        for i in range(2)
        for matrix in LAYER_MATRICES
    ]
    assert names == [*expected, "visual_bert.pooler.dense.weight"]
    assert all(
        isinstance(module, nn.Linear) and name == "weight" for module, name in model.prunable()
    )
    assert not any("embeddings" in n or "LayerNorm" in n or n.endswith(".bias") for n in names)
    # The visual projection is a linear layer, but an embedding: it stays dense.
    assert "visual_bert.embeddings.visual_projection.weight" in dict(model.named_parameters())


def test_a_ticket_round_trips_onto_a_fresh_tiny_visualbert(tmp_path):
    model = tiny(seed=3).eval()
    names = model.prunable_names()
    theta0 = fingerprint(current_weights(model, names))
    GlobalMagnitude.prune_group(model.prunable(), 0.5)
    ticket = Ticket.from_model(
        model, model.prunable(), backbone="visualbert", preset="tiny", weights_fingerprint=theta0
    )
    assert list(ticket.masks) == names
    assert ticket.sparsity == pytest.approx(0.5, abs=1e-6)
    ticket.save(tmp_path / "visualbert.safetensors")

    fresh = tiny(seed=3).eval()
    Ticket.load(tmp_path / "visualbert.safetensors").apply(fresh, strict=True)
    applied = Ticket.from_model(fresh, fresh.prunable())
    assert applied.masks.keys() == ticket.masks.keys()
    assert all(torch.equal(applied.masks[n], ticket.masks[n]) for n in names)
    batch = make_batch(model)
    assert torch.equal(fresh(batch).pooled, model(batch).pooled)


def test_weights_load_from_a_save_pretrained_folder_heads_ignored(tmp_path):
    from transformers import VisualBertForPreTraining

    model = tiny().eval()
    with_heads = VisualBertForPreTraining(model.visual_bert.config)
    with_heads.visual_bert.load_state_dict(model.visual_bert.state_dict())
    with_heads.save_pretrained(tmp_path)

    loaded = visualbert().build(checkpoint=tmp_path).eval()
    assert loaded.preset == "tiny"
    assert loaded.load_report.ignored and all(
        k.startswith("cls.") for k in loaded.load_report.ignored
    )
    batch = make_batch(model)
    assert torch.equal(loaded(batch).pooled, model(batch).pooled)


def test_a_checkpoint_of_another_size_is_refused_for_a_preset(tmp_path):
    tiny().visual_bert.save_pretrained(tmp_path)
    with pytest.raises(VLPruneError, match="vocab_size is 138, visualbert-base has 30522"):
        visualbert().build("base", checkpoint=tmp_path)


def test_a_hub_id_offline_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VLPruneError, match="cannot download uclanlp/visualbert-vqa-coco-pre"):
        visualbert().build(checkpoint="uclanlp/visualbert-vqa-coco-pre")


def test_masked_regions_are_seen_as_zero_features():
    model = tiny().eval()
    batch = make_batch(model)
    batch.masked_regions = torch.zeros(2, 6, dtype=torch.bool)
    batch.masked_regions[0, 2] = True
    masked = model(batch).pooled
    batch.masked_regions = None
    batch.region_feats[0, 2] = 0
    assert torch.equal(model(batch).pooled, masked)


def test_a_second_image_type_starts_as_a_copy_of_the_first():
    model = tiny().eval()
    batch = make_batch(model)
    first = model(batch).pooled
    model.ensure_image_types(2)
    batch.image_type = 2
    assert torch.equal(model(batch).pooled, first)


def test_base_preset_has_the_paper_count_of_prunable_weights():
    torch.manual_seed(0)
    model = visualbert().build("base")
    assert len(model.prunable()) == 12 * 6 + 1
    assert sum(module.weight.numel() for module, _ in model.prunable()) == 85_524_480
    assert model.img_dim == 2048
