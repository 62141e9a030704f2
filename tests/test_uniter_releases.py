"""`vlprune find` on real layouts: a checkpoint in the key layout of UNITER's `uniter-base.pt`
(tiny widths) with every task's data as UNITER released it (txt_db + img_db, no tokenizer
needed) and as the official annotation files with UNITER's img_db; broken databases fail in
one line, naming the file and key, before any model is built."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from uniter_folders import FOLDERS, IMG_DIM, write_folder
from uniter_release import write_uniter_checkpoint

from vl_prune_cli.main import cli
from vl_prune_plugins.backbones.uniter import Uniter

lmdb = pytest.importorskip("lmdb")
msgpack_numpy = pytest.importorskip("msgpack_numpy")

TASKS = sorted(FOLDERS)
#: a BERT WordPiece vocabulary of a few words, for the official files' texts
WORDS = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS += ["a", "the", "is", "it", "there", "dog", "red", "blue", "green", "thing", "left", "."]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub: what a tokenizer is not given must not be fetched."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """UNITER-base's key layout (heads included) at tiny widths; no tokenizer beside it."""
    path = tmp_path_factory.mktemp("pretrained") / "uniter-base.pt"
    write_uniter_checkpoint(path, img_dim=IMG_DIM)
    return path


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "vocab.txt"
    path.write_text("\n".join(WORDS) + "\n")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[tuple[str, bool], Path]:
    """Every task's folder in both layouts: (task, release) → folder."""
    root = tmp_path_factory.mktemp("data")
    return {
        (task, release): write_folder(
            root / f"{task}-{'release' if release else 'official'}", task, release
        )
        for task in TASKS
        for release in (True, False)
    }


def find(tmp_path: Path, *args: str):
    runs = tmp_path / "runs"
    common = ("--steps", "2", "--sparsity", "0.1", "--batch-size", "4", "--runs", str(runs))
    return CliRunner().invoke(cli, ["find", "--model", "uniter", *args, *common, "--json"])


@pytest.mark.parametrize("task", TASKS)
def test_find_on_uniters_release(task, checkpoint, folders, tmp_path):
    data = folders[task, True]
    assert not list(data.glob("*.json*")), "the release folder holds only txt_db and img_db"
    result = find(tmp_path, "--task", task, "--checkpoint", str(checkpoint), "--data", str(data))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert report["rounds"][1]["sparsity"] == pytest.approx(0.1, abs=1e-3)
    assert all(np.isfinite(r["score"]) for r in report["rounds"])
    assert f"data: {task} " in result.stderr
    # The release's pre-training heads are reported as what loading left out.
    assert f"loaded {checkpoint}: ignored " in result.stderr


@pytest.mark.parametrize("task", TASKS)
def test_find_on_the_official_files_with_uniters_img_db(task, checkpoint, vocab, folders, tmp_path):
    data = folders[task, False]
    assert not (data / "features").exists() and not (data / "txt_db").exists()
    args = ("--task", task, "--checkpoint", str(checkpoint), "--data", str(data))
    result = find(tmp_path, *args, "--tokenizer", str(vocab))
    assert result.exit_code == 0, result.output
    assert [r["round"] for r in json.loads(result.stdout)["rounds"]] == [0, 1]


def test_official_files_need_a_tokenizer_offline(checkpoint, folders, tmp_path):
    data = folders["nlvr2", False]
    result = find(tmp_path, "--task", "nlvr2", "--checkpoint", str(checkpoint), "--data", str(data))
    assert result.exit_code == 2
    assert "bert-base-cased" in result.output and "--tokenizer" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def _broken(folders, tmp_path: Path, task: str) -> Path:
    data = tmp_path / "data"
    shutil.copytree(folders[task, True], data)
    return data


def _delete(db: Path, key: str) -> None:
    env = lmdb.open(str(db))
    with env.begin(write=True) as txn:
        assert txn.delete(key.encode())
    env.close()


def _put(db: Path, key: str, value: bytes) -> None:
    env = lmdb.open(str(db))
    with env.begin(write=True) as txn:
        txn.put(key.encode(), value)
    env.close()


def _truncate(db: Path) -> None:
    data = db / "data.mdb"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])


def _object_array(db: Path) -> None:
    _put(
        db,
        "nlvr2_train-0-0-img0.npz",
        msgpack_numpy.packb({"features": np.array([object()], dtype=object)}, use_bin_type=True),
    )


BROKEN = {
    "a txt_db id that is not stored": (
        lambda d: _delete(d / "txt_db" / "nlvr2_train.db", "train-1-1-0"),
        r"nlvr2_train\.db: 1 of the 8 ids of id2len\.json are not stored \('train-1-1-0'\)",
    ),
    "an image missing from the img_db": (
        lambda d: _delete(
            d / "img_db" / "nlvr2_train" / "feat_th0.2_max100_min10", "nlvr2_train-2-0-img1.npz"
        ),
        r"txt2img\.json: id 'train-2-0-0': image nlvr2_train-2-0-img1\.npz is not in .*/img_db$",
    ),
    "a truncated img_db": (
        lambda d: _truncate(d / "img_db" / "nlvr2_dev" / "feat_th0.2_max100_min10"),
        r"img_db/nlvr2_dev/feat_th0\.2_max100_min10",
    ),
    "an object array in the img_db": (
        lambda d: _object_array(d / "img_db" / "nlvr2_train" / "feat_th0.2_max100_min10"),
        r"feat_th0\.2_max100_min10: key 'nlvr2_train-0-0-img0\.npz': holds an object array",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_release_fails_in_one_line_before_any_model(
    case, checkpoint, folders, tmp_path, monkeypatch
):
    break_it, message = BROKEN[case]
    data = _broken(folders, tmp_path, "nlvr2")
    break_it(data)

    def never(*args, **kwargs):
        raise AssertionError("a model was built before the data was checked")

    monkeypatch.setattr(Uniter, "build", never)
    monkeypatch.setattr(Uniter, "__init__", never)
    result = find(tmp_path, "--task", "nlvr2", "--checkpoint", str(checkpoint), "--data", str(data))
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("vlprune: error: ")
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "runs").exists()


def test_features_of_another_width_fail_before_any_model(folders, tmp_path, monkeypatch):
    narrow = tmp_path / "narrow.pt"
    write_uniter_checkpoint(narrow, img_dim=32)
    monkeypatch.setattr(Uniter, "build", lambda *a, **k: pytest.fail("model built"))
    data = folders["nlvr2", True]
    result = find(tmp_path, "--task", "nlvr2", "--checkpoint", str(narrow), "--data", str(data))
    assert result.exit_code == 2, result.output
    assert "are 64-d; uniter-tiny reads 32-d" in result.output


@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_loader_workers_read_the_lmdbs_and_change_no_result(task, checkpoint, folders, tmp_path):
    """Workers open their own LMDB environments after the fork; pre-training's and retrieval's
    random masks and negatives are seeded by batch, so the scores are the same."""
    args = ("--task", task, "--checkpoint", str(checkpoint), "--data", str(folders[task, True]))
    scores = []
    for workers in ("0", "2"):
        result = find(tmp_path / workers, *args, "--num-workers", workers)
        assert result.exit_code == 0, result.output
        scores.append([r["score"] for r in json.loads(result.stdout)["rounds"]])
    assert scores[0] == scores[1]


def test_evaluate_and_transfer_take_the_release_too(checkpoint, folders, tmp_path):
    data = {task: str(folders[task, True]) for task in ("nlvr2", "snli-ve")}
    found = find(
        tmp_path, "--task", "nlvr2", "--checkpoint", str(checkpoint), "--data", data["nlvr2"]
    )
    assert found.exit_code == 0, found.output
    ticket = json.loads(found.stdout)["final"]["ticket"]
    common = ("--checkpoint", str(checkpoint), "--steps", "2", "--batch-size", "4", "--json")
    evaluated = CliRunner().invoke(
        cli,
        ["evaluate", "--ticket", ticket, "--task", "snli-ve", "--data", data["snli-ve"], *common],
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["task"] == "snli-ve"
    assert f"loaded {checkpoint}" in evaluated.stderr
    transferred = CliRunner().invoke(
        cli,
        [
            *("transfer", "--ticket", ticket, "--task", "snli-ve", "--data", data["snli-ve"]),
            *("--runs", str(tmp_path / "runs"), *common),
        ],
    )
    assert transferred.exit_code == 0, transferred.output
    assert json.loads(transferred.stdout)["fraction_of_dense"] is not None


def test_vqa_answers_come_from_the_release(folders):
    """UNITER's authors' prepro pickles the answer vocabulary beside the txt_db; without it the
    head has UNITER's 3,129 answers."""
    from vl_prune_plugins.tasks.vqa import Vqa

    data = folders["vqa", True]
    task = Vqa(data)
    assert task.default_splits() == ("train", "devval")
    assert task.vocabulary() == ["2", "no", "yes"]
    assert dict(task.examples("devval")[0].scores) == {2: 1.0}  # "yes" given nine times of ten


def test_a_release_tokenised_for_another_vocabulary_is_refused(folders, tmp_path, monkeypatch):
    """bert-base-uncased's 30,522 words would read bert-base-cased's ids as other words."""
    uncased = tmp_path / "uncased.pt"
    write_uniter_checkpoint(uncased, vocab=30522, img_dim=IMG_DIM)
    monkeypatch.setattr(Uniter, "build", lambda *a, **k: pytest.fail("model built"))
    data = folders["nlvr2", True]
    result = find(tmp_path, "--task", "nlvr2", "--checkpoint", str(uncased), "--data", str(data))
    assert result.exit_code == 2, result.output
    assert "tokenised by bert-base-cased (28,996 words, meta.json)" in result.output
    assert "uniter-tiny has 30,522 words" in result.output


def test_vcr_from_uniters_second_stage_checkpoint(folders, tmp_path):
    """uniter-base-vcr_2nd_stage.pt already holds the 81 person words (29,077 rows)."""
    second_stage = tmp_path / "uniter-base-vcr_2nd_stage.pt"
    write_uniter_checkpoint(second_stage, vocab=28996 + 81, img_dim=IMG_DIM)
    data = folders["vcr", True]
    result = find(tmp_path, "--task", "vcr", "--checkpoint", str(second_stage), "--data", str(data))
    assert result.exit_code == 0, result.output
    assert "grew word embeddings" not in result.stderr


def test_a_bad_record_met_in_a_worker_is_one_line(checkpoint, folders, tmp_path):
    """The first batch is checked up front; a damaged record further on fails when its batch
    is made, in a worker, and is still reported in its own one line."""
    data = _broken(folders, tmp_path, "nlvr2")
    _put(data / "txt_db" / "nlvr2_train.db", "train-3-1-0", b"garbage")
    args = ("--task", "nlvr2", "--checkpoint", str(checkpoint), "--data", str(data))
    result = find(tmp_path, *args, "--num-workers", "2")
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert re.fullmatch(
        r"vlprune: error: .*nlvr2_train\.db: key 'train-3-1-0': not an lz4 frame.*", last
    )
    assert "Traceback" not in result.output


def test_a_tokenizer_larger_than_the_checkpoints_vocabulary_is_refused(folders, tmp_path):
    small = tmp_path / "small.pt"
    write_uniter_checkpoint(small, vocab=len(WORDS) - 1, img_dim=IMG_DIM)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    args = ("--task", "nlvr2", "--checkpoint", str(small), "--data", str(folders["nlvr2", False]))
    result = find(tmp_path, *args, "--tokenizer", str(vocab))
    assert result.exit_code == 2, result.output
    assert f"the tokenizer has {len(WORDS)} words, uniter-tiny {len(WORDS) - 1}" in result.output
    assert not (tmp_path / "runs").exists()


def test_a_checkpoint_in_torchs_pre_1_6_format_loads(checkpoint, folders, tmp_path):
    """UNITER's releases were saved by torch 1.1, before the zip format (no memory map)."""
    import torch

    legacy = tmp_path / "uniter-base.pt"
    torch.save(torch.load(checkpoint), legacy, _use_new_zipfile_serialization=False)
    data = folders["nlvr2", True]
    result = find(tmp_path, "--task", "nlvr2", "--checkpoint", str(legacy), "--data", str(data))
    assert result.exit_code == 0, result.output


def test_texts_are_cut_to_the_models_positions(folders, tmp_path):
    """A txt_db's texts longer than the model reads are cut to its positions, [SEP] kept."""
    short = tmp_path / "short.pt"
    write_uniter_checkpoint(short, max_position=8, img_dim=IMG_DIM)
    data = folders["nlvr2", True]
    result = find(tmp_path, "--task", "nlvr2", "--checkpoint", str(short), "--data", str(data))
    assert result.exit_code == 0, result.output
