"""LXMERT's original release (`Epoch20_LXRT.pth`, keys `module.bert.*` and pre-training heads)
loads into the `lxmert` backbone and computes what the original architecture computes.

Fixtures come from tests/lxmert_original.py, an independent writer of that layout with a
forward pass written from airsplay/lxmert's `src/lxrt/modeling.py`.
"""

import re

import pytest
import torch
from click.testing import CliRunner
from lxmert_original import original_forward, write_original_lxmert

from vl_prune.backbone import VLBatch
from vl_prune.errors import VLPruneError
from vl_prune_cli.main import cli
from vl_prune_plugins.backbones.lxmert import Lxmert
from vl_prune_plugins.world.vocabulary import words

# Several layers of each kind, on the tiny preset's width; a vocabulary that is not the world's.
LAYERS = dict(l_layers=3, x_layers=2, r_layers=2)
VOCAB = 1000
HEADS = ("answer_head", "cls", "obj_predict_head")

# Tiny matrices: one thread is faster than two spinning ones (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """An original-layout checkpoint with its heads, and the state dict written to it."""
    path = tmp_path_factory.mktemp("lxmert") / "Epoch20_LXRT.pth"
    return path, write_original_lxmert(path, vocab=VOCAB, **LAYERS)


def padded_batch(vocab: int = VOCAB) -> VLBatch:
    """Three examples, two with padded text and two with padded regions, both token types."""
    generator = torch.Generator().manual_seed(1)
    text_mask = torch.ones(3, 9, dtype=torch.long)
    text_mask[1, 6:], text_mask[2, 4:] = 0, 0
    region_mask = torch.ones(3, 7, dtype=torch.long)
    region_mask[0, 5:], region_mask[2, 3:] = 0, 0
    return VLBatch(
        input_ids=torch.randint(1, vocab, (3, 9), generator=generator) * text_mask,
        attention_mask=text_mask,
        token_type_ids=torch.randint(0, 2, (3, 9), generator=generator),
        region_feats=torch.randn(3, 7, 64, generator=generator),
        region_boxes=torch.rand(3, 7, 6, generator=generator),
        region_mask=region_mask,
    )


def reference(state, batch: VLBatch, masks: bool = True):
    return original_forward(
        state,
        batch.input_ids,
        batch.token_type_ids,
        batch.attention_mask if masks else torch.ones_like(batch.attention_mask),
        batch.region_feats,
        batch.region_boxes[..., :4],
        batch.region_mask if masks else None,
    )


def assert_matches_original(model: Lxmert, state) -> None:
    batch = padded_batch(model.vocab_size)
    with torch.no_grad():
        out = model.eval()(batch)
        expected = reference(state, batch)
    got = (out.text_states, out.image_states, out.pooled)
    for name, mine, theirs in zip(("language", "vision", "pooled"), got, expected, strict=True):
        assert (mine - theirs).abs().max() <= 1e-5, name


def test_the_release_computes_what_the_original_architecture_computes(release):
    path, state = release
    model = Lxmert.build(None, path)
    assert model.training  # a build is in train mode whatever its source
    config = model.lxmert.config
    assert (config.l_layers, config.x_layers, config.r_layers) == (3, 2, 2)
    assert (config.vocab_size, config.hidden_size, config.visual_feat_dim) == (VOCAB, 128, 64)
    assert model.preset == "tiny"  # named after the preset of its width
    assert_matches_original(model, state)
    # The masks change the result, so the comparison above covers them.
    batch = padded_batch()
    pooled, unmasked = reference(state, batch)[2], reference(state, batch, masks=False)[2]
    assert (pooled - unmasked).abs().max() > 1e-2


def test_every_tensor_is_loaded_or_reported_as_an_ignored_head(release):
    path, state = release
    report = Lxmert.build(None, path).load_report
    backbone = {k.removeprefix("module.bert."): v for k, v in state.items() if ".bert." in k}
    heads = sorted(k.removeprefix("module.") for k in state if ".bert." not in k)
    assert len(backbone) + len(heads) == len(state)
    assert {k.split(".")[0] for k in heads} == set(HEADS)
    assert sorted(report.ignored) == heads
    assert report.converted == [
        f"{len(state)} 'module.' prefixes (DataParallel) dropped",
        f"{len(backbone)} 'bert.' prefixes (LXMERT's original layout) dropped",
    ]
    assert f"ignored {len(heads)} non-backbone keys (answer_head, cls, obj_predict_head)" in str(
        report
    )
    loaded = Lxmert.build(None, path).lxmert.state_dict()
    assert loaded.keys() == backbone.keys()
    assert all(torch.equal(loaded[key], value) for key, value in backbone.items())


def test_a_save_without_dataparallel_and_heads_loads_too(release, tmp_path):
    """`src/lxrt/entry.py` saves the backbone as `bert.*`, with no `module.` and no heads."""
    _, state = release
    bare = {k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.bert.")}
    torch.save(bare, tmp_path / "model_LXRT.pth")
    model = Lxmert.build(None, tmp_path / "model_LXRT.pth")
    assert model.load_report.ignored == []
    assert model.load_report.converted == [
        f"{len(bare)} 'bert.' prefixes (LXMERT's original layout) dropped"
    ]
    assert_matches_original(model, bare)


def test_the_tiny_preset_takes_a_release_of_its_shape(tmp_path):
    path = tmp_path / "tiny.pth"
    state = write_original_lxmert(path, vocab=len(words()), heads_too=False)
    model = Lxmert.build("tiny", path)
    assert model.preset == "tiny" and model.tokenizer is not None  # the world's tokenizer
    assert_matches_original(model, state)
    deeper = tmp_path / "deeper.pth"
    write_original_lxmert(deeper, vocab=len(words()), heads_too=False, **LAYERS)
    key = "module.bert.encoder.layer.2.attention.self.query.weight"
    with pytest.raises(VLPruneError, match=re.escape(f"cannot map key {key} onto the lxmert")):
        Lxmert.build("tiny", deeper)


@pytest.mark.parametrize(
    "key",
    ["module.bert.encoder.layer.0.attention.self.gate.weight", "module.logit_fc.0.weight"],
)
def test_an_unknown_key_is_refused_by_name(release, tmp_path, key):
    path = tmp_path / "extra.pth"
    torch.save({**release[1], key: torch.zeros(4, 4)}, path)
    with pytest.raises(VLPruneError, match=re.escape(f"{path}: cannot map key {key} onto")):
        Lxmert.build(None, path)


@pytest.mark.parametrize(
    "key",
    [
        "module.bert.encoder.x_layers.1.visual_attention.output.LayerNorm.bias",
        "module.bert.embeddings.word_embeddings.weight",
        "module.bert.pooler.dense.weight",
    ],
)
def test_a_missing_backbone_key_is_named(release, tmp_path, key):
    path = tmp_path / "missing.pth"
    torch.save({k: v for k, v in release[1].items() if k != key}, path)
    with pytest.raises(VLPruneError, match=re.escape(f"{path}: backbone key {key} is missing")):
        Lxmert.build(None, path)


def test_a_wrong_shape_and_a_width_without_preset_are_clear_errors(release, tmp_path):
    key = "module.bert.encoder.r_layers.1.output.dense.weight"
    torch.save({**release[1], key: torch.zeros(3, 3)}, tmp_path / "shape.pth")
    message = f"{key} has shape (3, 3), the model expects (128, 256)"
    with pytest.raises(VLPruneError, match=re.escape(message)):
        Lxmert.build(None, tmp_path / "shape.pth")
    # No preset has width 100: the largest one's 12 heads do not divide it.
    write_original_lxmert(tmp_path / "odd.pth", hidden=100, heads=4, vocab=50)
    with pytest.raises(VLPruneError, match=r"odd\.pth: cannot build its LxmertModel"):
        Lxmert.build(None, tmp_path / "odd.pth")


def test_the_cli_refuses_an_unmappable_key_in_one_line(release, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({**release[1], "module.logit_fc.0.weight": torch.zeros(4, 4)}, bad)
    args = ["evaluate", "--model", "lxmert", "--task", "nlvr2", "--checkpoint", str(bad)]
    result = CliRunner().invoke(cli, [*args, "--finetuned", str(tmp_path / "finetuned.pt")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert f"{bad}: cannot map key module.logit_fc.0.weight onto the lxmert backbone" in (
        result.stderr
    )
