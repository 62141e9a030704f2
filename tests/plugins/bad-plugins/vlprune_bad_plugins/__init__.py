"""Plugins for the contract tests: a tiny backbone that meets its contract, and variants of it
(and a task) that each break the contract in one way."""

from __future__ import annotations

import torch
from torch import nn

from vl_prune.backbone import Backbone, VLBatch, VLOutput
from vl_prune.task import Task, TaskBatch

HIDDEN = 128
IMG_DIM = 16
VOCAB = 50


class Small(Backbone):
    """A two-linear backbone over words and regions that meets the backbone contract."""

    presets = ("tiny",)
    image_input = "regions"

    def __init__(self, pooled_width: int = HIDDEN):
        super().__init__()
        self.preset = "tiny"
        self.hidden_size = HIDDEN
        self.img_dim = IMG_DIM
        self.vocab_size = VOCAB
        self.max_positions = 16
        self.words = nn.Embedding(VOCAB, HIDDEN)
        self.regions = nn.Linear(IMG_DIM, HIDDEN)
        self.pooler = nn.Linear(HIDDEN, pooled_width)

    @classmethod
    def build(cls, preset=None, checkpoint=None):
        return cls()

    def forward(self, batch: VLBatch, text_delta=None, image_delta=None) -> VLOutput:
        text = self.words(batch.input_ids)
        image = self.regions(batch.region_feats)
        return VLOutput(text, image, self.pooler(text[:, 0]))

    def prunable(self) -> list[tuple[nn.Module, str]]:
        return [(self.regions, "weight"), (self.pooler, "weight")]


def make_backbone() -> Small:
    """An entry point aimed at a factory function instead of the class."""
    return Small()


class WidePooled(Small):
    """Its pooled vector is half the hidden size."""

    @classmethod
    def build(cls, preset=None, checkpoint=None):
        return cls(pooled_width=HIDDEN // 2)


class NoHidden(Small):
    """Never says its hidden size."""

    def __init__(self):
        super().__init__()
        del self.hidden_size


class NoMetric(Task):
    """A task with every method of its own that never names its metric."""

    def examples(self, split):
        return []

    def head(self, backbone):
        return nn.Linear(backbone.hidden_size, 2)

    def collate(self, examples, backbone):
        return TaskBatch([], torch.tensor([example["label"] for example in examples]))

    def loss(self, outputs, targets):
        return nn.functional.cross_entropy(outputs, targets)

    def predict(self, outputs):
        return outputs.argmax(-1)

    def score(self, predictions, targets):
        return float(predictions.eq(targets).float().mean())
