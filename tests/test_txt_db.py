"""UNITER's txt_db (vl_prune.data.txt_db): the examples, vocabulary and lengths of a txt_db as
prepro.py writes it, finding a split's dbs in UNITER's download layout, and the lazy sequence
of examples a task trains on."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import uniter_release as ur

from vl_prune.data.txt_db import TxtDb, TxtDbExamples, has_dbs, locate, split_dbs
from vl_prune.errors import VLPruneError

SENTENCES = {
    "dev-850-0-0": "There are two dogs.",
    "dev-850-0-1": "The left image shows exactly one bird on a branch.",
    "dev-7-3-0": "A cat.",
}


def nlvr2_records(sentences: dict[str, str] = SENTENCES) -> list[dict]:
    return [
        {"identifier": key, "sentence": text, "label": "True" if i % 2 == 0 else "False"}
        for i, (key, text) in enumerate(sentences.items())
    ]


def simple_db(path: Path, keys: list[str], stored: list[str] | None = None) -> Path:
    """A txt_db whose id2len lists `keys` (in that order) and whose LMDB stores `stored`."""
    stored = keys if stored is None else stored
    examples = {key: {"input_ids": ur.tokenize(f"text of {key}"), "key": key} for key in stored}
    id2len = {key: len(ur.tokenize(f"text of {key}")) for key in keys}
    return ur.write_txt_db(path, examples, {"id2len": id2len})


def test_examples_are_read_as_prepro_wrote_them(tmp_path):
    db = TxtDb(ur.nlvr2_txt_db(tmp_path / "nlvr2_dev.db", nlvr2_records()))
    examples = db.examples()
    assert [key for key, _ in examples] == list(SENTENCES)  # id2len.json's order
    first = dict(examples)["dev-850-0-0"]
    assert first["input_ids"] == ur.tokenize("There are two dogs.")
    assert first["img_fname"] == ["nlvr2_dev-850-0-img0.npz", "nlvr2_dev-850-0-img1.npz"]
    assert first["target"] == 1 and dict(examples)["dev-850-0-1"]["target"] == 0
    assert first["sentence"] == "There are two dogs."
    assert db["dev-7-3-0"]["input_ids"] == ur.tokenize("A cat.")
    assert list(db.example_ids()) == list(SENTENCES)
    assert db.image_keys()["dev-7-3-0"] == ["nlvr2_dev-7-3-img0.npz", "nlvr2_dev-7-3-img1.npz"]
    db.check()  # every listed id is stored


def test_vocabulary_comes_from_meta_json(tmp_path):
    db = TxtDb(ur.nlvr2_txt_db(tmp_path / "nlvr2_dev.db", nlvr2_records()))
    vocabulary = db.vocabulary
    assert (vocabulary.cls, vocabulary.sep, vocabulary.mask, vocabulary.unk) == (101, 102, 103, 100)
    assert vocabulary.words == (106, 28996)
    assert vocabulary.size == 28996
    assert vocabulary.tokenizer == "bert-base-cased"
    assert db.with_specials([2000, 2001]) == (101, 2000, 2001, 102)
    assert db.with_specials([]) == (101, 102)


def test_vocabulary_of_lightningdot_meta_and_other_ids(tmp_path):
    meta = {"CLS": 2, "SEP": 3, "MASK": 4, "UNK": 1, "v_range": [5, 500], "bert": "my-bert"}
    db = TxtDb(ur.write_txt_db(tmp_path / "x_dev.db", {}, {"id2len": {}}, meta))
    assert db.vocabulary.tokenizer == "my-bert"
    assert db.vocabulary.size == 500
    assert db.with_specials([7, 8]) == (2, 7, 8, 3)


def test_lengths_keep_the_files_order_and_another_lengths_file_can_be_chosen(tmp_path):
    keys = ["b", "a", "10", "2"]
    path = simple_db(tmp_path / "x_dev.db", keys)
    (path / "id2len_qar.json").write_text(json.dumps({"2": 5, "b": 7}))
    assert list(TxtDb(path).example_ids()) == keys
    assert [key for key, _ in TxtDb(path).examples()] == keys
    other = TxtDb(path, lengths="id2len_qar.json")
    assert list(other.example_ids()) == ["2", "b"]
    assert [example["key"] for _, example in other.examples()] == ["2", "b"]


@pytest.mark.parametrize("missing", [3, 8])
def test_check_names_how_many_ids_are_missing_and_the_first_ones(tmp_path, missing):
    keys = [f"id{i}" for i in range(10)]
    path = simple_db(tmp_path / "x_dev.db", keys, stored=keys[missing:])
    db = TxtDb(path)
    first = ", ".join(repr(key) for key in keys[: min(missing, 5)])
    more = ", …" if missing > 5 else ""
    message = f"{path}: {missing} of the 10 ids of id2len.json are not stored ({first}{more})"
    with pytest.raises(VLPruneError, match=re.escape(message)):
        db.check()


def test_a_listed_id_that_is_not_stored_is_an_error_naming_it(tmp_path):
    path = simple_db(tmp_path / "x_dev.db", ["a", "b"], stored=["a"])
    with pytest.raises(VLPruneError, match=r"key 'b': listed in id2len\.json but not stored"):
        TxtDb(path).examples()


def test_folder_without_data_mdb_is_not_a_txt_db(tmp_path):
    (tmp_path / "x_dev.db").mkdir()
    with pytest.raises(VLPruneError, match=r"x_dev\.db: not a UNITER txt_db \(no data\.mdb\)"):
        TxtDb(tmp_path / "x_dev.db")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"SEP": None}, r"meta\.json: 'SEP' is missing", id="no-SEP"),
        pytest.param({"v_range": None}, r"meta\.json: 'v_range' is missing", id="no-v_range"),
        pytest.param({"CLS": "[CLS]"}, "must be token ids", id="CLS-text"),
        pytest.param({"MASK": 1.5}, "must be token ids", id="MASK-float"),
        pytest.param({"UNK": -1}, "must be token ids", id="UNK-negative"),
        pytest.param({"v_range": [106, "28996"]}, "must be token ids", id="v_range-text"),
        pytest.param({"v_range": [106, 200, 300]}, "must be token ids", id="v_range-three"),
        pytest.param({"v_range": 28996}, "must be token ids", id="v_range-int"),
    ],
)
def test_bad_meta_json_is_a_clear_error(tmp_path, change, message):
    path = ur.nlvr2_txt_db(tmp_path / "nlvr2_dev.db", nlvr2_records())
    meta = json.loads((path / "meta.json").read_text())
    for name, value in change.items():
        if value is None:
            del meta[name]
        else:
            meta[name] = value
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(VLPruneError, match=message):
        _ = TxtDb(path).vocabulary


@pytest.mark.parametrize(
    ("content", "message"),
    [("[1, 2]", ": expected a JSON object"), ("{oops", ":1: not valid JSON")],
)
def test_meta_json_that_is_no_object_is_a_clear_error(tmp_path, content, message):
    path = ur.nlvr2_txt_db(tmp_path / "nlvr2_dev.db", nlvr2_records())
    (path / "meta.json").write_text(content)
    with pytest.raises(VLPruneError, match=rf"meta\.json{message}"):
        _ = TxtDb(path).vocabulary


def test_missing_or_bad_lengths_file_is_a_clear_error(tmp_path):
    path = simple_db(tmp_path / "x_dev.db", ["a"])
    with pytest.raises(VLPruneError, match=r"id2len_qa\.json: missing from the txt_db"):
        _ = TxtDb(path, lengths="id2len_qa.json").ids
    (path / "id2len.json").write_text(json.dumps({"a": "five"}))
    with pytest.raises(VLPruneError, match=r"id2len\.json: expected \{id: length\}"):
        _ = TxtDb(path).ids


def test_damaged_example_is_an_error_naming_db_and_key(tmp_path):
    import lmdb

    path = simple_db(tmp_path / "x_dev.db", ["a", "b"])
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"a", b"not lz4 at all")
    env.close()
    db = TxtDb(path)
    with pytest.raises(VLPruneError, match=rf"{re.escape(str(path))}: key 'a': not an lz4 frame"):
        db["a"]
    assert db["b"]["key"] == "b"


def test_txt_db_without_lmdb_installed_says_what_to_install(tmp_path, monkeypatch):
    path = simple_db(tmp_path / "x_dev.db", ["a"])
    monkeypatch.setitem(sys.modules, "lmdb", None)
    with pytest.raises(VLPruneError, match=r"pip install 'vl-prune\[uniter\]'"):
        TxtDb(path)["a"]
    with pytest.raises(VLPruneError, match=r"pip install 'vl-prune\[uniter\]'"):
        TxtDb(path).check()


# --- finding a split's txt_dbs --------------------------------------------------------------


@pytest.mark.parametrize(
    "where", ["txt_db/x_train.db", "txt_db/re/x_train.db", "x_train.db"], ids=str
)
def test_split_dbs_finds_the_db_where_uniters_downloads_put_it(tmp_path, where):
    simple_db(tmp_path / where, ["a"])
    assert has_dbs(tmp_path, "x")
    assert locate(tmp_path, "x_train.db") == tmp_path / where
    dbs = split_dbs(tmp_path, "x", "train")
    assert [db.path for db in dbs] == [tmp_path / where]


def test_split_dbs_joins_plus_separated_parts_in_order(tmp_path):
    simple_db(tmp_path / "txt_db" / "vqa_train.db", ["t1", "t2"])
    simple_db(tmp_path / "txt_db" / "vqa_trainval.db", ["v1"])
    simple_db(tmp_path / "txt_db" / "vqa_devval.db", ["d1"])
    dbs = split_dbs(tmp_path, "vqa", "train+trainval")
    assert [db.path.name for db in dbs] == ["vqa_train.db", "vqa_trainval.db"]
    assert [key for db in dbs for key in db.example_ids()] == ["t1", "t2", "v1"]
    dbs = split_dbs(tmp_path, "vqa", "trainval+train", lengths="id2len.json")
    assert [db.path.name for db in dbs] == ["vqa_trainval.db", "vqa_train.db"]


def test_split_dbs_is_none_when_no_db_of_the_prefix_exists(tmp_path):
    assert split_dbs(tmp_path, "x", "train") is None  # an empty folder
    simple_db(tmp_path / "txt_db" / "other_train.db", ["a"])
    simple_db(tmp_path / "txt_db" / "xy_train.db", ["a"])  # another prefix
    (tmp_path / "txt_db" / "x_train.db.tar").write_bytes(b"")  # a file, not a db folder
    assert not has_dbs(tmp_path, "x")
    assert split_dbs(tmp_path, "x", "train") is None


def test_split_dbs_names_the_missing_db_when_others_exist(tmp_path):
    simple_db(tmp_path / "txt_db" / "vqa_train.db", ["a"])
    simple_db(tmp_path / "txt_db" / "vqa_devval.db", ["b"])
    with pytest.raises(
        VLPruneError,
        match=r"split 'train\+trainval' needs txt_db vqa_trainval\.db, which is not there "
        r"\(found vqa_devval\.db, vqa_train\.db\)",
    ):
        split_dbs(tmp_path, "vqa", "train+trainval")


# --- the lazy sequence of a split's examples ------------------------------------------------


class Parse:
    """A task's parse function that counts its calls."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, db: TxtDb, key: str, record: dict) -> tuple[str, str, list[int]]:
        self.calls.append(key)
        return db.path.name, key, record["input_ids"]


@pytest.fixture
def two_dbs(tmp_path) -> list[TxtDb]:
    first = simple_db(tmp_path / "txt_db" / "x_train.db", ["c", "a", "b"])
    second = simple_db(tmp_path / "txt_db" / "x_trainval.db", ["z", "y"])
    return [TxtDb(first), TxtDb(second)]


def test_examples_sequence_is_lazy(two_dbs):
    parse = Parse()
    examples = TxtDbExamples(two_dbs, parse)
    assert len(examples) == 5
    assert parse.calls == []  # nothing decoded up front
    assert examples[3][:2] == ("x_trainval.db", "z")
    assert parse.calls == ["z"]  # one example decoded for one index
    examples[0]
    assert parse.calls == ["z", "c"]


def test_examples_sequence_indexing_and_slices(two_dbs):
    examples = TxtDbExamples(two_dbs, Parse())
    keys = ["c", "a", "b", "z", "y"]
    assert [examples[i][1] for i in range(5)] == keys
    assert examples[2] == ("x_train.db", "b", ur.tokenize("text of b"))
    assert examples[-1][1] == "y" and examples[-5][1] == "c"
    assert [e[1] for e in examples[1:4]] == ["a", "b", "z"]
    assert [e[1] for e in examples[::-2]] == ["y", "b", "c"]
    assert examples[7:] == []
    for index in (5, -6):
        with pytest.raises(IndexError):
            examples[index]


def test_examples_sequence_iterates_the_dbs_in_order(two_dbs):
    parse = Parse()
    examples = TxtDbExamples(two_dbs, parse)
    assert [(db, key) for db, key, _ in examples] == [
        ("x_train.db", "c"),
        ("x_train.db", "a"),
        ("x_train.db", "b"),
        ("x_trainval.db", "z"),
        ("x_trainval.db", "y"),
    ]
    assert list(examples) == [examples[i] for i in range(len(examples))]
    iterator = iter(TxtDbExamples(two_dbs, parse := Parse()))
    next(iterator)
    assert parse.calls == ["c"]  # iteration decodes as it goes


def test_examples_sequence_of_no_or_empty_dbs_is_empty(tmp_path):
    empty = TxtDb(simple_db(tmp_path / "x_dev.db", []))
    assert len(TxtDbExamples([], Parse())) == 0
    examples = TxtDbExamples([empty, empty], Parse())
    assert len(examples) == 0 and list(examples) == []
    with pytest.raises(IndexError):
        examples[0]
