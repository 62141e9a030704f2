"""The world's VQA v2 split: subtypes `train` and `dev`, each a questions file and an
annotations file in the release's layout, two questions an image (VQA v2's numbering,
image_id*1000+k) with ten human-like answers each, and the images' COCO-named pictures and region
features."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from vl_prune.world import WorldSplit
from vl_prune_plugins.tasks.annotations import write_json
from vl_prune_plugins.world import VERSION
from vl_prune_plugins.world.images import new_scene, scene_rng, write_image
from vl_prune_plugins.world.language import human_answers, question
from vl_prune_plugins.world.scenes import WorldSettings

WORLD_SIZES = {"train": 2000, "dev": 500}
QUESTIONS_PER_IMAGE = 2
# The world's files carry the official header fields; the license is the project's own.
INFO = {
    "description": "The embedded synthetic world of vl_prune, in the layout of VQA v2.0.",
    "url": "",
    "version": "2.0",
    "year": 1970,
    "contributor": "vl_prune",
    # Fixed, so that the same seed always writes the same bytes.
    "date_created": "1970-01-01 00:00:00",
}
LICENSE = {"url": "https://opensource.org/licenses/MIT", "name": "MIT License"}


def write(out: Path, seed: int = 0) -> None:
    """The split's files under `out`, the same bytes for the same seed."""
    settings = WorldSettings(seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    for split, size in WORLD_SIZES.items():
        rng = scene_rng(settings, "vqa", split)
        questions, annotations = [], []
        for i in range(size):
            # COCO image ids start at 1; VQA v2 numbers an image's questions image_id*1000+k.
            image_id, k = i // QUESTIONS_PER_IMAGE + 1, i % QUESTIONS_PER_IMAGE
            scene = new_scene(settings, "vqa", split, image_id)
            if k == 0:
                write_image(scene, f"COCO_{split}_{image_id:012d}", out, settings)
            text, answer, kind = question(scene, rng, settings)
            ten = human_answers(answer, kind, rng, settings)
            question_id = image_id * 1000 + k
            questions.append({"image_id": image_id, "question": text, "question_id": question_id})
            annotations.append(_annotation(question_id, image_id, text, ten, kind))
        write_json(
            out / f"v2_OpenEnded_mscoco_{split}_questions.json",
            {
                "info": INFO,
                "task_type": "Open-Ended",
                "data_type": "mscoco",
                "license": LICENSE,
                "data_subtype": split,
                "questions": questions,
            },
        )
        write_json(
            out / f"v2_mscoco_{split}_annotations.json",
            {
                "info": INFO,
                "license": LICENSE,
                "data_subtype": split,
                "annotations": annotations,
            },
        )


SPLIT = WorldSplit(
    write=write,
    # Dense at its plateau from the world θ0 (benchmarks/dense_plateau.py, 3 seeds, 2 threads):
    # 0.884 ± 0.030 at 900 steps, 0.938 ± 0.007 at 1,800, 0.935 ± 0.006 at 3,600 (34 s a run at
    # 1,800). Dropout 0, as for nlvr2.
    recipe={"steps": 1800, "lr": 1e-3, "batch_size": 32, "dropout": 0.0},
    version=VERSION,
    description="VQA v2 questions and annotations: open questions with ten answers each",
)


def _annotation(question_id: int, image_id: int, text: str, answers: list[str], kind: str) -> dict:
    """An annotation in the official release's field order."""
    return {
        # VQA's question types are leading words: "how many", "is there", "what color", …
        "question_type": " ".join(text.split()[:2]),
        "multiple_choice_answer": Counter(answers).most_common(1)[0][0],
        "answers": [
            {"answer": answer, "answer_confidence": "yes", "answer_id": j}
            for j, answer in enumerate(answers, 1)
        ],
        "image_id": image_id,
        "answer_type": kind,
        "question_id": question_id,
    }
