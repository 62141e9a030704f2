"""The fixture writer of ``uniter_release.py``, checked by reading its files back the way
UNITER's ``data/data.py`` reads them (DetectFeatLmdb, TxtLmdb / TxtTokLmdb): the few reading
lines are re-implemented here, with ``msgpack_numpy.patch()`` as data.py applies it."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import lmdb
import msgpack
import msgpack_numpy
import numpy as np
import pytest
import torch
import uniter_release as ur
from lz4.frame import decompress
from torch import nn

_MSGPACK_NAMES = ("Packer", "Unpacker", "load", "loads", "dump", "dumps", "pack", "packb")
_MSGPACK_NAMES += ("unpack", "unpackb")


@pytest.fixture(scope="module", autouse=True)
def patched_msgpack():
    """``msgpack_numpy.patch()`` as data/data.py runs it on import; undone after this module."""
    saved = {name: getattr(msgpack, name) for name in _MSGPACK_NAMES}
    msgpack_numpy.patch()
    yield
    for name, value in saved.items():
        setattr(msgpack, name, value)


# ---- DetectFeatLmdb, reduced to its reading lines -------------------------------------------


@contextmanager
def detect_feat_lmdb(img_dir: Path, conf_th=0.2, max_bb=100, min_bb=10, num_bb=36, compress=True):
    """(name2nbb, txn) as ``DetectFeatLmdb.__init__`` finds them."""
    if conf_th == -1:
        db_name = f"feat_numbb{num_bb}"
        name2nbb = defaultdict(lambda: num_bb)
    else:
        db_name = f"feat_th{conf_th}_max{max_bb}_min{min_bb}"
        nbb = img_dir / f"nbb_th{conf_th}_max{max_bb}_min{min_bb}.json"
        name2nbb = json.loads(nbb.read_text()) if nbb.exists() else None
    if compress:
        db_name += "_compressed"
    if name2nbb is None:
        db_name = "all_compressed" if compress else "all"
    env = lmdb.open(f"{img_dir}/{db_name}", readonly=True, create=False)
    try:
        yield name2nbb, env.begin(buffers=True)
    finally:
        env.close()


def get_item(name2nbb, txn, file_name, compress):
    """``DetectFeatLmdb.__getitem__``: (features, norm_bb) cut to nbb rows, as float tensors."""
    dump = txn.get(file_name.encode("utf-8"))
    nbb = name2nbb[file_name]
    if compress:
        with io.BytesIO(dump) as reader:
            img_dump = np.load(reader, allow_pickle=True)
            img_dump = {"features": img_dump["features"], "norm_bb": img_dump["norm_bb"]}
    else:
        img_dump = msgpack.loads(dump, raw=False)
    img_feat = torch.tensor(img_dump["features"][:nbb, :]).float()
    img_bb = torch.tensor(img_dump["norm_bb"][:nbb, :]).float()
    return img_feat, img_bb


def raw_dump(txn, file_name, compress) -> dict[str, np.ndarray]:
    """Every stored array, as ``get_dump`` loads them (before its float32 cast and cut)."""
    dump = txn.get(file_name.encode("utf-8"))
    if compress:
        with io.BytesIO(dump) as reader, np.load(reader, allow_pickle=True) as img_dump:
            return {key: img_dump[key] for key in img_dump.files}
    return msgpack.loads(dump, raw=False)


# ---- TxtLmdb / TxtTokLmdb, reduced to their reading lines ------------------------------------


@contextmanager
def txt_tok_lmdb(db_dir: Path, id2len_name: str = "id2len"):
    """(getter, meta, id2len) as TxtTokLmdb(db_dir, max_txt_len=-1) reads them (VCR's reader
    reads id2len_qa or id2len_qar instead)."""
    env = lmdb.open(str(db_dir), readonly=True, create=False)
    txn = env.begin(buffers=True)
    meta = json.loads((db_dir / "meta.json").read_text())
    id2len = json.loads((db_dir / f"{id2len_name}.json").read_text())

    def get(key: str):
        return msgpack.loads(decompress(txn.get(key.encode("utf-8"))), raw=False)

    try:
        yield get, meta, id2len
    finally:
        env.close()


def read_json(db_dir: Path, name: str):
    return json.loads((db_dir / f"{name}.json").read_text())


# ---- the detector dump and the per-image npz ------------------------------------------------


def test_detection_is_a_generate_npz_dump():
    dump = ur.detection("nlvr2_dev-850-0-img0.npz", img_dim=32, above=17)
    assert list(dump) == ["norm_bb", "features", "conf", "soft_labels"]
    assert {key: arr.shape for key, arr in dump.items()} == {
        "norm_bb": (100, 6),
        "features": (100, 32),
        "conf": (100, 1),
        "soft_labels": (100, 1601),
    }
    assert all(arr.dtype == np.float32 for arr in dump.values())
    conf = dump["conf"][:, 0]
    assert (np.diff(conf) <= 0).all() and (conf > 0.2).sum() == 17
    bb = dump["norm_bb"]
    assert ((bb >= 0) & (bb <= 1)).all()
    np.testing.assert_allclose(bb[:, 2] - bb[:, 0], bb[:, 4], atol=1e-6)
    np.testing.assert_allclose(bb[:, 3] - bb[:, 1], bb[:, 5], atol=1e-6)
    np.testing.assert_allclose(dump["soft_labels"].sum(axis=1), 1, atol=1e-4)
    assert (dump["soft_labels"][:, 1:].max(axis=1) >= conf - 1e-6).all()
    again = ur.detection("nlvr2_dev-850-0-img0.npz", img_dim=32, above=17)
    assert all(np.array_equal(dump[key], again[key]) for key in dump)
    other = ur.detection("nlvr2_dev-850-0-img1.npz", img_dim=32)
    assert not np.array_equal(dump["features"], other["features"])
    assert 6 <= (other["conf"] > 0.2).sum() <= 40


def test_npz_is_saved_float16_in_generate_npz_order(tmp_path):
    dump = ur.detection("coco_val2014_000000262148.npz", img_dim=16, above=3)
    path = ur.write_npz_file(tmp_path / "coco_val2014_000000262148.npz", dump)
    with np.load(path, allow_pickle=True) as saved:
        assert saved.files == ["norm_bb", "features", "conf", "soft_labels"]
        assert all(saved[key].dtype == np.float16 for key in saved.files)
        assert saved["conf"].shape == (100, 1)
        np.testing.assert_array_equal(saved["features"], dump["features"].astype(np.float16))
        # no float16 rounding moves a confidence across the 0.2 threshold
        assert ur.box_count(saved["conf"], min_bb=0) == 3
    assert zipfile.ZipFile(io.BytesIO(ur.npz_bytes(dump))).namelist()[0] == "norm_bb.npy"


def test_box_count_is_uniters_rule():
    conf = np.array([[0.9], [0.5], [0.3], [0.2], [0.1]], dtype=np.float16)
    assert ur.box_count(conf) == 10  # 3 above 0.2, raised to min_bb
    assert ur.box_count(conf, min_bb=1) == 3
    assert ur.box_count(conf, min_bb=1, max_bb=2) == 2
    assert ur.box_count(conf, conf_th=-1, min_bb=1) == 5


# ---- img_db ---------------------------------------------------------------------------------

NAMES = ("nlvr2_dev-850-0-img0.npz", "nlvr2_dev-850-0-img1.npz", "nlvr2_dev-851-3-img0.npz")


def _dumps(above=(4, 25, 40)):
    return {
        name: ur.detection(name, img_dim=24, above=n) for name, n in zip(NAMES, above, strict=True)
    }


def test_img_db_msgpack_reads_like_detect_feat_lmdb(tmp_path):
    dumps = _dumps()
    split_dir = tmp_path / "img_db" / "nlvr2_dev"
    db_path = ur.write_img_db(split_dir, dumps)
    assert db_path == split_dir / "feat_th0.2_max100_min10"
    assert sorted(p.name for p in split_dir.iterdir()) == [
        "feat_th0.2_max100_min10",
        "nbb_th0.2_max100_min10.json",
    ]
    with detect_feat_lmdb(split_dir, compress=False) as (name2nbb, txn):
        assert name2nbb == dict(zip(NAMES, (10, 25, 40), strict=True))
        assert json.loads(bytes(txn.get(b"__keys__")).decode("utf-8")) == list(NAMES)
        for name, dump in dumps.items():
            stored = raw_dump(txn, name, compress=False)
            nbb = name2nbb[name]
            assert list(stored) == ["norm_bb", "features", "conf", "soft_labels"]
            assert all(arr.dtype == np.float16 and len(arr) == nbb for arr in stored.values())
            assert stored["conf"].shape == (nbb, 1)
            np.testing.assert_array_equal(stored["features"], dump["features"][:nbb].astype("<f2"))
            feat, bb = get_item(name2nbb, txn, name, compress=False)
            assert feat.dtype == torch.float32 and feat.shape == (nbb, 24) and bb.shape == (nbb, 6)


@pytest.mark.parametrize("form", ["npz", "npz-legacy"])
def test_img_db_compressed_forms(tmp_path, form):
    dumps = _dumps()
    db_path = ur.write_img_db(tmp_path / "nlvr2_dev", dumps, form=form)
    assert db_path.name == "feat_th0.2_max100_min10_compressed"
    with detect_feat_lmdb(tmp_path / "nlvr2_dev", compress=True) as (name2nbb, txn):
        for name, dump in dumps.items():
            stored = raw_dump(txn, name, compress=True)
            extra = ["allow_pickle"] if form == "npz-legacy" else []
            assert list(stored) == ["norm_bb", "features", "conf", "soft_labels", *extra]
            if extra:  # what numpy 1.x made of savez_compressed(..., allow_pickle=True)
                assert stored["allow_pickle"].shape == () and stored["allow_pickle"].dtype == bool
            nbb = name2nbb[name]
            np.testing.assert_array_equal(stored["norm_bb"], dump["norm_bb"][:nbb].astype("<f2"))
            feat, bb = get_item(name2nbb, txn, name, compress=True)
            assert feat.shape == (nbb, 24) and bb.shape == (nbb, 6)


def test_img_db_fixed_and_keep_all_layouts(tmp_path):
    dumps = _dumps()
    fixed = ur.write_img_db(tmp_path / "re_coco_gt", dumps, conf_th=-1, max_bb=30)
    assert fixed.name == "feat_numbb100"
    assert not list((tmp_path / "re_coco_gt").glob("*.json"))
    with detect_feat_lmdb(tmp_path / "re_coco_gt", conf_th=-1, num_bb=100, compress=False) as (
        name2nbb,
        txn,
    ):
        # num_bb only names the folder: convert_imgdir still cuts at max_bb
        assert all(len(raw_dump(txn, n, False)["features"]) == 30 for n in NAMES)
        assert get_item(name2nbb, txn, NAMES[0], compress=False)[0].shape == (30, 24)

    kept = ur.write_img_db(tmp_path / "all", dumps, keep_all=True, form="npz-legacy")
    assert kept.name == "all_compressed"
    assert not list((tmp_path / "all").glob("*.json"))
    env = lmdb.open(str(kept), readonly=True, create=False)
    with env.begin() as txn:
        assert json.loads(txn.get(b"__keys__")) == list(NAMES)
        assert all(len(raw_dump(txn, n, True)["conf"]) == 100 for n in NAMES)
    env.close()


def test_img_db_skips_what_convert_imgdir_finds_corrupted(tmp_path):
    dumps = _dumps()
    dumps[NAMES[1]] = {**dumps[NAMES[1]], "cube": np.zeros((2, 2, 2), np.float32)}
    ur.write_img_db(tmp_path / "split", dumps)
    nbb = json.loads((tmp_path / "split" / "nbb_th0.2_max100_min10.json").read_text())
    assert list(nbb) == [NAMES[0], NAMES[2]]
    env = lmdb.open(str(tmp_path / "split" / "feat_th0.2_max100_min10"), readonly=True)
    with env.begin() as txn:
        assert txn.get(NAMES[1].encode()) is None
        assert json.loads(txn.get(b"__keys__")) == [NAMES[0], NAMES[2]]
    env.close()
    with pytest.raises(ValueError, match="npz"):
        ur.write_img_db(tmp_path / "bad", {"image.jpg": dumps[NAMES[0]]})


# ---- txt_dbs --------------------------------------------------------------------------------


def _nlvr2_record(identifier, sentence, label):
    return {
        "validation": {"W": "True"},
        "sentence": sentence,
        "left_url": "http://example.org/left.jpg",
        "writer": "103",
        "label": label,
        "right_url": "http://example.org/right.jpg",
        "synset": "n02087122",
        "query": "dogs playing",
        "identifier": identifier,
        "extra_validations": {},
    }


def test_tokenize_is_a_cased_stand_in_inside_v_range():
    ids = ur.tokenize("  The dog's ball, red!  ")
    assert len(ids) == 8  # The / dog ' s / ball , / red !
    assert all(106 <= i < 28996 for i in ids)
    assert ur.tokenize("The") != ur.tokenize("the")
    assert ur.tokenize("a b") == ur.tokenize("a") + ur.tokenize("b")


def test_nlvr2_txt_db_reads_like_txt_tok_lmdb(tmp_path):
    records = [
        _nlvr2_record("dev-850-0-0", "The left image contains two dogs.", "True"),
        json.dumps(_nlvr2_record("dev-850-0-1", "There are exactly three dogs.", "False")),
        _nlvr2_record("dev-99-1-0", "A bird flies.", "True"),
    ]
    missing = ["nlvr2_dev-99-1-img1.npz"]
    db = ur.nlvr2_txt_db(tmp_path / "nlvr2_dev.db", records, missing_imgs=missing)
    assert db == tmp_path / "nlvr2_dev.db"
    assert {p.name for p in db.iterdir()} == {
        "data.mdb",
        "lock.mdb",
        "meta.json",
        "id2len.json",
        "txt2img.json",
    }
    assert records[0]["identifier"] == "dev-850-0-0" and "input_ids" not in records[0]
    with txt_tok_lmdb(db) as (get, meta, id2len):
        assert (meta["UNK"], meta["CLS"], meta["SEP"], meta["MASK"]) == (100, 101, 102, 103)
        assert meta["v_range"] == [106, 28996] and meta["task"] == "nlvr"
        assert list(id2len) == ["dev-850-0-0", "dev-850-0-1"]
        first = get("dev-850-0-0")
        assert first["input_ids"] == ur.tokenize("The left image contains two dogs.")
        assert id2len["dev-850-0-0"] == len(first["input_ids"])
        assert first["img_fname"] == ["nlvr2_dev-850-0-img0.npz", "nlvr2_dev-850-0-img1.npz"]
        assert (first["target"], get("dev-850-0-1")["target"]) == (1, 0)
        assert first["synset"] == "n02087122"
    assert read_json(db, "txt2img")["dev-850-0-1"] == [
        "nlvr2_dev-850-0-img0.npz",
        "nlvr2_dev-850-0-img1.npz",
    ]
    assert (db / "meta.json").read_text().startswith('{\n    "annotations"')


def _answers(*words):
    return [
        {"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)
    ]


def test_vqa_txt_db_targets_and_image_keys(tmp_path):
    questions = [
        {"image_id": 262148, "question": "What is the man doing?", "question_id": 262148000},
        {"image_id": 262148, "question": "Is it sunny?", "question_id": 262148001},
        {"image_id": 393225, "question": "How many boards?", "question_id": 393225000},
    ]
    annotations = [
        {
            "question_type": "what is the",
            "multiple_choice_answer": "surfing",
            "answers": _answers(*["surfing"] * 6, "Surfing.", "surfing!", "two", "a wave"),
            "image_id": 262148,
            "answer_type": "other",
            "question_id": 262148000,
        },
        {
            "question_type": "is it",
            "multiple_choice_answer": "no",
            "answers": _answers(*["yes"] * 3, *["no"] * 7),
            "image_id": 262148,
            "answer_type": "yes/no",
            "question_id": 262148001,
        },
        {
            "question_type": "how many",
            "multiple_choice_answer": "1",
            "answers": _answers("one", "1", "1 ", "seagull", *["2"] * 6),
            "image_id": 393225,
            "answer_type": "number",
            "question_id": 393225000,
        },
    ]
    ans2label = {"surfing": 0, "2": 1, "wave": 2, "yes": 3, "no": 4, "1": 5}
    db = ur.vqa_txt_db(tmp_path / "vqa_devval.db", questions, annotations, ans2label, "val2014")
    with txt_tok_lmdb(db) as (get, meta, id2len):
        assert meta["task"] == "vqa"
        first = get("262148000")
        assert first["img_fname"] == "coco_val2014_000000262148.npz"
        assert first["target"] == {"labels": [0, 1, 2], "scores": [1.0, 0.3, 0.3]}
        assert first["toked_question"] == ["What", "is", "the", "man", "doing", "@@?"]
        assert first["input_ids"] == ur.tokenize("What is the man doing?")
        assert first["answer_type"] == "other" and len(first["answers"]) == 10
        assert get("262148001")["target"] == {"labels": [3, 4], "scores": [0.9, 1.0]}
        assert get("393225000")["target"] == {"labels": [5, 1], "scores": [0.9, 1.0]}
        assert set(id2len) == {"262148000", "262148001", "393225000"}
    assert read_json(db, "img2txts")["coco_val2014_000000262148.npz"] == [
        "262148000",
        "262148001",
    ]
    assert pickle.loads((db / "ans2label.pkl").read_bytes()) == ans2label

    test_db = ur.vqa_txt_db(tmp_path / "vqa_test.db", questions[:1], None, None, "test-dev2015")
    assert not (test_db / "ans2label.pkl").exists()
    with txt_tok_lmdb(test_db) as (get, _, _):
        assert get("262148000")["img_fname"] == "coco_test2015_000000262148.npz"
        assert "target" not in get("262148000")


def test_ve_itm_and_caption_txt_dbs(tmp_path):
    ve = {
        "Flikr30kID": "2248275918.jpg",
        "pairID": "2248275918.jpg#2r1e",
        "captionID": "2248275918.jpg#2",
        "gold_label": "entailment",
        "annotator_labels": ["entailment"],
        "sentence1": "A dog runs on the beach.",
        "sentence2": "A dog is running.",
    }
    db = ur.ve_txt_db(tmp_path / "ve_test.db", [ve, {**ve, "pairID": "x#n", "gold_label": "-"}])
    with txt_tok_lmdb(db) as (get, _, _):
        example = get("2248275918.jpg#2r1e")
        assert example["image_id"] == 2248275918
        assert example["img_fname"] == "flickr30k_002248275918.npz"
        assert example["target"] == {"labels": [1], "scores": [1.0]}
        assert get("x#n")["target"] == {"labels": [], "scores": []}

    flickr = {
        "sentids": [10, 11],
        "imgid": 2,
        "split": "test",
        "filename": "1000092795.jpg",
        "sentences": [
            {"tokens": ["two", "guys"], "raw": "Two guys.", "imgid": 2, "sentid": 10},
            {"tokens": ["men"], "raw": "Men outside", "imgid": 2, "sentid": 11},
        ],
    }
    db = ur.itm_txt_db(tmp_path / "itm_flickr30k_test.db", [flickr])
    with txt_tok_lmdb(db) as (get, _, id2len):
        assert list(id2len) == ["10", "11"]
        assert get("11")["img_fname"] == "flickr30k_001000092795.npz"
        assert get("10")["toked_caption"] == ["Two", "guys", "@@."]
        assert get("10")["image_id"] == 1000092795
    coco = {**flickr, "filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg"}
    db = ur.itm_txt_db(tmp_path / "itm_coco_test.db", [coco], dataset="coco")
    assert read_json(db, "txt2img") == {
        "10": "coco_val2014_000000391895.npz",
        "11": "coco_val2014_000000391895.npz",
    }

    captions = [{"image_id": 391895, "id": 770337, "caption": "A man on a moped. "}]
    db = ur.caption_txt_db(tmp_path / "pretrain_coco_val.db", captions, "val2014")
    with txt_tok_lmdb(db) as (get, _, id2len):
        assert get("770337")["img_fname"] == "coco_val2014_000000391895.npz"
        assert id2len == {"770337": len(ur.tokenize("A man on a moped."))}
    assert read_json(db, "img2txts") == {"coco_val2014_000000391895.npz": ["770337"]}


def test_re_txt_db_writes_the_refer_jsons(tmp_path):
    def ref(ref_id, ann_id, image_id, split, sents):
        sentences = [{"tokens": s.split(), "raw": s, "sent_id": i, "sent": s} for i, s in sents]
        return {
            "sent_ids": [i for i, _ in sents],
            "file_name": f"COCO_train2014_{image_id:012}_{ann_id}.jpg",
            "ann_id": ann_id,
            "ref_id": ref_id,
            "image_id": image_id,
            "split": split,
            "sentences": sentences,
            "category_id": 1,
        }

    refs = [
        ref(0, 11, 581857, "testA", [(0, "lady in blue"), (1, "left woman")]),
        ref(1, 12, 581857, "testA", [(2, "man on right")]),
        ref(2, 21, 1000, "train", [(3, "the cat")]),
    ]
    image = {"id": 581857, "file_name": "COCO_train2014_000000581857.jpg", "license": 1}
    instances = {
        "images": [{**image, "height": 640, "width": 427}, {"id": 1000, "file_name": "x.jpg"}],
        "annotations": [
            {"id": a, "area": 9.0, "bbox": [1.0, 2.0, 3.0, 3.0], "image_id": 581857}
            | {"category_id": 1, "iscrowd": 0, "segmentation": [[1, 2, 3, 4]]}
            for a in (11, 12, 13)
        ]
        + [{"id": 21, "area": 1.0, "bbox": [0, 0, 1, 1], "image_id": 1000}],
        "categories": [{"supercategory": "person", "id": 1, "name": "person"}],
    }
    iid = {"iid_to_ann_ids": {"581857": [13, 11, 12], "1000": [21]}}
    db = ur.re_txt_db(tmp_path / "refcoco+_testA.db", refs, instances, iid, "testA")
    assert read_json(db, "images") == [
        {
            "id": 581857,
            "file_name": "COCO_train2014_000000581857.jpg",
            "ann_ids": [13, 11, 12],
            "height": 640,
            "width": 427,
        }
    ]
    assert [a["id"] for a in read_json(db, "annotations")] == [11, 12, 13]
    assert "segmentation" not in read_json(db, "annotations")[0]
    assert [r["ref_id"] for r in read_json(db, "refs")] == [0, 1]
    assert read_json(db, "categories") == instances["categories"]
    with txt_tok_lmdb(db) as (get, meta, id2len):
        assert meta["task"] == "re" and list(id2len) == ["0", "1", "2"]
        example = get("2")
        assert example["img_fname"] == "visual_grounding_coco_gt_000000581857.npz"
        assert (example["ref_id"], example["ann_id"], example["sent"]) == (1, 12, "man on right")
        assert example["bbox"] == [1.0, 2.0, 3.0, 3.0]


def test_vcr_txt_db_person_tokens(tmp_path):
    record = {
        "movie": "3005_ABRAHAM_LINCOLN_VAMPIRE_HUNTER",
        "objects": ["person", "person", "car"],
        "img_fn": "lsmdc_3005_ABRAHAM/3005_ABRAHAM_00.27.43.141-00.27.45.534@0.jpg",
        "question": ["What", "is", [0], "doing", "near", [2], "?"],
        "answer_choices": [
            [[0], "is", "driving", "."],
            [[1], "waves", "."],
            ["Nothing", "."],
            ["Sleeping", "in", [2], "."],
        ],
        "answer_label": 0,
        "rationale_choices": [
            [[0, 1], "sit", "in", [2], "."],
            ["The", "engine", "runs", "."],
            ["No", "."],
            ["Yes", "."],
        ],
        "rationale_label": 1,
        "annot_id": "val-0",
    }
    unlabelled = {**record, "annot_id": "test-0"}
    del unlabelled["answer_label"], unlabelled["rationale_label"]
    db = ur.vcr_txt_db(tmp_path / "vcr_val.db", [record, unlabelled], "val")
    with txt_tok_lmdb(db, "id2len_qar") as (get, meta, _):
        example = get("val-0")
        assert example["image_id"] == "3005_ABRAHAM_00.27.43.141-00.27.45.534@0"
        assert example["img_fname"] == [
            "vcr_gt_val_3005_ABRAHAM_00.27.43.141-00.27.45.534@0.npz",
            "vcr_val_3005_ABRAHAM_00.27.43.141-00.27.45.534@0.npz",
        ]
        assert example["raw_q"] == "What is person_0 doing near car ?"
        assert example["input_ids"][2] == 28996  # person_0 → len(vocab) + 0
        assert example["input_ids_as"][1][0] == 28997
        assert example["input_ids_rs"][0][:2] == [28996, 28997]
        assert example["image_region_tokens"] == [1, 0, 3]
        assert example["toked_txt_region_tokens"] == [0, 0, 1, 0, 0, 3, 0]
        assert example["object_ids"] == [2, 2, 1]  # made-up categories: car 0, person 1; +1
        assert (example["qa_target"], example["qar_target"]) == (0, 1)
        assert (get("test-0")["qa_target"], get("test-0")["qar_target"]) == (-1, -1)
        assert meta["task"] == "vcr"
    id2len_qa, id2len_qar = read_json(db, "id2len_qa"), read_json(db, "id2len_qar")
    assert id2len_qa["val-0"] == (7 + 4) * 4  # question 7 ids, longest answer 4
    assert id2len_qar["val-0"] == id2len_qa["val-0"] + 6
    assert read_json(db, "special_tokens") == [f"person_{i}" for i in range(81)]
    assert read_json(db, "txt2img")["val-0"] == example["img_fname"]


# ---- the checkpoint -------------------------------------------------------------------------


def _module(**children: nn.Module) -> nn.Module:
    module = nn.Module()
    for name, child in children.items():
        module.add_module(name, child)
    return module


def _uniter_for_pretraining(hidden, layers, intermediate, vocab, img_dim) -> nn.Module:
    """The module tree of UNITER's UniterForPretraining (model/model.py, layer.py, pretrain.py),
    rebuilt from torch.nn with the same attribute names, registration order and weight ties."""

    def norm():
        return nn.LayerNorm(hidden, eps=1e-12)

    def layer():
        attention = _module(
            self=_module(**{n: nn.Linear(hidden, hidden) for n in ("query", "key", "value")}),
            output=_module(dense=nn.Linear(hidden, hidden), LayerNorm=norm()),
        )
        return _module(
            attention=attention,
            intermediate=_module(dense=nn.Linear(hidden, intermediate)),
            output=_module(dense=nn.Linear(intermediate, hidden), LayerNorm=norm()),
        )

    embeddings = _module(
        word_embeddings=nn.Embedding(vocab, hidden, padding_idx=0),
        position_embeddings=nn.Embedding(512, hidden),
        token_type_embeddings=nn.Embedding(2, hidden),
        LayerNorm=norm(),
    )
    img_embeddings = _module(
        img_linear=nn.Linear(img_dim, hidden),
        img_layer_norm=norm(),
        pos_layer_norm=norm(),
        pos_linear=nn.Linear(7, hidden),
        mask_embedding=nn.Embedding(2, img_dim, padding_idx=0),
        LayerNorm=norm(),
    )
    uniter = _module(
        embeddings=embeddings,
        img_embeddings=img_embeddings,
        encoder=_module(layer=nn.ModuleList(layer() for _ in range(layers))),
        pooler=_module(dense=nn.Linear(hidden, hidden)),
    )
    decoder = nn.Linear(hidden, vocab, bias=False)
    decoder.weight = embeddings.word_embeddings.weight
    predictions = _module(
        transform=_module(dense=nn.Linear(hidden, hidden), LayerNorm=norm()), decoder=decoder
    )
    predictions.bias = nn.Parameter(torch.zeros(vocab))
    feat_regress = _module(net=nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), norm()))
    feat_regress.weight = img_embeddings.img_linear.weight
    feat_regress.bias = nn.Parameter(torch.zeros(img_dim))
    region_classifier = _module(
        net=nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), norm(), nn.Linear(hidden, 1601))
    )
    return _module(
        uniter=uniter,
        cls=_module(predictions=predictions),
        feat_regress=feat_regress,
        region_classifier=region_classifier,
        itm_output=nn.Linear(hidden, 2),
    )


def test_checkpoint_has_the_released_key_names(tmp_path):
    sizes = {"hidden": 32, "layers": 2, "intermediate": 64, "vocab": 300, "img_dim": 40}
    path = tmp_path / "uniter-base.pt"
    written = ur.write_uniter_checkpoint(path, heads=4, seed=3, **sizes)
    loaded = torch.load(path, weights_only=True)
    reference = _uniter_for_pretraining(**sizes).state_dict()
    assert list(loaded) == list(written) == list(reference)
    assert type(loaded) is dict
    assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in reference.items()}
    assert all(v.dtype == torch.float32 for v in loaded.values())
    assert not any("gamma" in k or "beta" in k for k in loaded)
    # ties hold equal values in separate tensors, as ModelSaver's v.cpu() leaves them
    word = loaded["uniter.embeddings.word_embeddings.weight"]
    assert torch.equal(loaded["cls.predictions.decoder.weight"], word)
    assert loaded["cls.predictions.decoder.weight"].data_ptr() != word.data_ptr()
    img_linear = loaded["uniter.img_embeddings.img_linear.weight"]
    assert torch.equal(loaded["feat_regress.weight"], img_linear)
    assert not loaded["uniter.img_embeddings.mask_embedding.weight"][0].any()
    model = _uniter_for_pretraining(**sizes)
    model.load_state_dict(loaded, strict=True)

    backbone = ur.write_uniter_checkpoint(tmp_path / "b.pt", head_keys=False, seed=3, **sizes)
    assert all(k.startswith("uniter.") for k in backbone)
    assert len(backbone) == 5 + 11 + 16 * 2 + 2
    assert torch.equal(backbone["uniter.pooler.dense.weight"], loaded["uniter.pooler.dense.weight"])
    assert not torch.equal(
        ur.write_uniter_checkpoint(tmp_path / "c.pt", seed=4, **sizes)["itm_output.weight"],
        loaded["itm_output.weight"],
    )
    half = ur.write_uniter_checkpoint(tmp_path / "h.pt", dtype=torch.float16, **sizes)
    assert half["uniter.pooler.dense.bias"].dtype == torch.float16
