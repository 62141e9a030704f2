"""The world's SNLI-VE split: `snli_ve_train.jsonl` and `snli_ve_dev.jsonl` in the lines the
SNLI-VE generator writes, with the premise images' pictures and region features.

The world's premise images are each one of a pair whose other image is never shown, and every
hypothesis speaks of both: "the image contains a red object and at least one image contains a
circle ." The visible image settles it (entailment or contradiction) or it does not (neutral:
the unseen image decides). Each image gets one hypothesis of each label, as in SNLI, so the
image alone does not tell the label; the words of all three are drawn before the image, and
images until each has its label, so the words alone do not tell it either.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path

from vl_prune.world import WorldSplit
from vl_prune_plugins.tasks.annotations import write_json_lines
from vl_prune_plugins.tasks.snli_ve import LABELS
from vl_prune_plugins.world import VERSION
from vl_prune_plugins.world.images import new_scene, scene_rng, write_image
from vl_prune_plugins.world.language import captions
from vl_prune_plugins.world.scenes import Scene, WorldSettings

#: images per world split; each gets three hypotheses, one of each label
WORLD_SIZES = {"train": 700, "dev": 200}
# Flickr30k ids are numbers; the world numbers each split's images from here.
FIRST_IMAGE = {"train": 1_000_000, "dev": 2_000_000}


def write(out: Path, seed: int = 0) -> None:
    """The split's files under `out`, the same bytes for the same seed."""
    settings = WorldSettings(seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    for split, size in WORLD_SIZES.items():
        rng = scene_rng(settings, "snli-ve", split)
        records = []
        for i in range(size):
            # The words of each label's hypothesis are drawn before the image; images are
            # then drawn until every hypothesis has its label (new words now and then: some
            # draws ask for a thing both present and absent).
            for attempt in itertools.count():
                if attempt % 50 == 0:
                    drawn = {label: Hypothesis.draw(rng, settings) for label in LABELS}
                scene = new_scene(settings, "snli-ve", split, i, attempt)
                if all(h.label(scene) == label for label, h in drawn.items()):
                    break
            image = str(FIRST_IMAGE[split] + i)
            write_image(scene, image, out, settings)
            caption = " ".join(captions(scene))
            for label, h in drawn.items():
                records.append(_record(image, caption, h.text(), label))
        write_json_lines(out / f"snli_ve_{split}.jsonl", records)


SPLIT = WorldSplit(
    write=write,
    # Dense at its plateau from the world θ0 (benchmarks/dense_plateau.py, 3 seeds, one thread,
    # chance 1/3): 0.754 ± 0.035 at 200 steps, 0.998 ± 0.003 at 400, 0.999 ± 0.001 at 800 (19 s
    # a run at 400). Dropout 0, as for vqa: with the model's dropout it took twice the steps
    # (0.944 ± 0.060 at 400 steps, 0.999 ± 0.001 at 800; 43 s a run at 800).
    recipe={"steps": 400, "lr": 1e-3, "batch_size": 32, "dropout": 0.0},
    version=VERSION,
    description="SNLI-VE JSON lines: hypotheses each image leaves true, false or open",
)


def _record(image: str, caption: str, hypothesis: str, label: str) -> dict:
    """A line as the SNLI-VE generator writes it: SNLI's fields plus `Flikr30kID`, keys
    sorted. The world has no parser: the parses are flat bracketings of the words."""
    caption_id = f"{image}.jpg#0"
    return {
        "Flikr30kID": f"{image}.jpg",
        "annotator_labels": [label],
        "captionID": caption_id,
        "gold_label": label,
        # SNLI's pair ids: the caption id, the hypothesis round and the label's initial.
        "pairID": f"{caption_id}r1{label[0]}",
        "sentence1": caption,
        "sentence1_binary_parse": _flat(caption),
        "sentence1_parse": f"(ROOT {_flat(caption)})",
        "sentence2": hypothesis,
        "sentence2_binary_parse": _flat(hypothesis),
        "sentence2_parse": f"(ROOT {_flat(hypothesis)})",
    }


def _flat(sentence: str) -> str:
    return f"( {sentence} )"


# Each template is "the image contains A" joined to a claim about B in both images, the shown
# one and the unseen one.
TEMPLATES = (
    # A ∧ (B here ∨ B there): no A contradicts, A and B entail, A alone leaves it open.
    "the image contains {a} and at least one image contains {b} .",
    # A ∨ (B here ∧ B there): A entails, neither contradicts, B alone leaves it open.
    "the image contains {a} or both images contain {b} .",
)


@dataclass(frozen=True)
class Mention:
    """What a hypothesis says an image contains: a shape, or an object of a colour. (No
    numbers of objects: with them, how many objects an image holds would tell the label.)"""

    shape: str | None = None
    colour: str | None = None

    def phrase(self) -> str:
        return f"a {self.shape}" if self.colour is None else f"a {self.colour} object"

    def shown_in(self, scene: Scene) -> bool:
        return scene.count(self.shape, self.colour) > 0


@dataclass(frozen=True)
class Hypothesis:
    """A world hypothesis: one of TEMPLATES and its two different things."""

    template: str
    a: Mention
    b: Mention

    @classmethod
    def draw(cls, rng: random.Random, settings: WorldSettings) -> Hypothesis:
        things = [Mention(shape=s) for s in settings.shape_names]
        things += [Mention(colour=c) for c in settings.colour_names]
        return cls(rng.choice(TEMPLATES), *rng.sample(things, 2))

    def text(self) -> str:
        return self.template.format(a=self.a.phrase(), b=self.b.phrase())

    def label(self, scene: Scene) -> str:
        """What the shown image makes of the hypothesis, whatever the unseen one holds."""
        has_a, has_b = self.a.shown_in(scene), self.b.shown_in(scene)
        if self.template == TEMPLATES[0]:
            if not has_a:
                return "contradiction"
            return "entailment" if has_b else "neutral"
        if has_a:
            return "entailment"
        return "neutral" if has_b else "contradiction"
