"""Independent writer of fixtures in the layouts of UNITER's released data files and checkpoints.

The readers under test must open what UNITER's own scripts wrote, so this module writes those
files the way those scripts do. It was built by reading the originals' code, not by guessing,
and shares no code with them (and none with ``vl_prune``):

- ``ChenRocks/BUTD-UNITER-NLVR2`` ``tools/generate_npz.py``: the per-image detector npz;
- ``ChenRocks/UNITER`` ``scripts/convert_imgdir.py``: the img_db LMDB (one folder per split);
  ``prepro.py``: the NLVR2 and referring-expression txt_dbs; ``data/data.py``: how both are
  read back; ``model/model.py``, ``model/layer.py``, ``model/pretrain.py`` and
  ``utils/save.py``: the key names of the released ``uniter-base.pt``;
- ``intersun/LightningDOT`` ``uniter_model/prepro.py`` and ``uniter_model/utils/vqa.py``: the
  fuller prepro by the same authors (VQA, SNLI-VE, retrieval, COCO captions, VCR txt_dbs).

Word ids come from :func:`tokenize`, a stand-in for BERT's WordPiece (no vocabulary file is
needed): they lie in bert-base-cased's ``v_range`` but are *not* BERT ids.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import pickle
import re
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lmdb
import lz4.frame
import msgpack_numpy
import numpy as np
import torch

# bert-base-cased, as prepro.py reads them off the tokenizer into meta.json.
UNK, CLS, SEP, MASK = 100, 101, 102, 103
VOCAB_SIZE = 28996  # len(tokenizer.vocab); also where VCR's person_N ids start
V_RANGE = [106, VOCAB_SIZE]  # [id of "!", len(vocab)]
IMG_LABEL_DIM = 1601  # utils/const.py: Visual Genome's 1600 classes + background
VE_ANS2LABEL = {"contradiction": 0, "entailment": 1, "neutral": 2}

# The map sizes the original writers open their LMDB environments with.
IMG_DB_MAP_SIZE = 1024**4  # convert_imgdir.py
TXT_DB_MAP_SIZE = 4 * 1024**4  # data/data.py TxtLmdb(readonly=False)

# generate_npz.py saves exactly these arrays, in this order, all as float16.
NPZ_KEYS = ("norm_bb", "features", "conf", "soft_labels")
IMG_DB_FORMS = ("msgpack", "npz", "npz-legacy")

# Placeholder paths written into meta.json where prepro.py writes its command-line arguments.
_ANN = "/ann"
_TXT = "/txt_db"


# --------------------------------------------------------------------------------------------
# Image side: detector dumps, per-image npz, img_db LMDB
# --------------------------------------------------------------------------------------------


def _rng(name: str) -> np.random.Generator:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def detection(
    name: str, boxes: int = 100, img_dim: int = 2048, above: int | None = None
) -> dict[str, np.ndarray]:
    """A fake bottom-up-attention dump of one image, as ``generate_npz.py`` holds it before saving.

    Emulates ``get_detections_from_im`` + ``save_to_npz`` of BUTD-UNITER-NLVR2's
    ``tools/generate_npz.py`` (MIN_BOXES = MAX_BOXES = 100, so ``boxes`` rows sorted by
    confidence, highest first). All arrays are float32 here; :func:`npz_bytes` casts to float16
    as the original does on save. ``norm_bb`` is computed from pixel boxes of a random image size
    exactly as the original does: ``(x1/w, y1/h, x1/w + bw/w, y1/h + bh/h, bw/w, bh/h)``.
    ``conf`` is 2-D, ``(boxes, 1)``, and ``above`` of its values are > 0.2 (random 6..40 when
    None). Values above the threshold are kept in [0.25, 0.99] and those below in [0.01, 0.15],
    so no rounding to float16 moves one across 0.2. ``soft_labels`` rows are class
    distributions over 1601 classes whose best foreground class holds at least ``conf``.
    Deterministic: seeded from the sha256 of ``name``.
    """
    rng = _rng(name)
    if above is None:
        above = int(rng.integers(6, 41))
    if not 0 <= above <= boxes:
        raise ValueError(f"above={above} must lie in [0, boxes={boxes}]")

    conf = np.concatenate([rng.uniform(0.25, 0.99, above), rng.uniform(0.01, 0.15, boxes - above)])
    conf = np.sort(conf)[::-1].astype(np.float32).reshape(boxes, 1)  # float64 → float32, 2-D

    image_w = int(rng.integers(320, 1025))
    image_h = int(rng.integers(240, 1025))
    x1 = rng.uniform(0, image_w - 16, boxes)
    y1 = rng.uniform(0, image_h - 16, boxes)
    x2 = rng.uniform(x1 + 8, image_w)
    y2 = rng.uniform(y1 + 8, image_h)
    pixel = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    bw = pixel[:, 2] - pixel[:, 0]
    bh = pixel[:, 3] - pixel[:, 1]
    sx, sy = pixel[:, 0] / float(image_w), pixel[:, 1] / float(image_h)
    sw, sh = bw / float(image_w), bh / float(image_h)
    norm_bb = np.stack([sx, sy, sx + sw, sy + sh, sw, sh], axis=1).astype(np.float32)

    features = np.maximum(rng.standard_normal((boxes, img_dim), dtype=np.float32), 0) * 2

    rest = rng.random((boxes, IMG_LABEL_DIM), dtype=np.float32) + 1e-3
    rest *= (1.0 - conf) / rest.sum(axis=1, keepdims=True)
    best = rng.integers(1, IMG_LABEL_DIM, boxes)  # class 0 is background
    rest[np.arange(boxes), best] += conf[:, 0]

    return {
        "norm_bb": norm_bb,
        "features": features.astype(np.float32),
        "conf": conf,
        "soft_labels": rest.astype(np.float32),
    }


def _as_saved(dump: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """generate_npz's four arrays first, in its order and cast to float16; any others after."""
    missing = [key for key in NPZ_KEYS if key not in dump]
    if missing:
        raise KeyError(f"detection dump lacks {missing}")
    saved = {key: np.asarray(dump[key]).astype(np.float16) for key in NPZ_KEYS}
    saved.update({key: np.asarray(arr) for key, arr in dump.items() if key not in NPZ_KEYS})
    return saved


def npz_bytes(dump: Mapping[str, np.ndarray]) -> bytes:
    """The per-image ``.npz`` file as ``generate_npz.py``'s ``save_to_npz`` writes it.

    ``np.savez_compressed`` with members ``norm_bb``, ``features``, ``conf``, ``soft_labels``
    in that order, each cast to float16 (the original stores float16, so convert_imgdir's
    float32 → float16 cast finds nothing to do). Extra arrays in ``dump`` follow unchanged —
    a way to build files that convert_imgdir rejects (e.g. a 0-d or 3-d array).
    """
    with io.BytesIO() as buffer:
        np.savez_compressed(buffer, **_as_saved(dump))
        return buffer.getvalue()


def write_npz_file(path: Path, dump: Mapping[str, np.ndarray]) -> Path:
    """Write :func:`npz_bytes` of ``dump`` to ``path`` (what ``save_to_npz`` leaves on disk)."""
    path = Path(path)
    path.write_bytes(npz_bytes(dump))
    return path


def box_count(conf: np.ndarray, conf_th: float = 0.2, max_bb: int = 100, min_bb: int = 10) -> int:
    """UNITER's number of boxes kept: boxes with conf > conf_th, clipped to [min_bb, max_bb].

    The rule of ``_compute_nbb`` in ``scripts/convert_imgdir.py`` (and ``compute_num_bb`` in
    ``data/data.py``). ``conf`` is compared in its own dtype, as numpy does with a Python float.
    """
    above = int((np.asarray(conf) > conf_th).sum())
    return int(min(max_bb, max(min_bb, above)))


def _img_db_name(conf_th: float, max_bb: int, min_bb: int, num_bb: int, keep_all: bool) -> str:
    if keep_all:
        return "all"
    if conf_th == -1:
        return f"feat_numbb{num_bb}"
    # argparse reads --conf_th as a float, so 0.2 → "0.2" and 1 → "1.0".
    return f"feat_th{float(conf_th)}_max{max_bb}_min{min_bb}"


def _convert_npz(raw: bytes, conf_th: float, max_bb: int, min_bb: int, keep_all: bool):
    """``load_npz`` of convert_imgdir: (arrays, nbb), or (None, 0) for a "corrupted" file."""
    with np.load(io.BytesIO(raw), allow_pickle=True) as img:
        nbb = None if keep_all else box_count(img["conf"], conf_th, max_bb, min_bb)
        out = {}
        for key in img.files:
            arr = img[key]
            if arr.dtype == np.float32:
                arr = arr.astype(np.float16)
            if arr.ndim not in (1, 2):
                return None, 0  # the original raises, prints "corrupted file" and skips it
            out[key] = arr[:nbb]
    return out, nbb


def _legacy_savez_compressed(arrays: Mapping[str, np.ndarray]) -> bytes:
    """``np.savez_compressed(w, **arrays, allow_pickle=True)`` as numpy < 2.1 executed it.

    Those numpy versions had no ``allow_pickle`` parameter on savez, so the flag was saved as one
    more member: a 0-d bool array ``allow_pickle.npy``, last. Same zip settings as numpy's
    ``_savez`` (deflate, zip64 allowed and forced per member).
    """
    members = {**arrays, "allow_pickle": True}
    with io.BytesIO() as buffer:
        with zipfile.ZipFile(
            buffer, mode="w", compression=zipfile.ZIP_DEFLATED, allowZip64=True
        ) as archive:
            for key, value in members.items():
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=True)
        return buffer.getvalue()


def _serialise_img(arrays: dict[str, np.ndarray], form: str) -> bytes:
    if form == "msgpack":
        # msgpack.dumps(dump, use_bin_type=True) after msgpack_numpy.patch()
        return msgpack_numpy.packb(arrays, use_bin_type=True)
    if form == "npz":
        with io.BytesIO() as buffer:
            np.savez_compressed(buffer, **arrays)  # numpy >= 2.1 swallows allow_pickle=True
            return buffer.getvalue()
    return _legacy_savez_compressed(arrays)


def write_img_db(
    split_dir: Path,
    dumps: dict[str, dict[str, np.ndarray]],
    *,
    conf_th: float = 0.2,
    max_bb: int = 100,
    min_bb: int = 10,
    num_bb: int = 100,
    keep_all: bool = False,
    form: str = "msgpack",
) -> Path:
    """An img_db split folder as ``scripts/convert_imgdir.py`` writes it; returns the LMDB path.

    ``dumps`` maps npz file names (``nlvr2_dev-850-0-img0.npz``, ``coco_val2014_000000262148.npz``
    …) to :func:`detection`-style dumps; each goes through :func:`npz_bytes` first, so the LMDB
    holds what convert_imgdir makes of generate_npz's files:

    - LMDB folder ``split_dir/feat_th{conf_th}_max{max_bb}_min{min_bb}``, or
      ``feat_numbb{num_bb}`` when ``conf_th == -1``, or ``all`` with ``keep_all``; with suffix
      ``_compressed`` for the npz forms (``--compress``);
    - one entry per image, keyed by the file name (utf-8), holding every npz member cut to its
      first ``nbb`` rows (float32 would be cast to float16). ``nbb`` is :func:`box_count` — also
      when ``conf_th == -1``, where ``num_bb`` only names the folder and ``max_bb`` still clips;
      ``keep_all`` keeps every row;
    - ``__keys__``: JSON list of the names written, in processing order (the original's order is
      that of a multiprocessing ``imap_unordered`` over a glob; here, the order of ``dumps``);
    - beside the LMDB, ``nbb_th{conf_th}_max{max_bb}_min{min_bb}.json`` ({name: nbb}), unless
      ``conf_th == -1`` or ``keep_all``.

    ``form``: ``"msgpack"`` (msgpack_numpy, ``use_bin_type=True``), ``"npz"``
    (``np.savez_compressed`` as numpy >= 2.1 writes it), ``"npz-legacy"`` (as numpy 1.x wrote
    it, with the extra 0-d ``allow_pickle`` member — what the released ``_compressed`` dbs hold).
    A dump holding an array that is neither 1-d nor 2-d is skipped, as the original skips
    "corrupted" files: absent from the LMDB, ``__keys__`` and the nbb json.
    """
    if form not in IMG_DB_FORMS:
        raise ValueError(f"form must be one of {IMG_DB_FORMS}, not {form!r}")
    for fname in dumps:
        if not fname.endswith(".npz") or "/" in fname:
            raise ValueError(f"{fname!r}: convert_imgdir only sees '*.npz' file names")
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    db_name = _img_db_name(conf_th, max_bb, min_bb, num_bb, keep_all)
    if form != "msgpack":
        db_name += "_compressed"
    db_path = split_dir / db_name

    name2nbb: dict[str, int | None] = {}
    env = lmdb.open(str(db_path), map_size=IMG_DB_MAP_SIZE)
    try:
        with env.begin(write=True) as txn:
            for fname, dump in dumps.items():
                arrays, nbb = _convert_npz(npz_bytes(dump), conf_th, max_bb, min_bb, keep_all)
                if not arrays:
                    continue
                txn.put(fname.encode("utf-8"), _serialise_img(arrays, form))
                name2nbb[fname] = nbb
            txn.put(b"__keys__", json.dumps(list(name2nbb)).encode("utf-8"))
    finally:
        env.close()

    if conf_th != -1 and not keep_all:
        nbb_json = split_dir / f"nbb_th{float(conf_th)}_max{max_bb}_min{min_bb}.json"
        with open(nbb_json, "w") as f:
            json.dump(name2nbb, f)
    return db_path


# --------------------------------------------------------------------------------------------
# Text side: tokenizer stand-in, txt_db LMDB, one builder per released txt_db
# --------------------------------------------------------------------------------------------

_PIECE = re.compile(r"\w+|[^\w\s]")
_IN_WORD = "@@"  # LightningDOT prepro marks word-piece continuations with this prefix


def _pieces(word: str) -> list[str]:
    return _PIECE.findall(word)


def _piece_id(piece: str) -> int:
    return V_RANGE[0] + zlib.crc32(piece.encode("utf-8")) % (V_RANGE[1] - V_RANGE[0])


def tokenize(text: str) -> list[int]:
    """Stand-in for prepro's ``bert_tokenize``: ids of the text, NOT BERT WordPiece ids.

    Like the original it splits on whitespace and tokenizes word by word (BERT's basic
    tokenizer splits punctuation off, kept here); each piece gets ``106 + crc32(piece) % 28890``,
    an id inside bert-base-cased's ``v_range`` [106, 28996). Case is kept (bert-base-cased).
    """
    return [_piece_id(piece) for word in text.strip().split() for piece in _pieces(word)]


def _tokenize_with_words(text: str) -> tuple[list[int], list[str]]:
    """LightningDOT's ``bert_tokenize``: (ids, tokens with ``@@`` on continuation pieces)."""
    if _IN_WORD in text:
        raise ValueError(f"text holds {_IN_WORD!r}")
    ids: list[int] = []
    words: list[str] = []
    for word in text.strip().split():
        pieces = _pieces(word)
        if not pieces:
            continue
        words.append(pieces[0])
        words.extend(f"{_IN_WORD}{piece}" for piece in pieces[1:])
        ids.extend(_piece_id(piece) for piece in pieces)
    return ids, words


def _default_meta() -> dict[str, Any]:
    return {"UNK": UNK, "CLS": CLS, "SEP": SEP, "MASK": MASK, "v_range": list(V_RANGE)}


def _uniter_meta(db_dir: Path, task: str, annotations: list[str], missing: str | None = None):
    """meta.json of UNITER's prepro.py: ``vars(opts)`` after it adds the tokenizer's ids."""
    return {
        "annotations": annotations,
        "missing_imgs": missing,
        "output": f"{_TXT}/{Path(db_dir).name}",
        "task": task,
        "toker": "bert-base-cased",
        "tokenizer": "bert-base-cased",
        **_default_meta(),
    }


def _lightningdot_meta(db_dir: Path, task: str, annotations: list[str]) -> dict[str, Any]:
    """meta.json of LightningDOT's uniter_model/prepro.py (``--bert`` instead of ``--toker``)."""
    return {
        "annotations": annotations,
        "output": f"{_TXT}/{Path(db_dir).name}",
        "task": task,
        "bert": "bert-base-cased",
        **_default_meta(),
    }


def write_txt_db(
    db_dir: Path,
    examples: dict[str, dict],
    jsons: dict[str, object],
    meta: dict | None = None,
) -> Path:
    """A txt_db folder as prepro.py writes it through ``data/data.py``'s ``TxtLmdb``.

    The folder is the LMDB environment itself (``data.mdb``, ``lock.mdb``); each example is
    stored under ``key.encode('utf-8')`` as ``lz4.frame.compress(msgpack.dumps(example,
    use_bin_type=True))`` (msgpack_numpy-patched, as data.py patches it). Beside it:
    ``meta.json`` (``json.dump(meta, f, indent=4)``; by default bert-base-cased's UNK 100,
    CLS 101, SEP 102, MASK 103 and v_range [106, 28996]) and ``<name>.json`` (plain
    ``json.dump``) for each entry of ``jsons`` (id2len, txt2img, img2txts, refs, images, …).
    Returns ``db_dir``.
    """
    db_dir = Path(db_dir)
    db_dir.mkdir(parents=True, exist_ok=True)
    with open(db_dir / "meta.json", "w") as f:
        json.dump(_default_meta() if meta is None else meta, f, indent=4)
    env = lmdb.open(str(db_dir), readonly=False, create=True, map_size=TXT_DB_MAP_SIZE)
    try:
        with env.begin(write=True) as txn:
            for key, example in examples.items():
                packed = msgpack_numpy.packb(example, use_bin_type=True)
                txn.put(key.encode("utf-8"), lz4.frame.compress(packed))
    finally:
        env.close()
    for name, dump in jsons.items():
        with open(db_dir / f"{name}.json", "w") as f:
            json.dump(dump, f)
    return db_dir


def _records(records: Iterable[dict | str]) -> list[dict]:
    """Deep copies of annotation records (JSON lines are parsed), so callers' stay untouched."""
    return [json.loads(r) if isinstance(r, str) else copy.deepcopy(r) for r in records]


def _coco_fname(image_id: int, split: str) -> str:
    return f"coco_{split}_{int(image_id):012}.npz"


def _flickr_fname(image_id: int) -> str:
    return f"flickr30k_{int(image_id):012}.npz"


def _vg_fname(image_id: int | str) -> str:
    return f"vg_{int(image_id):012}.npz"


def _gqa_fname(image_id: str) -> str:
    image_id = str(image_id)
    return f"gqa_{image_id}.npz" if "n" in image_id else f"gqa_{int(image_id):012}.npz"


def nlvr2_txt_db(
    db_dir: Path, records: Iterable[dict | str], missing_imgs: Iterable[str] | None = None
) -> Path:
    """An NLVR2 txt_db (``nlvr2_{train,dev,test1}.db``) as UNITER's ``prepro.py --task nlvr``.

    ``records``: the official ``{split}.json`` JSON lines (dicts or raw lines). Each example is
    the record plus ``input_ids``, ``img_fname`` = ``(nlvr2_{id}-img0.npz, nlvr2_{id}-img1.npz)``
    (``id`` = identifier without its last ``-N``; a tuple, read back as a list) and ``target``
    (1 for label "True", 0 otherwise, None when unlabelled); key = ``identifier``. Records with
    an image in ``missing_imgs`` are left out. Writes id2len.json and txt2img.json.
    """
    missing = set(missing_imgs) if missing_imgs is not None else None
    examples, id2len, txt2img = {}, {}, {}
    for example in _records(records):
        id_ = example["identifier"]
        img_id = "-".join(id_.split("-")[:-1])
        img_fname = (f"nlvr2_{img_id}-img0.npz", f"nlvr2_{img_id}-img1.npz")
        if missing and (img_fname[0] in missing or img_fname[1] in missing):
            continue
        input_ids = tokenize(example["sentence"])
        target = (1 if example["label"] == "True" else 0) if "label" in example else None
        txt2img[id_] = img_fname
        id2len[id_] = len(input_ids)
        example["input_ids"] = input_ids
        example["img_fname"] = img_fname
        example["target"] = target
        examples[id_] = example
    split = Path(db_dir).name.split(".")[0].split("_")[-1]
    meta = _uniter_meta(db_dir, "nlvr", [f"{_ANN}/{split}.json"], f"{_ANN}/missing_nlvr2_imgs.json")
    return write_txt_db(db_dir, examples, {"id2len": id2len, "txt2img": txt2img}, meta)


# VQA answer normalisation of the official VQA evaluation, as LightningDOT's utils/vqa.py
# applies it before looking answers up in ans2label.
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<")
_VQA_PUNCT += ("@", "`", ",", "?", "!")
_VQA_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_VQA_PERIOD = re.compile(r"\.(?!\d)")  # the original's look-behind is mistyped: only this bites
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4"}
_VQA_NUMBERS |= {"five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = {"a", "an", "the"}
# A subset of the evaluation's contraction table (apostrophe-less form → canonical form).
_VQA_CONTRACTIONS = {
    word.replace("'", ""): word
    for word in (
        *("ain't", "aren't", "can't", "couldn't", "didn't", "doesn't", "don't", "hasn't"),
        *("haven't", "isn't", "that's", "there's", "wasn't", "weren't", "what's", "won't"),
        *("wouldn't", "you're"),
    )
}


def _vqa_normalise(answer: str) -> str:
    """``preprocess_answer`` of the VQA evaluation (punctuation, periods, numbers, articles)."""
    out = answer
    for p in _VQA_PUNCT:
        drop = p + " " in answer or " " + p in answer or _VQA_DIGIT_COMMA.search(answer)
        out = out.replace(p, "" if drop else " ")
    # The original passes re.UNICODE (32) where re.sub takes count: at most 32 periods go.
    out = _VQA_PERIOD.sub("", out, count=int(re.UNICODE))
    words = [_VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES]
    return " ".join(words).replace(",", "")


def _vqa_score(count: int) -> float:
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def _vqa_target(answers: list[dict], ans2label: Mapping[str, int]) -> dict[str, list]:
    """``compute_target``: {labels, scores}; a single answer (VG, GQA) counts as ten."""
    counts: dict[str, int] = {}
    if len(answers) == 1:
        counts[_vqa_normalise(answers[0]["answer"])] = 10
    else:
        for answer in answers:
            key = _vqa_normalise(answer["answer"])
            counts[key] = counts.get(key, 0) + 1
    labels = [ans2label[a] for a in counts if a in ans2label]
    scores = [_vqa_score(c) for a, c in counts.items() if a in ans2label]
    return {"labels": labels, "scores": scores}


def _vqa_img_split(subtype: str) -> str:
    return "test2015" if subtype == "test-dev2015" else subtype


def vqa_txt_db(
    db_dir: Path,
    questions: list[dict],
    annotations: list[dict] | None,
    ans2label: dict[str, int] | None,
    subtype: str,
) -> Path:
    """A VQA txt_db (``vqa_{train,trainval,devval,test,vg}.db``) as LightningDOT's prepro ``vqa``.

    ``questions``: the ``questions`` list of ``v2_OpenEnded_mscoco_{subtype}_questions.json``;
    ``annotations``: the ``annotations`` list of ``v2_mscoco_{subtype}_annotations.json`` (None
    for test); ``subtype``: ``train2014``, ``val2014``, ``test2015``, ``test-dev2015`` (images of
    test2015), ``vg`` or ``gqa``. Key = ``str(question_id)``; example = the question plus
    ``toked_question``, ``input_ids``, ``img_fname`` (``coco_{split}_{image_id:012}.npz``,
    ``vg_{id:012}.npz``, ``gqa_…``), then every annotation field and ``target``
    ({labels, scores}: VQA score 0.3 per matching normalised answer, capped at 1).
    Writes id2len.json, txt2img.json, img2txts.json and, with annotations, ans2label.pkl.
    """
    split = _vqa_img_split(subtype)
    if split == "vg":
        fname_of = _vg_fname
    elif split == "gqa":
        fname_of = _gqa_fname
    else:

        def fname_of(image_id):
            return _coco_fname(image_id, split)

    examples, id2len, txt2img, img2txts = {}, {}, {}, {}
    for q in _records(questions):
        qid = str(q["question_id"])
        input_ids, toked = _tokenize_with_words(q["question"])
        img_fname = fname_of(q["image_id"])
        id2len[qid] = len(input_ids)
        txt2img[qid] = img_fname
        img2txts.setdefault(img_fname, []).append(qid)
        q["toked_question"] = toked
        q["input_ids"] = input_ids
        q["img_fname"] = img_fname
        examples[qid] = q
    if annotations is not None:
        for a in _records(annotations):
            q = examples[str(a["question_id"])]
            if q["question_id"] != a["question_id"] or q["image_id"] != a["image_id"]:
                raise ValueError(f"annotation {a['question_id']} does not match its question")
            q.update(a)
            q["target"] = _vqa_target(a["answers"], ans2label or {})
    annotation_files = [f"{_ANN}/v2_OpenEnded_mscoco_{subtype}_questions.json"]
    if annotations is not None:
        annotation_files += [
            f"{_ANN}/v2_mscoco_{subtype}_annotations.json",
            f"{_ANN}/ans2label.pkl",
        ]
    meta = _lightningdot_meta(db_dir, "vqa", annotation_files)
    jsons = {"id2len": id2len, "txt2img": txt2img, "img2txts": img2txts}
    db_dir = write_txt_db(db_dir, examples, jsons, meta)
    if annotations is not None:
        with open(db_dir / "ans2label.pkl", "wb") as f:
            pickle.dump(dict(ans2label or {}), f)
    return db_dir


def ve_txt_db(db_dir: Path, records: Iterable[dict | str]) -> Path:
    """An SNLI-VE txt_db (``ve_{train,dev,test}.db``) as LightningDOT's prepro ``ve``.

    ``records``: lines of ``snli_ve_{split}.jsonl``. Key = ``pairID``; example = the record
    plus ``image_id`` (int of ``Flikr30kID`` without ``.jpg``), ``toked_hypothesis``,
    ``input_ids`` (of ``sentence2``), ``target`` ({labels: [label of gold_label], scores: [1.0]}
    with contradiction 0, entailment 1, neutral 2; empty for an unknown label) and
    ``img_fname`` = ``flickr30k_{image_id:012}.npz``. Writes id2len, txt2img, img2txts.
    """
    examples, id2len, txt2img, img2txts = {}, {}, {}, {}
    for h in _records(records):
        hid = h["pairID"]
        h["image_id"] = int(h["Flikr30kID"].split(".")[0])
        input_ids, toked = _tokenize_with_words(h["sentence2"])
        img_fname = _flickr_fname(h["image_id"])
        id2len[hid] = len(input_ids)
        txt2img[hid] = img_fname
        img2txts.setdefault(img_fname, []).append(hid)
        h["toked_hypothesis"] = toked
        h["input_ids"] = input_ids
        gold = h["gold_label"]
        known = gold in VE_ANS2LABEL
        h["target"] = {
            "labels": [VE_ANS2LABEL[gold]] if known else [],
            "scores": [1.0] if known else [],
        }
        h["img_fname"] = img_fname
        examples[hid] = h
    split = Path(db_dir).name.split(".")[0].split("_")[-1]
    meta = _lightningdot_meta(db_dir, "ve", [f"{_ANN}/snli_ve_{split}.jsonl"])
    jsons = {"id2len": id2len, "txt2img": txt2img, "img2txts": img2txts}
    return write_txt_db(db_dir, examples, jsons, meta)


def itm_txt_db(db_dir: Path, karpathy_images: list[dict], dataset: str = "flickr") -> Path:
    """An image-text retrieval txt_db (``itm_flickr30k_*.db``, ``itm_coco_*.db``), LightningDOT's
    prepro ``itm``.

    ``karpathy_images``: entries of the ``images`` list of Karpathy's ``dataset_flickr30k.json``
    / ``dataset_coco.json``, one split. One example per sentence, key ``str(sentid)``: the
    sentence dict plus ``image_id`` (from the file name), ``toked_caption``, ``input_ids`` and
    ``img_fname`` (``flickr30k_{id:012}.npz``; ``coco_{train2014|val2014}_{id:012}.npz``, the
    COCO folder taken from the entry's ``filepath`` where the original reads it off the
    annotation file name). Writes id2len, txt2img, img2txts.
    """
    if dataset not in ("flickr", "coco"):
        raise ValueError(f"dataset must be 'flickr' or 'coco', not {dataset!r}")
    examples, id2len, txt2img, img2txts = {}, {}, {}, {}
    for entry in _records(karpathy_images):
        stem = entry["filename"].split(".jpg")[0]
        image_id = int(stem.split("_")[-1]) if re.search("[a-zA-Z]", stem) else int(stem)
        if dataset == "flickr":
            img_fname = _flickr_fname(image_id)
        else:
            img_fname = _coco_fname(image_id, entry["filepath"])
        for s in entry["sentences"]:
            s["image_id"] = image_id
            id_ = str(s["sentid"])
            txt2img[id_] = img_fname
            img2txts.setdefault(img_fname, []).append(id_)
            input_ids, toked = _tokenize_with_words(s["raw"])
            id2len[id_] = len(input_ids)
            s["toked_caption"] = toked
            s["input_ids"] = input_ids
            s["img_fname"] = img_fname
            examples[id_] = s
    source = "dataset_flickr30k.json" if dataset == "flickr" else "dataset_coco.json"
    meta = _lightningdot_meta(db_dir, "itm", [f"{_ANN}/{source}"])
    jsons = {"id2len": id2len, "txt2img": txt2img, "img2txts": img2txts}
    return write_txt_db(db_dir, examples, jsons, meta)


def re_txt_db(
    db_dir: Path,
    refs: list[dict],
    instances: dict,
    iid_to_ann_ids: Mapping[str, list[int]],
    split: str,
) -> Path:
    """A referring-expression txt_db (``refcoco+_{split}.db`` …), UNITER's ``prepro.py --task re``.

    ``refs``: the refer toolkit's ``refs(unc).p`` list; ``instances``: its COCO-style
    ``instances.json`` ({images, annotations, categories}); ``iid_to_ann_ids``: str(image id) →
    annotation ids in the order of the ground-truth box features (the ``iid_to_ann_ids`` field
    of ``iid_to_ann_ids.json``; the whole file is accepted too). One example per sentence, key
    ``str(sent_id)``: {sent_id, sent, ref_id, ann_id, image_id, bbox, input_ids, img_fname =
    ``visual_grounding_coco_gt_{image_id:012}.npz``}. Writes id2len, images (with ann_ids),
    annotations, categories and refs (those of ``split``) as JSON.
    """
    if "iid_to_ann_ids" in iid_to_ann_ids:
        iid_to_ann_ids = iid_to_ann_ids["iid_to_ann_ids"]
    image_set = {ref["image_id"] for ref in refs if ref["split"] == split}
    images = [
        {
            "id": img["id"],
            "file_name": img["file_name"],
            "ann_ids": iid_to_ann_ids[str(img["id"])],
            "height": img["height"],
            "width": img["width"],
        }
        for img in instances["images"]
        if img["id"] in image_set
    ]
    fields = ("id", "area", "bbox", "image_id", "category_id", "iscrowd")
    annotations = [
        {key: ann[key] for key in fields}
        for ann in instances["annotations"]
        if ann["image_id"] in image_set
    ]
    bbox_of = {ann["id"]: ann["bbox"] for ann in annotations}
    split_refs = [copy.deepcopy(ref) for ref in refs if ref["split"] == split]
    examples, id2len = {}, {}
    for ref in split_refs:
        for sent in ref["sentences"]:
            input_ids = tokenize(sent["sent"])
            id2len[str(sent["sent_id"])] = len(input_ids)
            examples[str(sent["sent_id"])] = {
                "sent_id": sent["sent_id"],
                "sent": sent["sent"],
                "ref_id": ref["ref_id"],
                "ann_id": ref["ann_id"],
                "image_id": ref["image_id"],
                "bbox": bbox_of[ref["ann_id"]],
                "input_ids": input_ids,
                "img_fname": f"visual_grounding_coco_gt_{int(ref['image_id']):012}.npz",
            }
    dataset = Path(db_dir).name.split("_")[0]
    annotation_files = [
        f"{_ANN}/{dataset}/refs(unc).p",
        f"{_ANN}/{dataset}/instances.json",
        f"{_ANN}/iid2bb_id/iid_to_ann_ids.json",
    ]
    meta = _uniter_meta(db_dir, "re", annotation_files)
    jsons = {
        "id2len": id2len,
        "images": images,
        "annotations": annotations,
        "categories": instances["categories"],
        "refs": split_refs,
    }
    return write_txt_db(db_dir, examples, jsons, meta)


def _vcr_text(tokens: list, objects: list[str], special: list[str]):
    """``process_vcr_text``: VCR's mixed token list → (text, image-region ids, text-region ids)."""
    text_regions: list[int] = []
    image_regions = [0] * len(objects)
    words: list[str] = []
    for token in tokens:
        if isinstance(token, str):
            for word in token.split(" "):
                words.append(word)
                text_regions.append(0)
            continue
        for index in token:
            text_regions.append(index + 1)
            image_regions[index] = index + 1
            name = objects[index]
            if "person" in name:
                name = f"{name}_{index}"
                if name not in special:
                    special.append(name)
            words.append(name)
    return " ".join(words), image_regions, text_regions


def _vcr_tokenize(special: list[str], text: str, text_regions: list[int]):
    """``bert_tokenize_for_vcr``: person_N → ``len(vocab) + N``'s slot; other words as usual."""
    position = {token: i for i, token in enumerate(special)}
    ids: list[int] = []
    words: list[str] = []
    regions: list[int] = []
    for index, word in enumerate(text.strip().split()):
        if word in position:
            words.append(word)
            ids.append(VOCAB_SIZE + position[word])
            regions.append(text_regions[index])
            continue
        pieces = _pieces(word)
        words.append(pieces[0])
        words.extend(f"{_IN_WORD}{piece}" for piece in pieces[1:])
        regions.extend([text_regions[index]] * len(pieces))
        ids.extend(_piece_id(piece) for piece in pieces)
    return ids, words, regions


def vcr_txt_db(
    db_dir: Path,
    records: Iterable[dict | str],
    split: str,
    object_categories: Mapping[str, int] | None = None,
) -> Path:
    """A VCR txt_db (``vcr_{train,val,test}.db``) as LightningDOT's prepro ``vcr``.

    ``records``: lines of VCR's ``{split}.jsonl``; ``object_categories``: name → index (VCR's
    ``object_categories.json``; made up from the records' object names, sorted, when None).
    Person objects become special tokens ``person_{i}`` (``person_0``…``person_80`` are
    predeclared, more appended) with ids ``28996 + position`` — outside ``v_range``. Key =
    ``str(annot_id)``; example = the record plus image_id, qa_target / qar_target (-1 when
    unlabelled), raw_q, image_region_tokens, object_ids (category + 1), toked_question,
    input_ids, toked_txt_region_tokens, raw_as, raw_rs, img_fname ``[vcr_gt_{split}_{image_id}
    .npz, vcr_{split}_{image_id}.npz]``, toked_as, toked_txt_region_tokens_a, input_ids_as,
    toked_rs, input_ids_rs, toked_txt_region_tokens_r. Writes id2len_qa ((question + longest
    answer) × 4), id2len_qar (that + longest rationale), txt2img, img2txts and special_tokens.
    """
    data = _records(records)
    if object_categories is None:
        names = sorted({name for record in data for name in record["objects"]})
        object_categories = {name: i for i, name in enumerate(names)}
    special = [f"person_{i}" for i in range(81)]
    examples, id2len_qa, id2len_qar, txt2img, img2txts = {}, {}, {}, {}, {}
    for q in data:
        q["image_id"] = Path(q["img_fn"].split("/")[-1]).stem
        q["qa_target"] = q.get("answer_label", -1)
        q["qar_target"] = q.get("rationale_label", -1)
        qid = str(q["annot_id"])
        q["raw_q"], image_regions, text_regions = _vcr_text(q["question"], q["objects"], special)
        q["image_region_tokens"] = image_regions
        input_ids, toked, toked_regions = _vcr_tokenize(special, q["raw_q"], text_regions)
        q["object_ids"] = [object_categories[name] + 1 for name in q["objects"]]
        q["toked_question"] = toked
        q["input_ids"] = input_ids
        q["toked_txt_region_tokens"] = toked_regions
        q["raw_as"], q["raw_rs"] = [], []
        img_fname_gt = f"vcr_gt_{split}_{q['image_id']}.npz"
        img_fname = f"vcr_{split}_{q['image_id']}.npz"
        txt2img[qid] = [img_fname_gt, img_fname]
        img2txts.setdefault(img_fname, []).append(qid)
        img2txts.setdefault(img_fname_gt, []).append(qid)

        per_choice: dict[str, tuple[list, list, list]] = {}
        for field, raw_key in (("answer_choices", "raw_as"), ("rationale_choices", "raw_rs")):
            all_ids, all_toked, all_regions = [], [], []
            for choice in q[field]:
                raw, _, regions = _vcr_text(choice, q["objects"], special)
                q[raw_key].append(raw)
                ids, toked_choice, toked_choice_regions = _vcr_tokenize(special, raw, regions)
                all_ids.append(ids)
                all_toked.append(toked_choice)
                all_regions.append(toked_choice_regions)
            per_choice[field] = (all_ids, all_toked, all_regions)
        ids_as, toked_as, regions_as = per_choice["answer_choices"]
        ids_rs, toked_rs, regions_rs = per_choice["rationale_choices"]
        longest_a = max((len(ids) for ids in ids_as), default=0)
        longest_r = max((len(ids) for ids in ids_rs), default=0)
        id2len_qa[qid] = (len(input_ids) + longest_a) * 4
        id2len_qar[qid] = id2len_qa[qid] + longest_r
        q["img_fname"] = [img_fname_gt, img_fname]
        q["toked_as"] = toked_as
        q["toked_txt_region_tokens_a"] = regions_as
        q["input_ids_as"] = ids_as
        q["toked_rs"] = toked_rs
        q["input_ids_rs"] = ids_rs
        q["toked_txt_region_tokens_r"] = regions_rs
        examples[qid] = q
    meta = _lightningdot_meta(db_dir, "vcr", [f"{_ANN}/{split}.jsonl"])
    jsons = {
        "id2len_qa": id2len_qa,
        "id2len_qar": id2len_qar,
        "txt2img": txt2img,
        "img2txts": img2txts,
        "special_tokens": special,
    }
    return write_txt_db(db_dir, examples, jsons, meta)


def caption_txt_db(db_dir: Path, annotations: list[dict], subtype: str) -> Path:
    """A COCO caption txt_db (``pretrain_coco_*.db``) as LightningDOT's prepro ``caption``.

    ``annotations``: the ``annotations`` list of ``captions_{subtype}.json`` ({id, image_id,
    caption}); ``subtype``: ``train2014`` or ``val2014``. Key = ``str(id)``; example = the
    annotation plus ``toked_caption``, ``input_ids`` and ``img_fname`` =
    ``coco_{subtype}_{image_id:012}.npz``. Writes id2len, txt2img, img2txts.
    """
    examples, id2len, txt2img, img2txts = {}, {}, {}, {}
    for q in _records(annotations):
        id_ = str(q["id"])
        input_ids, toked = _tokenize_with_words(q["caption"])
        img_fname = _coco_fname(q["image_id"], subtype)
        id2len[id_] = len(input_ids)
        txt2img[id_] = img_fname
        img2txts.setdefault(img_fname, []).append(id_)
        q["toked_caption"] = toked
        q["input_ids"] = input_ids
        q["img_fname"] = img_fname
        examples[id_] = q
    meta = _lightningdot_meta(db_dir, "caption", [f"{_ANN}/captions_{subtype}.json"])
    jsons = {"id2len": id2len, "txt2img": txt2img, "img2txts": img2txts}
    return write_txt_db(db_dir, examples, jsons, meta)


# --------------------------------------------------------------------------------------------
# Checkpoint: the released uniter-base.pt layout
# --------------------------------------------------------------------------------------------


def _uniter_layout(
    hidden: int,
    layers: int,
    intermediate: int,
    vocab: int,
    img_dim: int,
    max_position: int,
    type_vocab: int,
    head_keys: bool,
) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, kind) in ``UniterForPretraining.state_dict()`` order.

    kind: "w" weight matrix or embedding, "b" bias, "g"/"beta" LayerNorm weight/bias,
    "mask" the image mask embedding, "tie:<key>" a copy of an earlier tensor.
    """
    out: list[tuple[str, tuple[int, ...], str]] = []

    def linear(prefix: str, n_out: int, n_in: int) -> None:
        out.append((f"{prefix}.weight", (n_out, n_in), "w"))
        out.append((f"{prefix}.bias", (n_out,), "b"))

    def norm(prefix: str) -> None:  # FusedLayerNorm: weight/bias, not gamma/beta
        out.append((f"{prefix}.weight", (hidden,), "g"))
        out.append((f"{prefix}.bias", (hidden,), "beta"))

    emb = "uniter.embeddings"
    out.append((f"{emb}.word_embeddings.weight", (vocab, hidden), "w"))
    out.append((f"{emb}.position_embeddings.weight", (max_position, hidden), "w"))
    out.append((f"{emb}.token_type_embeddings.weight", (type_vocab, hidden), "w"))
    norm(f"{emb}.LayerNorm")
    img = "uniter.img_embeddings"
    linear(f"{img}.img_linear", hidden, img_dim)
    norm(f"{img}.img_layer_norm")
    norm(f"{img}.pos_layer_norm")
    linear(f"{img}.pos_linear", hidden, 7)
    out.append((f"{img}.mask_embedding.weight", (2, img_dim), "mask"))
    norm(f"{img}.LayerNorm")
    for i in range(layers):
        layer = f"uniter.encoder.layer.{i}"
        for name in ("query", "key", "value"):
            linear(f"{layer}.attention.self.{name}", hidden, hidden)
        linear(f"{layer}.attention.output.dense", hidden, hidden)
        norm(f"{layer}.attention.output.LayerNorm")
        linear(f"{layer}.intermediate.dense", intermediate, hidden)
        linear(f"{layer}.output.dense", hidden, intermediate)
        norm(f"{layer}.output.LayerNorm")
    linear("uniter.pooler.dense", hidden, hidden)
    if not head_keys:
        return out
    # MLM head: BertLMPredictionHead registers its own bias before its children.
    out.append(("cls.predictions.bias", (vocab,), "b"))
    linear("cls.predictions.transform.dense", hidden, hidden)
    norm("cls.predictions.transform.LayerNorm")
    out.append(
        ("cls.predictions.decoder.weight", (vocab, hidden), f"tie:{emb}.word_embeddings.weight")
    )
    # MRFR head: the tied weight (img_linear's, used transposed) and bias before its net.
    out.append(("feat_regress.weight", (hidden, img_dim), f"tie:{img}.img_linear.weight"))
    out.append(("feat_regress.bias", (img_dim,), "b"))
    linear("feat_regress.net.0", hidden, hidden)
    norm("feat_regress.net.2")
    # MRC head and ITM head.
    linear("region_classifier.net.0", hidden, hidden)
    norm("region_classifier.net.2")
    linear("region_classifier.net.3", IMG_LABEL_DIM, hidden)
    linear("itm_output", 2, hidden)
    return out


def write_uniter_checkpoint(
    path: Path,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 2,
    intermediate: int = 256,
    vocab: int = 28996,
    img_dim: int = 2048,
    max_position: int = 512,
    type_vocab: int = 2,
    head_keys: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A ``torch.save``'d state dict with the key names of UNITER's released ``uniter-base.pt``.

    What ``utils/save.py``'s ``ModelSaver`` saves of ``UniterForPretraining``: a plain dict (no
    OrderedDict, no ``_metadata``), keys ``uniter.embeddings.*`` (word/position/token_type
    embeddings, ``LayerNorm``), ``uniter.img_embeddings.*`` (img_linear, img_layer_norm,
    pos_layer_norm, pos_linear (in 7), mask_embedding (2 × img_dim, row 0 zero), LayerNorm),
    ``uniter.encoder.layer.{i}.*`` (BERT layer names), ``uniter.pooler.dense.*``; LayerNorm
    parameters are ``weight``/``bias`` (apex FusedLayerNorm), not ``gamma``/``beta``. With
    ``head_keys``, the pre-training heads follow: ``cls.predictions.*`` (decoder tied to the
    word embeddings), ``feat_regress.*`` (weight tied to img_linear's), ``region_classifier.*``
    (1601 labels) and ``itm_output.*``. Tied entries hold equal values in separate tensors, as
    ``v.cpu()`` of GPU tensors leaves them. Random values from ``seed`` (weights N(0, 0.02),
    biases N(0, 0.02), LayerNorm weights near 1); ``dtype`` float16 gives what training under
    apex O2 would have saved. ``heads`` changes no shape; it must divide ``hidden``.
    """
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
    layout = _uniter_layout(
        hidden, layers, intermediate, vocab, img_dim, max_position, type_vocab, head_keys
    )
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape, kind in layout:
        if kind.startswith("tie:"):
            state[key] = state[kind[4:]].clone()
            continue
        noise = torch.randn(shape, generator=generator)
        if kind in ("w", "b", "mask"):
            value = noise * 0.02
            if kind == "mask":
                value[0] = 0  # UniterImageEmbeddings zeroes the "no mask" row when it runs
        elif kind == "g":
            value = 1 + noise * 0.1
        else:
            value = noise * 0.1
        state[key] = value.to(dtype)
    torch.save(state, Path(path))
    return state
