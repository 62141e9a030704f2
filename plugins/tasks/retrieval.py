"""Flickr30k image–text retrieval (Karpathy split): find a caption's image (IR) and an image's
captions (TR).

Reads Karpathy's split file `dataset_<name>.json` (`images[*]`: `filename`, `split` train / val /
test / restval, `sentences[*].raw`), the one NeuralTalk and UNITER's Flickr30k and COCO text
databases come from; images are `images/<stem>.png`, region features `features/<stem>.npz`
(named by the filename's stem) or a UNITER img_db (keys `flickr30k_<id:012>.npz`,
`coco_<subtype>_<id:012>.npz`); or ViLT's tables, `f30k_caption_karpathy_<split>.arrow` (or
`coco_caption_karpathy_…`). "restval" images (COCO has them) train with "train", as in
Karpathy's and UNITER's COCO set-ups. Or UNITER's release: `txt_db/itm_flickr30k_<split>.db`
(each caption's `input_ids` and `img_fname`) with `img_db/flickr30k/`. To report on the test
split: `--eval-split test`.

The head is UNITER's retrieval head, pooled → Linear → one matching score, trained with its
triplet loss: each caption with its own image against one sampled negative image and one sampled
negative caption (sigmoid scores, margin 0.2). A negative is never a pair the file gives: its
caption text is not among its image's captions.

The training split's examples are its captions; any other split's are every (image, caption)
pair of its pool, image-major, as a lazy sequence (a pair is made only when its batch is
collated). `score` scatters the gathered scores back into the images × captions matrix and
returns the mean of IR and TR R@1/5/10 (`recalls`).

What a real-size evaluation costs (estimated, not measured): Flickr30k's test split is 1,000
images × 5,000 captions = 5 M pairs, each one UNITER-base forward pass of ~50 tokens (~17 words,
~36 regions): ~9 GFLOP a pair, ~45 PFLOP in all, about 6 minutes on one A100 at 40% of its fp16
peak (~15 on a V100), in batches of 400 pairs. Collation is the other cost: it tokenises 5 M
captions and copies the 36 × 2048 fp16 region features of every pair into its batch (~0.7 TB),
minutes of CPU time; the gathered scores and their targets take 140 MB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from vl_prune.backbone import Backbone, VLBatch
from vl_prune.data.inputs import ImageName, ImageStore, TokenIds, encode
from vl_prune.data.lazy import LazySequence
from vl_prune.data.txt_db import TxtDb, split_dbs
from vl_prune.errors import VLPruneError
from vl_prune.task import DataOptions, Task, TaskBatch, symmetric_kl
from vl_prune_plugins.tasks.karpathy import (
    caption_tables,
    db_keys,
    read_split,
    table_images,
)
from vl_prune_plugins.tasks.uniter_dbs import image_names, use_txt_dbs

#: the Karpathy splits read for a split name: Karpathy's "restval" images are training images
READS = {"train": ("train", "restval")}
#: UNITER's txt_db names (txt_db/itm_flickr30k_<split>.db) and ViLT's tables
TXT_DB = "itm_flickr30k"
ARROWS = ("f30k_caption_karpathy", "coco_caption_karpathy")
#: negative images and negative captions per caption (UNITER's negative_size)
NEGATIVES = 1
MARGIN = 0.2
RECALL_AT = (1, 5, 10)
# Tries at drawing a negative before concluding the split has none for a caption.
DRAWS = 100


@dataclass(frozen=True)
class Caption:
    """A caption and the image it was written for: a training example."""

    text: str | TokenIds
    image: ImageName
    split: str
    #: its position among the split's captions
    index: int


@dataclass(frozen=True)
class Candidate:
    """One (image, caption) pair of an evaluation pool, by their positions in the split."""

    split: str
    image: int
    caption: int


@dataclass(frozen=True)
class Split:
    """One split of the Karpathy file: its images (feature names) and captions, in file order."""

    name: str
    images: tuple[ImageName, ...]
    captions: tuple[Caption, ...]
    #: caption position → position of its image
    image_of: tuple[int, ...]
    #: caption text → positions of the images it was written for
    holders: dict[str | TokenIds, frozenset[int]]


class Pool(LazySequence):
    """Every (image, caption) pair of a split, image-major, each made when asked for: Flickr30k's
    test pool is 5 M pairs, too many to keep as Python objects."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.images) * len(self.split.captions)

    def item(self, index: int) -> Candidate:
        image, caption = divmod(index, len(self.split.captions))
        return Candidate(self.split.name, image, caption)


class RankHead(nn.Module):
    """UNITER's retrieval head: pooled → Linear(H, 1), one matching score per pair."""

    def __init__(self, hidden: int):
        super().__init__()
        self.rank_output = nn.Linear(hidden, 1)

    def forward(self, backbone: Backbone, inputs: list[VLBatch]) -> torch.Tensor:
        (batch,) = inputs
        return self.rank_output(backbone(batch).pooled).squeeze(-1)


class Retrieval(Task):
    """Image–text retrieval: UNITER's ranking head and triplet loss, IR/TR recall."""

    description = "Flickr30k image-text retrieval: mean of IR and TR R@1/5/10 (UNITER's ITM head)"
    metric = "recall_mean"
    splits = ("train", "val")
    # UNITER's train-itm-flickr-base-8gpu.json: 20,000 steps, lr 5e-5, 2,000 warmup steps,
    # 40 captions per GPU, 4 accumulated batches; run on 8 processes as it ran on 8 GPUs.
    # Pools are scored 400 pairs a batch (its inf_minibatch_size is 40; a GPU holds far more).
    recipe: ClassVar[dict] = {
        "steps": 20000,
        "lr": 5e-5,
        "warmup": 0.1,
        "batch_size": 40,
        "grad_accumulation": 4,
        "eval_batch_size": 400,
        "seed": 42,
    }

    def __init__(self, data: str | Path, options: DataOptions | None = None):
        super().__init__(data, options)
        self._read: dict[str, Split] = {}

    def examples(self, split: str) -> list[Caption] | Pool:
        """The training split's captions; for any other split, its pool of every (image,
        caption) pair."""
        read = self.read(split)
        return list(read.captions) if split == self.train_split else Pool(read)

    def read(self, split: str) -> Split:
        """The split's images and captions, read and checked once."""
        if split not in self._read:
            dbs = split_dbs(self.data, TXT_DB, split)
            tables = caption_tables(self.data, ARROWS, split)
            if dbs is not None:
                use_txt_dbs(self, dbs, self._store())
                self._read[split] = _split_from_txt_db(dbs, split)
            elif tables is not None:
                self._read[split] = _split(split, table_images(tables))
            else:
                self._read[split] = _read_split(self.data, split)
        return self._read[split]

    def _store(self) -> ImageStore:
        return ImageStore(self.data, db_keys)

    def head(self, backbone: Backbone) -> nn.Module:
        self.check_backbone(backbone)
        return RankHead(backbone.hidden_size)

    def collate(self, examples: list[Caption] | list[Candidate], backbone: Backbone) -> TaskBatch:
        """Training captions become groups of 1 + 2 × NEGATIVES pairs (its own, negative images,
        negative captions) with targets 1, 0, …, 0 per group; pool pairs become one pair each
        with targets (image, caption, the caption's image), positions in the split."""
        if isinstance(examples[0], Candidate):
            return self._candidates(examples, backbone)
        texts, images, targets = [], [], []
        for example in examples:
            split = self.read(example.split)
            own = split.image_of[example.index]
            negative_images = [_negative_image(split, example) for _ in range(NEGATIVES)]
            negative_captions = [_negative_caption(split, own) for _ in range(NEGATIVES)]
            texts += [example.text] * (1 + NEGATIVES) + [c.text for c in negative_captions]
            images += [example.image, *negative_images] + [example.image] * NEGATIVES
            targets.append([1] + [0] * 2 * NEGATIVES)
        batch = encode(texts, images, backbone, self._store(), max_length=self.text_length)
        return TaskBatch([batch], torch.tensor(targets))

    def _candidates(self, candidates: list[Candidate], backbone: Backbone) -> TaskBatch:
        split = self.read(candidates[0].split)
        batch = encode(
            [split.captions[c.caption].text for c in candidates],
            [split.images[c.image] for c in candidates],
            backbone,
            self._store(),
            max_length=self.text_length,
        )
        targets = [[c.image, c.caption, split.image_of[c.caption]] for c in candidates]
        return TaskBatch([batch], torch.tensor(targets))

    def loss(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """UNITER's triplet loss: every negative's sigmoid score should stay `MARGIN` below its
        caption's own pair's, averaged over the negatives."""
        grouped = torch.sigmoid(scores).view(targets.shape)
        return (MARGIN + grouped[:, 1:] - grouped[:, :1]).clamp(min=0).mean()

    def predict(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.float()

    def consistency(self, clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
        """The symmetric KL between the match probabilities σ(score) on clean and perturbed
        input (softmax over [0, score] is [1 − σ, σ])."""
        return symmetric_kl(_two_way(clean), _two_way(perturbed))

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> float:
        """The mean of IR and TR R@1/5/10 over the pool whose pairs were scored."""
        if targets.dim() != 2 or targets.shape[1] != 3 or len(predictions) != len(targets):
            raise VLPruneError(
                "retrieval scores the pairs of an evaluation pool; these predictions are not "
                "(pass a split other than the training split)"
            )
        # Placed by their positions, the pairs may come in any order, from any process.
        images, captions, owners = targets.long().cpu().unbind(1)
        shape = (int(max(images.max(), owners.max())) + 1, int(captions.max()) + 1)
        covered = torch.zeros(shape, dtype=torch.long).index_put_(
            (images, captions), torch.ones_like(images), accumulate=True
        )
        if not (covered == 1).all():
            raise VLPruneError(
                f"the scores cover {int((covered > 0).sum())} of the pool's {shape[0] * shape[1]} "
                f"image-caption pairs, {int((covered > 1).sum())} of them more than once"
            )
        scores = torch.empty(shape)
        scores[images, captions] = predictions.float().cpu()
        image_of = torch.empty(shape[1], dtype=torch.long)
        image_of[captions] = owners
        return recalls(scores, image_of)["recall_mean"]


def recalls(
    scores: torch.Tensor, image_of: torch.Tensor, ks: tuple[int, ...] = RECALL_AT
) -> dict[str, float]:
    """IR and TR recall at each K, and their mean, from an images × captions score matrix and
    each caption's image.

    IR R@K: the share of captions whose image is among the K images scoring highest with them.
    TR R@K: the share of images (those with captions) with one of their captions among the K
    captions scoring highest with them. Ties count against the model, and NaN is the lowest
    score: a model that scores every pair alike recalls nothing.
    """
    scores = scores.float().nan_to_num(nan=-torch.inf)
    positive = image_of[None, :] == torch.arange(scores.shape[0])[:, None]
    own = scores.gather(0, image_of[None, :])
    best = scores.masked_fill(~positive, -torch.inf).amax(1, keepdim=True)
    # Rank 0 is first: how many wrong candidates score at least as high as the right one.
    ir_rank = ((scores >= own) & ~positive).sum(0)
    tr_rank = ((scores >= best) & ~positive).sum(1)[positive.any(1)]
    out = {}
    for name, ranks in (("ir", ir_rank), ("tr", tr_rank)):
        for k in ks:
            out[f"{name}_r{k}"] = (ranks < k).float().mean().item()
    out["recall_mean"] = sum(out.values()) / len(out)
    return out


def _two_way(scores: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.zeros_like(scores), scores], dim=-1)


def _negative_image(split: Split, caption: Caption) -> str:
    """A random image of the split that the caption was not written for (drawn from torch's
    generator, which the trainer seeds)."""
    for _ in range(DRAWS):
        image = int(torch.randint(len(split.images), ()))
        if image not in split.holders[caption.text]:
            return split.images[image]
    raise VLPruneError(
        f"split {split.name!r}: found no image that caption {caption.text!r} was not written "
        "for; retrieval needs images with different captions"
    )


def _negative_caption(split: Split, image: int) -> Caption:
    """A random caption of the split whose text was not written for `image`."""
    for _ in range(DRAWS):
        caption = split.captions[int(torch.randint(len(split.captions), ()))]
        if image not in split.holders[caption.text]:
            return caption
    raise VLPruneError(
        f"split {split.name!r}: found no caption that was not written for image "
        f"{split.images[image]!r}; retrieval needs images with different captions"
    )


def _read_split(data: Path, split: str) -> Split:
    """The images of one split of the Karpathy file, with their captions."""
    images = [
        (image.stem, image.captions) for image in read_split(data, split, READS.get(split, ()))
    ]
    return _split(split, images)


def _split_from_txt_db(dbs: list[TxtDb], split: str) -> Split:
    """The images of UNITER's ITM txt_dbs (each caption's `img_fname`), with their captions'
    token ids, images in the order their first caption comes."""
    captions: dict[str, list[TokenIds]] = {}
    for db in dbs:
        for key, record in db.examples():
            (image,) = image_names(record, 1, f"{db.path}: key {key!r}")
            captions.setdefault(image, []).append(db.with_specials(record["input_ids"]))
    return _split(split, list(captions.items()))


def _split(split: str, images_captions: list[tuple[ImageName, Sequence]]) -> Split:
    images: list[ImageName] = []
    captions: list[Caption] = []
    image_of: list[int] = []
    holders: dict[str | TokenIds, set[int]] = {}
    for image, texts in images_captions:
        for text in texts:
            captions.append(Caption(text, image, split, len(captions)))
            image_of.append(len(images))
            holders.setdefault(text, set()).add(len(images))
        images.append(image)
    return Split(
        split,
        tuple(images),
        tuple(captions),
        tuple(image_of),
        {text: frozenset(owners) for text, owners in holders.items()},
    )
