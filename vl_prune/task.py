"""The task contract: what a `vl_prune.tasks` plugin provides, and the model it trains.

A task reads its data set in the official annotation format and owns the head f2, the loss and
the metric (the embedded world writes its split in that format: `vl_prune.world`). vl_prune
trains and scores `VLModel(backbone, head)` through this interface only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from vl_prune.backbone import Backbone, ImageInput, Inputs, VLBatch
from vl_prune.errors import VLPruneError

if TYPE_CHECKING:
    from vl_prune.data.txt_db import Vocabulary


@dataclass
class TaskBatch:
    """Collated examples: one VLBatch per image of an example (two for NLVR2), and targets
    (a tensor, or a dict of tensors for multi-objective tasks such as pre-training)."""

    inputs: list[VLBatch]
    targets: torch.Tensor | dict[str, torch.Tensor]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TaskBatch:
        return self._map(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> TaskBatch:
        """The batch in page-locked memory (DataLoader's `pin_memory`), for fast GPU copies."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, move) -> TaskBatch:
        targets = self.targets
        if isinstance(targets, dict):
            targets = {key: move(value) for key, value in targets.items()}
        else:
            targets = move(targets)
        return TaskBatch([batch.map(move) for batch in self.inputs], targets)


@dataclass(frozen=True)
class DataOptions:
    """How a task reads its data folder (flags of find, evaluate and transfer); None leaves
    the choice to the task: the folder's own split names, UNITER's text length."""

    train_split: str | None = None
    eval_split: str | None = None
    #: the longest text in tokens, [CLS] and [SEP] included; longer texts are cut
    max_text_len: int | None = None
    #: the answers a classifier head chooses from: a JSON file {answer: index} (UNITER's and
    #: LXMERT's ans2label.json) or a JSON list
    answer_vocab: str | None = None

    def __post_init__(self):
        if self.max_text_len is not None and self.max_text_len < 3:
            raise VLPruneError(
                "--max-text-len must leave room for [CLS], a word and [SEP], "
                f"not {self.max_text_len}"
            )


class Task:
    """Base class of task plugins.

    `Task(data, options)` reads nothing yet; `examples(split)` reads and checks one split of the
    folder `data`, laid out as the task's official release or as UNITER's txt_db + img_db (a
    bad line is an error naming file:line, a bad database entry names the folder and key).
    """

    #: one line for `vlprune list tasks`
    description: ClassVar[str] = ""
    #: name of the primary score (higher is better), e.g. "accuracy"
    metric: ClassVar[str] = ""
    #: the image inputs the task can feed
    image_inputs: ClassVar[tuple[ImageInput, ...]] = ("regions", "pixels")
    #: split names, training split first, then the one scores are reported on
    splits: ClassVar[tuple[str, ...]] = ("train", "dev")
    #: the longest text in tokens ([CLS] and [SEP] included): UNITER's max_txt_len
    max_text_len: ClassVar[int] = 60
    #: whether the task reads `--answer-vocab` (a head choosing among answers); others refuse
    #: it rather than silently ignore it
    reads_answer_vocab: ClassVar[bool] = False
    #: fine-tuning settings (TrainSettings fields) for real data, e.g. the published ones;
    #: flags override them (the embedded world's come from its `WorldSplit`)
    recipe: ClassVar[dict[str, Any]] = {}

    def __init__(self, data: str | Path, options: DataOptions | None = None):
        self.data = Path(data)
        if not self.data.is_dir():
            raise VLPruneError(f"{self.data}: no such data folder")
        self.options = options or DataOptions()
        if self.options.answer_vocab is not None and not self.reads_answer_vocab:
            raise VLPruneError(
                f"--answer-vocab: {type(self).__name__} chooses among no answers; drop the flag"
            )
        #: the tokenizer of texts read already tokenised (a UNITER txt_db's meta.json): the
        #: backbone's vocabulary must be its
        self.text_vocabulary: Vocabulary | None = None

    @property
    def text_length(self) -> int:
        """The longest text fed to the backbone, in tokens."""
        return self.options.max_text_len or self.max_text_len

    def default_splits(self) -> tuple[str, str]:
        """The training split and the evaluation split when none is given: the first two of
        `splits`. Tasks whose split names depend on the folder's layout (VQA's `train2014` or
        UNITER's `train+trainval` txt_dbs) look at it."""
        return self.splits[0], self.splits[1]

    @property
    def train_split(self) -> str:
        return self.options.train_split or self.default_splits()[0]

    @property
    def eval_split(self) -> str:
        return self.options.eval_split or self.default_splits()[1]

    def examples(self, split: str) -> list[Any]:
        """The checked examples of one split."""
        raise NotImplementedError

    def head(self, backbone: Backbone) -> nn.Module:
        """A fresh head f2 whose forward(backbone, inputs: list[VLBatch]) gives the outputs
        (logits, or a tuple/dict of them) that `loss` and `predict` take."""
        raise NotImplementedError

    def collate(self, examples: list[Any], backbone: Backbone | Inputs) -> TaskBatch:
        """Examples → a TaskBatch for this backbone. It may read only what `Inputs` offers
        (`image_input`, `tokenizer`, `image_processor`, `img_dim`, `vocab_size`,
        `max_positions`, `label`): the
        first batches are collated before the backbone is built, to check the data."""
        raise NotImplementedError

    def loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, outputs: Any) -> Any:
        """What the metric compares with the targets (e.g. the argmax): tensors, or a dict."""
        raise NotImplementedError

    def score(self, predictions: Any, targets: Any) -> float:
        """The primary metric over a whole split (predictions and targets of every batch,
        concatenated)."""
        raise NotImplementedError

    def consistency(self, clean: Any, perturbed: Any) -> torch.Tensor:
        """How far the outputs on perturbed input moved from those on clean input (`clean` is
        detached): adversarial training's consistency term. The default is the symmetric KL
        between the softmax distributions over the last dimension of every output tensor;
        tasks with regression outputs override it, and so do tasks with per-position outputs
        over padding (per-token logits): their head's outputs carry the mask of real positions
        and their `consistency` passes it to `symmetric_kl(..., mask=...)`, so that padded
        positions, whose outputs mean nothing, neither add to the term nor dilute it."""
        return symmetric_kl(clean, perturbed)

    @classmethod
    def check_backbone(cls, backbone: Backbone | type[Backbone]) -> None:
        """A clear error when the backbone's (or backbone class's) image input does not fit
        the task."""
        if backbone.image_input not in cls.image_inputs:
            name = backbone.__name__ if isinstance(backbone, type) else type(backbone).__name__
            raise VLPruneError(
                f"{cls.__name__} needs {' or '.join(cls.image_inputs)} input; "
                f"{name} reads {backbone.image_input}"
            )


class VLModel(nn.Module):
    """Backbone f1 and task head f2: what is trained, evaluated and pruned (f1 only)."""

    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, batch: TaskBatch, deltas: list | None = None) -> Any:
        """The head's outputs; `deltas` (one (text_delta, image_delta) pair per input of the
        batch) perturb the backbone's embeddings, for adversarial training."""
        if deltas is None:
            return self.head(self.backbone, batch.inputs)
        return self.head(_Perturbed(self.backbone, batch.inputs, deltas), batch.inputs)


class _Perturbed:
    """The backbone as a head sees it in an adversarial pass: called on one of the batch's
    inputs, it adds that input's perturbations. Heads stay unaware of adversarial training."""

    def __init__(self, backbone: Backbone, inputs: list[VLBatch], deltas: list):
        self._backbone = backbone
        self._deltas = {id(batch): pair for batch, pair in zip(inputs, deltas, strict=True)}

    def __call__(self, batch: VLBatch):
        pair = self._deltas.get(id(batch))
        if pair is None:
            raise VLPruneError(
                "the head called the backbone on an input that is not one of the batch's "
                "inputs; adversarial training needs heads to encode batch.inputs themselves"
            )
        return self._backbone(batch, *pair)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backbone, name)


def symmetric_kl(clean: Any, perturbed: Any, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p‖q) + KL(q‖p) of the softmax distributions over the last dimension, averaged over
    the other dimensions and summed over the tensors of a dict or tuple of outputs.

    `mask`, shaped as each tensor less its last dimension (B × L for B × L × V per-token
    logits), marks the real positions (true or nonzero): the KL is then averaged over those
    only, so padded positions neither add to it nor dilute it (0 when none is real)."""
    if isinstance(clean, dict):
        return sum(symmetric_kl(clean[key], perturbed[key], mask) for key in clean)
    if isinstance(clean, (tuple, list)):
        return sum(symmetric_kl(c, p, mask) for c, p in zip(clean, perturbed, strict=True))
    log_p = torch.log_softmax(clean.float(), dim=-1)
    log_q = torch.log_softmax(perturbed.float(), dim=-1)
    kl = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)
    if mask is None:
        return kl.mean()
    if mask.shape != kl.shape:
        raise VLPruneError(
            f"symmetric_kl: the mask is {tuple(mask.shape)}, but the outputs' positions are "
            f"{tuple(kl.shape)} (the outputs' shape less its last dimension)"
        )
    real = mask.to(kl.device).bool()
    # where, not a product: a padded position's value never reaches the sum, finite or not.
    return torch.where(real, kl, 0.0).sum() / real.sum().clamp_min(1)
