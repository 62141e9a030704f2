import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import vl_prune_plugins.world.splits.nlvr2 as nlvr2
import vl_prune_plugins.world.splits.pretrain as pretrain
from vl_prune import registry
from vl_prune.errors import VLPruneError
from vl_prune.task import VLModel
from vl_prune.ticket import fingerprint
from vl_prune.train import TrainSettings, evaluate, fit, make_accelerator
from vl_prune_cli.main import cli
from vl_prune_plugins.tasks.pretrain import IGNORE, Pretrain
from vl_prune_plugins.world.theta0 import pretrained_tiny


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain-world")
    sizes = pretrain.WORLD_SIZES
    pretrain.WORLD_SIZES = {"train": 400, "dev": 100}
    try:
        pretrain.write(root)
    finally:
        pretrain.WORLD_SIZES = sizes
    return root


def tiny(name: str):
    torch.manual_seed(0)
    return registry.load("backbones", name).build("tiny")


def test_reads_karpathy_split_json(tmp_path):
    images = [
        {
            "sentids": [0, 1],
            "imgid": 0,
            "sentences": [
                {"tokens": ["a", "red", "star"], "raw": "A red star .", "imgid": 0, "sentid": 0},
                {"tokens": ["a", "star"], "raw": "A star", "imgid": 0, "sentid": 1},
            ],
            "split": "train",
            "filename": "1000092795.jpg",
        },
        {"sentids": [], "imgid": 1, "sentences": [], "split": "test", "filename": "2.jpg"},
    ]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    with pytest.raises(VLPruneError, match=r"images\[0\] \(1000092795.jpg\): image 1000092795 is"):
        Pretrain(tmp_path).examples("train")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "1000092795.png")
    captions = Pretrain(tmp_path).examples("train")
    assert [(c.text, c.image) for c in captions] == [
        ("A red star .", "1000092795"),
        ("A star", "1000092795"),
    ]
    with pytest.raises(VLPruneError, match="no captions in split 'dev'"):
        Pretrain(tmp_path).examples("dev")
    images[0]["sentences"][0].pop("raw")
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    with pytest.raises(VLPruneError, match=r"sentences\[0\]: field 'raw' is missing"):
        Pretrain(tmp_path).examples("train")


@pytest.mark.parametrize("name", ["uniter", "lxmert", "vilt"])
def test_collate_masks_words_pairs_and_regions(world, name):
    backbone = tiny(name)
    task = Pretrain(world)
    examples = task.examples("train")[:64]
    torch.manual_seed(3)
    batch = task.collate(examples, backbone)
    targets = batch.targets
    inputs = batch.inputs[0]
    assert 0 < targets["itm"].sum() < len(examples)
    labelled = targets["mlm"] != IGNORE
    assert labelled.any()
    assert not labelled[targets["itm"] == 0].any(), "MLM only on matched pairs"
    mask_id = backbone.tokenizer.mask_token_id
    assert (inputs.input_ids[labelled] == mask_id).float().mean() > 0.5
    if backbone.image_input == "regions":
        masked = targets["mrfr_mask"]
        assert masked.any() and torch.equal(inputs.masked_regions, masked)
        assert inputs.region_feats[masked].abs().sum() == 0
        assert targets["mrfr"][masked].abs().sum() > 0
    else:
        assert "mrfr" not in targets
    outputs = task.head(backbone)(backbone, batch.inputs)
    assert torch.isfinite(task.loss(outputs, targets))


def test_pretraining_beats_an_untrained_model(world):
    task = Pretrain(world)
    backbone = tiny("uniter")
    settings = TrainSettings(steps=60, batch_size=32, lr=1e-3)
    accelerator = make_accelerator(settings)
    model = accelerator.prepare(VLModel(backbone, task.head(backbone)))
    dev = task.examples("dev")
    torch.manual_seed(1)
    before = evaluate(model, task, dev, settings, accelerator)
    fit(model, task, task.examples("train"), settings, accelerator, quiet=True)
    torch.manual_seed(1)
    after = evaluate(model, task, dev, settings, accelerator)
    assert after > before + 0.1


def test_theta0_is_reproducible_and_cached(world, tmp_path, monkeypatch):
    settings = TrainSettings(steps=3, batch_size=8, lr=1e-3, seed=5)
    sizes = pretrain.WORLD_SIZES
    monkeypatch.setattr(pretrain, "WORLD_SIZES", {"train": 40, "dev": 8})
    prints = []
    for run in ("a", "b"):
        monkeypatch.setenv("VL_PRUNE_HOME", str(tmp_path / run))
        backbone = pretrained_tiny(registry.load("backbones", "uniter"), "uniter", settings)
        prints.append(fingerprint(dict(backbone.state_dict())))
    assert prints[0] == prints[1]
    assert prints[0] != fingerprint(dict(tiny("uniter").state_dict()))
    cached = next((tmp_path / "b" / "theta0").glob("uniter-tiny-*.safetensors"))
    stamp = cached.stat().st_mtime_ns
    again = pretrained_tiny(registry.load("backbones", "uniter"), "uniter", settings)
    assert cached.stat().st_mtime_ns == stamp
    assert fingerprint(dict(again.state_dict())) == prints[1]
    assert sizes == {"train": 3000, "dev": 500}


def test_data_world_writes_an_official_split(tmp_path, monkeypatch):
    monkeypatch.setattr(nlvr2, "WORLD_SIZES", {"train": 8, "dev": 4})
    result = CliRunner().invoke(
        cli, ["data", "world", "--task", "nlvr2", "--out", str(tmp_path / "w")]
    )
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "w" / "train.json").read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[0])["label"] in ("True", "False")
    with np.load(tmp_path / "w" / "features" / "train-0-0-img0.npz") as npz:
        assert npz["features"].dtype == np.float16
    again = CliRunner().invoke(
        cli, ["data", "world", "--task", "nlvr2", "--out", str(tmp_path / "w")]
    )
    assert again.exit_code == 2 and "not empty" in again.stderr
