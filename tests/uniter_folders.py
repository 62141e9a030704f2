"""Small data folders of every task in the two real layouts users arrive with: the official
annotation files with UNITER's img_db, and UNITER's release (txt_db + img_db) made from the same
annotations by `uniter_release`'s independent writers. Images are fake detections (64-d), so a
release-layout checkpoint of tiny widths (`img_dim=64`) reads them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from uniter_release import (
    caption_txt_db,
    detection,
    itm_txt_db,
    nlvr2_txt_db,
    re_txt_db,
    tokenize,
    vcr_txt_db,
    ve_txt_db,
    vqa_txt_db,
    write_img_db,
    write_txt_db,
)

IMG_DIM = 64
#: a few detector boxes an image, 12 of them confident: UNITER keeps those 12
BOXES = 16


def features(keys: list[str], split: Path, gt: bool = False) -> None:
    """An img_db split folder holding a fake detection per key (`feat_numbb100` for ground-truth
    boxes, as UNITER's RE and VCR gt dbs, else `feat_th0.2_max100_min10`)."""
    dumps = {key: detection(key, boxes=BOXES, img_dim=IMG_DIM, above=12) for key in keys}
    write_img_db(split, dumps, conf_th=-1 if gt else 0.2)


def _json(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def _lines(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# NLVR2 ------------------------------------------------------------------------------------

SENTENCES = ("There are two dogs.", "One image shows a red bird.", "No image has a cat.")


def _nlvr2(split: str) -> list[dict]:
    return [
        {
            "sentence": SENTENCES[i % 3],
            "label": "True" if i % 2 else "False",
            "identifier": f"{split}-{i // 2}-{i % 2}-0",
        }
        for i in range(8)
    ]


def _nlvr2_keys(records: list[dict]) -> list[str]:
    pairs = {r["identifier"].rsplit("-", 1)[0] for r in records}
    return sorted(f"nlvr2_{p}-img{k}.npz" for p in pairs for k in (0, 1))


def nlvr2(root: Path, release: bool) -> None:
    for split in ("train", "dev"):
        records = _nlvr2(split)
        features(_nlvr2_keys(records), root / "img_db" / f"nlvr2_{split}")
        if release:
            nlvr2_txt_db(root / "txt_db" / f"nlvr2_{split}.db", records)
        else:
            _lines(root / f"{split}.json", records)


# VQA --------------------------------------------------------------------------------------

ANSWERS = ("yes", "no", "2")


def _vqa(first_image: int) -> tuple[list[dict], list[dict]]:
    """Twenty questions (answers given nine or more times, as UNITER's vocabulary needs)."""
    questions, annotations = [], []
    for i in range(20):
        image_id = first_image + i // 2
        question_id = image_id * 1000 + i % 2
        answer = ANSWERS[i % 3]
        questions.append(
            {"image_id": image_id, "question": "Is it sunny?", "question_id": question_id}
        )
        answers = [answer] * 8 + ["maybe", "yes"]
        annotations.append(
            {
                "question_type": "is it",
                "multiple_choice_answer": answer,
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": j}
                    for j, a in enumerate(answers, 1)
                ],
                "image_id": image_id,
                "answer_type": "other",
                "question_id": question_id,
            }
        )
    return questions, annotations


def vqa(root: Path, release: bool) -> None:
    ans2label = {answer: i for i, answer in enumerate(sorted(ANSWERS))}
    for subtype, first, db in (("train2014", 1, "train"), ("val2014", 500, "devval")):
        questions, annotations = _vqa(first)
        keys = sorted({f"coco_{subtype}_{q['image_id']:012}.npz" for q in questions})
        features(keys, root / "img_db" / f"coco_{subtype}")
        if release:
            vqa_txt_db(root / "txt_db" / f"vqa_{db}.db", questions, annotations, ans2label, subtype)
            continue
        header = {"data_subtype": subtype, "task_type": "Open-Ended", "data_type": "mscoco"}
        _json(
            root / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
            {**header, "questions": questions},
        )
        _json(
            root / f"v2_mscoco_{subtype}_annotations.json", {**header, "annotations": annotations}
        )


# SNLI-VE ----------------------------------------------------------------------------------

LABELS = ("entailment", "neutral", "contradiction", "-")


def _snli_ve(first_image: int) -> list[dict]:
    return [
        {
            "Flikr30kID": f"{first_image + i // 3}.jpg",
            "gold_label": LABELS[i % 4],
            "pairID": f"{first_image + i // 3}.jpg#0r1{i}",
            "sentence1": "A dog runs.",
            "sentence2": "An animal is outside.",
        }
        for i in range(9)
    ]


def snli_ve(root: Path, release: bool) -> None:
    splits = {"train": _snli_ve(1000092795), "dev": _snli_ve(2000)}
    images = {r["Flikr30kID"][:-4] for records in splits.values() for r in records}
    features(sorted(f"flickr30k_{int(i):012}.npz" for i in images), root / "img_db" / "flickr30k")
    for split, records in splits.items():
        if release:
            ve_txt_db(root / "txt_db" / f"ve_{split}.db", records)
        else:
            _lines(root / f"snli_ve_{split}.jsonl", records)


# Retrieval and pre-training: Karpathy splits -----------------------------------------------


def _karpathy(stems: dict[str, list[str]], suffix: str = ".jpg") -> list[dict]:
    images, sentid = [], 0
    for split, names in stems.items():
        for name in names:
            sentences = []
            for k in range(5):
                raw = f"A {('red', 'blue', 'green')[k % 3]} thing number {len(images)} and {k}."
                sentences.append({"tokens": raw.split(), "raw": raw, "imgid": len(images)})
                sentences[-1]["sentid"] = sentid
                sentid += 1
            entry = {"sentids": [s["sentid"] for s in sentences], "imgid": len(images)}
            entry.update(sentences=sentences, split=split, filename=f"{name}{suffix}")
            if name.startswith("COCO_"):
                entry["filepath"] = name.split("_")[1]
            images.append(entry)
    return images


def retrieval(root: Path, release: bool) -> None:
    stems = {"train": [str(1000 + i) for i in range(6)], "val": [str(2000 + i) for i in range(4)]}
    images = _karpathy(stems)
    keys = [f"flickr30k_{int(s):012}.npz" for names in stems.values() for s in names]
    features(keys, root / "img_db" / "flickr30k")
    if not release:
        _json(root / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
        return
    for split in stems:
        entries = [e for e in images if e["split"] == split]
        itm_txt_db(root / "txt_db" / f"itm_flickr30k_{split}.db", entries)


def pretrain(root: Path, release: bool) -> None:
    stems = {
        "train": [f"COCO_train2014_{i:012}" for i in range(1, 5)],
        "restval": [f"COCO_val2014_{i:012}" for i in range(100, 102)],
        "val": [f"COCO_val2014_{i:012}" for i in range(200, 203)],
    }
    for subtype in ("train2014", "val2014"):
        keys = [f"{s.lower()}.npz" for names in stems.values() for s in names if subtype in s]
        features(keys, root / "img_db" / f"coco_{subtype}")
    images = _karpathy(stems)
    if not release:
        _json(root / "dataset_coco.json", {"images": images, "dataset": "coco"})
        return
    for split in stems:
        captions = [
            {"id": s["sentid"], "image_id": int(e["filename"][-16:-4]), "caption": s["raw"]}
            for e in images
            if e["split"] == split
            for s in e["sentences"]
        ]
        subtype = "train2014" if split == "train" else "val2014"
        caption_txt_db(root / "txt_db" / f"pretrain_coco_{split}.db", captions, subtype)


# RefCOCO+ ---------------------------------------------------------------------------------


def refcoco(root: Path, release: bool) -> None:
    images, annotations, refs = [], [], []
    split_of = {1: "train", 2: "train", 3: "val", 4: "val"}
    for image_id, split in split_of.items():
        images.append(
            {"file_name": f"COCO_train2014_{image_id:012}.jpg", "height": 480, "width": 640}
        )
        images[-1]["id"] = image_id
        for k in range(3):
            ann_id = image_id * 10 + k
            bbox = [40.0 + 150 * k, 60.0, 120.0, 200.0]
            annotations.append({"id": ann_id, "image_id": image_id, "bbox": bbox, "area": 24000.0})
            annotations[-1].update(category_id=1, iscrowd=0)
        ref_id = len(refs)
        sentences = [
            {"sent": text, "raw": text, "tokens": text.split(), "sent_id": ref_id * 10 + j}
            for j, text in enumerate(("the left one", "leftmost thing"))
        ]
        refs.append(
            {"ref_id": ref_id, "ann_id": image_id * 10, "image_id": image_id, "split": split}
        )
        refs[-1].update(sentences=sentences, sent_ids=[s["sent_id"] for s in sentences])
    instances = {"images": images, "annotations": annotations, "categories": [{"id": 1}]}
    # UNITER's gt db holds an image's annotated boxes; its det db what a detector found.
    ids = sorted(split_of)
    features(
        [f"visual_grounding_coco_gt_{i:012}.npz" for i in ids],
        root / "img_db" / "re_coco_gt",
        gt=True,
    )
    features(
        [f"visual_grounding_det_coco_{i:012}.npz" for i in ids], root / "img_db" / "re_coco_det"
    )
    if not release:
        _json(root / "refcoco+" / "instances.json", instances)
        _json(root / "refcoco+" / "refs(unc).json", refs)
        return
    order = {str(i): [i * 10 + k for k in range(3)] for i in ids}
    for split in ("train", "val"):
        re_txt_db(root / "txt_db" / "re" / f"refcoco+_{split}.db", refs, instances, order, split)


# VCR --------------------------------------------------------------------------------------


def _vcr(split: str) -> list[dict]:
    records = []
    for i in range(6):
        stem = f"movie_{split}_{i}@{i % 2}"
        choice = [["Because", [0], "is", "there", "."]] + [["No", "."]] * 3
        records.append(
            {
                "objects": ["person", "dog"],
                "question": ["Why", "is", [0, 1], "here", "?"],
                "answer_choices": choice,
                "rationale_choices": [["The", [1], "waits", "."]] * 4,
                "answer_label": i % 4,
                "rationale_label": (i + 1) % 4,
                "img_fn": f"movie/{stem}.jpg",
                "annot_id": f"{split}-{i}",
            }
        )
    return records


def vcr(root: Path, release: bool) -> None:
    for split in ("train", "val"):
        records = _vcr(split)
        stems = [r["img_fn"][6:-4] for r in records]
        features(
            [f"vcr_gt_{split}_{s}.npz" for s in stems], root / "img_db" / f"vcr_gt_{split}", gt=True
        )
        features([f"vcr_{split}_{s}.npz" for s in stems], root / "img_db" / f"vcr_{split}")
        if release:
            vcr_txt_db(root / "txt_db" / f"vcr_{split}.db", records, split)
        else:
            _lines(root / f"{split}.jsonl", records)


# GQA --------------------------------------------------------------------------------------


def _gqa(split: str) -> dict[str, dict]:
    images = ["2354", "2355"] if split == "train" else ["n161313", "n161314"]
    return {
        str(i + (0 if split == "train" else 100)): {
            "question": "Is the sky blue?",
            "imageId": images[i % 2],
            "answer": ("yes", "no")[i % 2],
            "fullAnswer": "Yes, it is.",
        }
        for i in range(6)
    }


def _gqa_key(image: str) -> str:
    return f"gqa_{image}.npz" if image.startswith("n") else f"gqa_{int(image):012}.npz"


def gqa(root: Path, release: bool) -> None:
    for split in ("train", "testdev"):
        questions = _gqa(split)
        keys = sorted({_gqa_key(q["imageId"]) for q in questions.values()})
        features(keys, root / "img_db" / f"gqa_{split}")
        if not release:
            _json(root / f"{split}_balanced_questions.json", questions)
            continue
        # The GQA txt_db of UNITER's authors' fuller prepro: the record, input_ids, img_fname.
        examples = {
            qid: {**q, "input_ids": tokenize(q["question"]), "img_fname": _gqa_key(q["imageId"])}
            for qid, q in questions.items()
        }
        lengths = {qid: len(e["input_ids"]) for qid, e in examples.items()}
        txt2img = {qid: e["img_fname"] for qid, e in examples.items()}
        write_txt_db(
            root / "txt_db" / f"gqa_{split}.db", examples, {"id2len": lengths, "txt2img": txt2img}
        )


FOLDERS: dict[str, Callable[[Path, bool], None]] = {
    "nlvr2": nlvr2,
    "vqa": vqa,
    "gqa": gqa,
    "snli-ve": snli_ve,
    "refcoco+": refcoco,
    "retrieval": retrieval,
    "vcr": vcr,
    "pretrain": pretrain,
}


def write_folder(root: Path, task: str, release: bool) -> Path:
    """`root` filled with `task`'s small data set: UNITER's release (txt_db + img_db) or the
    official annotation files with UNITER's img_db."""
    root.mkdir(parents=True, exist_ok=True)
    FOLDERS[task](root, release)
    return root
