"""`vlprune find` on LXMERT's data (TSV features, its json) and ViLT's (Arrow tables), each
data format serving every backbone of its image input, and damaged files failing in one line
that names the file and the line or column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from lxmert_vilt_folders import (
    lxmert_nlvr2,
    lxmert_vqa,
    vilt_karpathy,
    vilt_nlvr2,
    vilt_vqa,
    write_table,
)
from safetensors.torch import save_file
from uniter_folders import write_folder

from vl_prune.data.inputs import ImageStore, encode
from vl_prune_cli.main import cli
from vl_prune_plugins.backbones.lxmert import Lxmert
from vl_prune_plugins.backbones.uniter import Uniter
from vl_prune_plugins.backbones.vilt import Vilt
from vl_prune_plugins.tasks.nlvr2 import Nlvr2

pytest.importorskip("pyarrow")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VL_PRUNE_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Freshly initialised tiny backbones saved as checkpoints (world vocabulary, 64-d regions,
    64-pixel images)."""
    folder = tmp_path_factory.mktemp("tiny")
    save_file(Uniter.build("tiny").state_dict(), folder / "uniter.safetensors")
    Lxmert.build("tiny").lxmert.save_pretrained(folder / "lxmert")
    Vilt.build("tiny").vilt.save_pretrained(folder / "vilt")
    return {
        "uniter": folder / "uniter.safetensors",
        "lxmert": folder / "lxmert",
        "vilt": folder / "vilt",
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        "lxmert-vqa": lxmert_vqa(root / "lxmert-vqa"),
        "lxmert-nlvr2": lxmert_nlvr2(root / "lxmert-nlvr2"),
        "vilt-nlvr2": vilt_nlvr2(root / "vilt-nlvr2"),
        "vilt-vqa": vilt_vqa(root / "vilt-vqa"),
        "vilt-retrieval": vilt_karpathy(root / "vilt-retrieval"),
        "vilt-pretrain": vilt_karpathy(root / "vilt-pretrain", "coco"),
        "uniter-nlvr2": write_folder(root / "uniter-nlvr2", "nlvr2", release=False),
    }


def find(tmp_path: Path, model: str, task: str, checkpoint: Path, data: Path, *more: str):
    args = ["find", "--model", model, "--task", task, "--checkpoint", str(checkpoint)]
    args += ["--data", str(data), "--steps", "2", "--sparsity", "0.1", "--batch-size", "4"]
    return CliRunner().invoke(cli, [*args, *more, "--runs", str(tmp_path / "runs"), "--json"])


@pytest.mark.parametrize(
    ("model", "task", "data"),
    [
        ("lxmert", "vqa", "lxmert-vqa"),
        ("uniter", "vqa", "lxmert-vqa"),  # LXMERT's TSV features serve UNITER
        ("lxmert", "nlvr2", "lxmert-nlvr2"),
        ("lxmert", "nlvr2", "uniter-nlvr2"),  # UNITER's img_db serves LXMERT
        ("vilt", "nlvr2", "vilt-nlvr2"),
        ("vilt", "vqa", "vilt-vqa"),
        ("vilt", "retrieval", "vilt-retrieval"),
        ("vilt", "pretrain", "vilt-pretrain"),
    ],
)
def test_find_on_lxmert_and_vilt_data(model, task, data, tiny, folders, tmp_path):
    result = find(tmp_path, model, task, tiny[model], folders[data])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert f"data: {task} " in result.stderr


def test_the_splits_lxmert_and_vilt_train_and_score_on(tiny, folders, tmp_path):
    lxmert = find(tmp_path / "a", "lxmert", "nlvr2", tiny["lxmert"], folders["lxmert-nlvr2"])
    assert "data: nlvr2 train (8 examples), scored on valid (8)" in lxmert.stderr
    vilt = find(tmp_path / "b", "vilt", "vqa", tiny["vilt"], folders["vilt-vqa"])
    assert "data: vqa train+trainable_val (12 examples), scored on rest_val (6)" in vilt.stderr


def test_region_backbones_cannot_read_vilts_pictures(tiny, folders, tmp_path):
    result = find(tmp_path, "uniter", "nlvr2", tiny["uniter"], folders["vilt-nlvr2"])
    assert result.exit_code == 2
    assert "ViLT's tables hold pictures, not the region features" in result.output


def test_a_damaged_tsv_line_names_the_file_and_line(tiny, folders, tmp_path):
    data = tmp_path / "data"
    tsv = lxmert_vqa(data) / "mscoco_imgfeat" / "train2014_obj36.tsv"
    lines = tsv.read_bytes().split(b"\r\n")
    fields = lines[0].split(b"\t")
    fields[9] = fields[9][:-8]  # the features cut short
    tsv.write_bytes(b"\r\n".join([b"\t".join(fields), *lines[1:]]))
    result = find(tmp_path, "lxmert", "vqa", tiny["lxmert"], data)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    message = "image 'COCO_train2014_000000000001': field 'features' is not base64 of 36 rows"
    assert f"{tsv}:1: {message} of float32" in result.output
    assert not (tmp_path / "runs").exists()


def test_a_table_without_a_column_names_the_file_and_column(tiny, folders, tmp_path):
    data = tmp_path / "data"
    vilt_nlvr2(data)
    write_table(data / "nlvr2_dev.arrow", {"identifier": ["dev-0-0"], "image_0": [b""]})
    result = find(tmp_path, "vilt", "nlvr2", tiny["vilt"], data)
    assert result.exit_code == 2, result.output
    assert f"{data / 'nlvr2_dev.arrow'}: no column 'image_1'" in result.output
    assert not (tmp_path / "runs").exists()


def test_tsv_files_are_indexed_once_and_read_by_line(folders, tmp_path, monkeypatch):
    import vl_prune.data.tsv as tsv_module
    from vl_prune.data.tsv import TsvFeatures

    tsv = folders["lxmert-vqa"] / "mscoco_imgfeat" / "val2014_obj36.tsv"
    assert len(TsvFeatures(tsv).lines) == 4
    assert not (tmp_path / "home" / "tsv_index").exists(), "a small file is scanned, not indexed"
    monkeypatch.setattr(tsv_module, "INDEXED_BYTES", 0)  # as if it were LXMERT's size
    first = TsvFeatures(tsv)
    assert list(first.lines) == [f"COCO_val2014_{500 + i:012d}" for i in range(4)]
    index = list((tmp_path / "home" / "tsv_index").iterdir())
    assert len(index) == 1
    regions = TsvFeatures(tsv).regions("COCO_val2014_000000000502")
    assert regions["features"].shape == (36, 64)
    boxes = regions["norm_bb"]
    assert (boxes[:, :4] >= 0).all() and (boxes[:, :4] <= 1).all()
    assert (abs(boxes[:, 4] - (boxes[:, 2] - boxes[:, 0])) < 1e-6).all()


#: a bert-base-uncased-style WordPiece vocabulary of a few words (the checkpoints have 30,522)
WORDS = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS += ["is", "it", "sunny", "?", "there", "are", "two", "dogs", ".", "one", "image", "red"]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "vocab.txt"
    path.write_text("\n".join(WORDS) + "\n")
    return path


def test_find_lxmert_from_its_original_release_on_its_data(folders, vocab, tmp_path):
    """`Epoch20_LXRT.pth`'s layout (`module.bert.*` and heads) on LXMERT's VQA json and TSV."""
    from lxmert_original import write_original_lxmert

    original = tmp_path / "Epoch20_LXRT.pth"
    write_original_lxmert(original, visual_feat_dim=64)
    result = find(
        tmp_path, "lxmert", "vqa", original, folders["lxmert-vqa"], "--tokenizer", str(vocab)
    )
    assert result.exit_code == 0, result.output
    assert [r["round"] for r in json.loads(result.stdout)["rounds"]] == [0, 1]
    assert f"loaded {original}: ignored " in result.stderr
    assert "Loading weights" not in result.output  # transformers' progress bar is kept quiet


def test_find_vilt_from_its_original_release_on_its_tables(folders, vocab, tmp_path):
    """A Lightning `.ckpt` in ViLT's layout (timm names, fused qkv) on ViLT's NLVR2 tables."""
    from vilt_original import write_original_vilt

    original = tmp_path / "vilt_200k_mlm_itm.ckpt"
    write_original_vilt(original)
    args = ("--tokenizer", str(vocab))
    result = find(tmp_path, "vilt", "nlvr2", original, folders["vilt-nlvr2"], *args)
    assert result.exit_code == 0, result.output
    assert [r["round"] for r in json.loads(result.stdout)["rounds"]] == [0, 1]
    assert "fused attn.qkv tensors → query/key/value" in result.stderr


def test_texts_are_cut_to_the_backbones_positions(folders):
    """ViLT reads 40 text positions (the tiny preset 64): a longer text is cut, [SEP] kept."""
    vilt = Vilt.build("tiny")
    nlvr2 = folders["vilt-nlvr2"]
    image = Nlvr2(nlvr2).examples("dev")[0].left
    batch = encode(["a red circle ." * 40], [image], vilt, ImageStore(nlvr2), max_length=200)
    assert batch.input_ids.shape == (1, vilt.max_positions)
    assert batch.input_ids[0, -1] == vilt.tokenizer.sep_token_id
    assert vilt(batch).pooled.shape == (1, vilt.hidden_size)


def _null_question(rows: dict) -> None:
    rows["questions"][1] = None


def _questions_as_strings(rows: dict) -> None:  # a string where ViLT's writer puts a list
    rows["questions"] = [" ".join(q) for q in rows["questions"]]


def _null_score(rows: dict) -> None:
    rows["answer_scores"][1] = [[1.0], [None, 0.3]]


@pytest.mark.parametrize(
    ("damage", "column", "kind"),
    [
        (_null_question, "questions", "[str]"),
        (_questions_as_strings, "questions", "[str]"),
        (_null_score, "answer_scores", "[[float]]"),
    ],
)
def test_a_table_value_of_the_wrong_kind_names_file_row_and_column(
    tiny, tmp_path, damage, column, kind
):
    import pyarrow as pa

    data = vilt_vqa(tmp_path / "data")
    table = data / "vqav2_train.arrow"
    rows = pa.ipc.open_file(str(table)).read_all().to_pydict()
    damage(rows)
    write_table(table, rows)
    result = find(tmp_path, "vilt", "vqa", tiny["vilt"], data)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    row = 0 if damage is _questions_as_strings else 1
    assert f"{table}: row {row}, column '{column}': expected {kind}" in result.output


def test_a_split_indexes_only_the_feature_files_it_needs(folders, tmp_path):
    from vl_prune.data.tsv import TsvStore

    store = TsvStore(folders["lxmert-vqa"])
    assert store.has("COCO_val2014_000000000500")
    scanned = [file.path.name for file in store.files if "lines" in file.__dict__]
    assert scanned == ["val2014_obj36.tsv"]


def test_a_release_checkpoint_in_torchs_old_format_is_read_once(folders, tmp_path, monkeypatch):
    """LXMERT's Epoch20_LXRT.pth cannot be memory-mapped: its shapes, its layout and its
    values come from one read."""
    import torch
    from lxmert_original import write_original_lxmert

    original = tmp_path / "Epoch20_LXRT.pth"
    write_original_lxmert(original, visual_feat_dim=64)
    reads = []
    load = torch.load

    def counting(path, *args, **kwargs):
        reads.append(kwargs.get("mmap", False))
        return load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    Lxmert.inputs(None, original)
    Lxmert.build(None, original)
    assert reads.count(False) == 1


def test_retrieval_trains_on_karpathys_restval_too(tmp_path):
    from vl_prune_plugins.tasks.retrieval import Retrieval

    data = vilt_karpathy(tmp_path / "coco", "coco")
    (data / "coco_caption_karpathy_val.arrow").rename(data / "coco_caption_karpathy_restval.arrow")
    vilt_karpathy(tmp_path / "val", "coco")
    (tmp_path / "val" / "coco_caption_karpathy_val.arrow").rename(
        data / "coco_caption_karpathy_val.arrow"
    )
    task = Retrieval(data)
    assert len(task.examples("train")) == 2 * 4 * 5  # train's and restval's images, 5 captions


def test_jpeg_pictures_are_read_as_released(tmp_path):
    from PIL import Image as PILImage

    (tmp_path / "images").mkdir()
    PILImage.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "images" / "1000092795.jpg")
    store = ImageStore(tmp_path)
    assert store.has("1000092795")
    assert store.picture("1000092795").size == (40, 30)


def test_a_checkpoint_naming_a_torch_function_is_refused_by_name(tmp_path):
    import torch

    from vl_prune.checkpoint import read_state_dict
    from vl_prune.errors import VLPruneError

    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": torch.load}, crafted)
    with pytest.raises(VLPruneError, match=r"names torch\.serialization\.load, which a weights"):
        read_state_dict(crafted)
