"""The world's VCR split: `train.jsonl` and `val.jsonl` in the release's lines, each a counting
or colour question about one scene with four answer and four rationale choices, with the images'
pictures, region features and VCR's per-image metadata (`vcr1images/<movie>/<stem>.json`)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from vl_prune.world import WorldSplit
from vl_prune_plugins.tasks.annotations import write_json_lines
from vl_prune_plugins.tasks.vcr import CHOICES
from vl_prune_plugins.world import VERSION
from vl_prune_plugins.world.commonsense import Question, commonsense_question
from vl_prune_plugins.world.images import new_scene, scene_rng, write_image
from vl_prune_plugins.world.scenes import Scene, WorldSettings

WORLD_SIZES = {"train": 2000, "val": 500}
#: the world's stand-in for VCR's movie folders (`lsmdc_1054_Harry_Potter_…`)
WORLD_MOVIE = "world"


def write(out: Path, seed: int = 0) -> None:
    """The split's files under `out`, the same bytes for the same seed."""
    settings = WorldSettings(seed=seed)
    metadata = out / "vcr1images" / WORLD_MOVIE
    metadata.mkdir(parents=True, exist_ok=True)
    for split, size in WORLD_SIZES.items():
        rng = scene_rng(settings, "vcr", split)
        records = []
        for i in range(size):
            scenes = partial(new_scene, settings, "vcr", split, i)
            scene, question = commonsense_question(rng, settings, scenes)
            stem = f"{split}-{i}"
            write_image(scene, stem, out, settings)
            # Plain writes, as write_image's: the world's folder is renamed once complete.
            (metadata / f"{stem}.json").write_text(json.dumps(_metadata(scene, settings)))
            records.append(_record(split, i, stem, scene, question))
        write_json_lines(out / f"{split}.jsonl", records)


SPLIT = WorldSplit(
    write=write,
    # Batches of 16 questions are 128 choice rows. Measured on uniter-tiny's world θ0: at lr 1e-3
    # the choice logits stayed level; at 3e-4 the counting half is learnt by step 300 for every
    # seed tried (val Q→AR 0.14-0.18), by step 150 for few (0.09), and batches of 8 were erratic.
    # Not a plateau (benchmarks/dense_plateau.py, 3 seeds, one thread): Q→AR 0.204 ± 0.060 at
    # 300 steps, 0.352 ± 0.047 at 600 (63 s a run at 300; chance is 1/16).
    recipe={"steps": 300, "lr": 3e-4, "batch_size": 16},
    version=VERSION,
    description="VCR JSON lines: counting and colour questions with answer and rationale choices",
)


def _original(tokens: list[Any]) -> str:
    """A text as VCR's `*_orig` fields keep it: references as 1-based object numbers."""
    return " ".join(
        token if isinstance(token, str) else " and ".join(str(k + 1) for k in token)
        for token in tokens
    )


def _metadata(scene: Scene, settings: WorldSettings) -> dict:
    """VCR's per-image metadata: a box [x1, y1, x2, y2, score] per object in pixels, and its
    segmentation, here the box's outline, as one polygon per object."""
    size = settings.image_size
    boxes, segms = [], []
    for thing in scene.things:
        x1, y1, x2, y2 = (round(v * size, 2) for v in thing.box())
        boxes.append([x1, y1, x2, y2, 1.0])
        segms.append([[[x1, y1], [x2, y1], [x2, y2], [x1, y2]]])
    return {
        "boxes": boxes,
        "segms": segms,
        "names": [thing.shape for thing in scene.things],
        "width": size,
        "height": size,
    }


def _record(split: str, i: int, stem: str, scene: Scene, question: Question) -> dict:
    """A line in the release's field order; the world has no movies, likelihoods or sources."""
    right_answer = question.answers[question.answer_label]
    right_rationale = question.rationales[question.rationale_label]
    return {
        "movie": WORLD_MOVIE,
        "objects": [thing.shape for thing in scene.things],
        "interesting_scores": [],
        "answer_likelihood": "likely",
        "img_fn": f"{WORLD_MOVIE}/{stem}.png",
        "metadata_fn": f"{WORLD_MOVIE}/{stem}.json",
        "answer_orig": _original(right_answer),
        "question_orig": _original(question.question),
        "rationale_orig": _original(right_rationale),
        "question": question.question,
        "answer_match_iter": list(range(CHOICES)),
        "answer_sources": [i if j == question.answer_label else -1 for j in range(CHOICES)],
        "answer_choices": question.answers,
        "answer_label": question.answer_label,
        "rationale_choices": question.rationales,
        "rationale_sources": [i if j == question.rationale_label else -1 for j in range(CHOICES)],
        "rationale_match_iter": list(range(CHOICES)),
        "rationale_label": question.rationale_label,
        "img_id": f"{split}-{i}",
        "question_number": 0,
        "annot_id": f"{split}-{i}",
        "match_fold": f"{split}-0",
        "match_index": i,
    }
