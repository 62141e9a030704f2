"""MiniVL: a two-layer single-stream transformer over words and detector regions.

The README's example of a backbone plugin ("Writing a backbone plugin"): it uses nothing but the
public contract, and its one preset, `tiny`, reads the embedded world's inputs, so the world
pre-trains its θ0 when `vlprune find --model minivl` is given no checkpoint.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from vl_prune.backbone import Backbone, LoadReport, VLBatch, VLOutput, with_image_types
from vl_prune.checkpoint import read_state_dict
from vl_prune.errors import VLPruneError
from vl_prune.world import embedded_world

HIDDEN, LAYERS, HEADS, FFN, POSITIONS = 64, 2, 4, 128, 64


class Layer(nn.Module):
    """A BERT layer: self-attention over text and regions together, then a feed-forward block."""

    def __init__(self):
        super().__init__()
        self.query, self.key, self.value, self.attention_out = (
            nn.Linear(HIDDEN, HIDDEN) for _ in range(4)
        )
        self.intermediate, self.output = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)
        self.attention_norm, self.output_norm = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.dropout = nn.Dropout(0.1)

    def forward(self, states: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """`keep` (B × T, bool) marks real tokens and regions: padding is never attended to."""
        b, t, _ = states.shape
        q, k, v = (
            f(states).view(b, t, HEADS, -1).transpose(1, 2)
            for f in (self.query, self.key, self.value)
        )
        mixed = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None])
        mixed = self.attention_out(mixed.transpose(1, 2).reshape(b, t, HIDDEN))
        states = self.attention_norm(states + self.dropout(mixed))
        fed = self.output(nn.functional.gelu(self.intermediate(states)))
        return self.output_norm(states + self.dropout(fed))


class MiniVL(Backbone):
    """Words and regions (feature + box) embedded side by side, then two BERT layers."""

    description = "MiniVL: a 2-layer transformer over words and regions (example plugin)"
    presets = ("tiny",)
    image_input = "regions"

    def __init__(self, preset: str):
        super().__init__()
        world = embedded_world()  # the tiny preset reads the world's words and features
        self.preset = preset
        self.tokenizer = world.tokenizer()
        self.vocab_size, self.img_dim = world.vocab_size, world.img_dim
        self.hidden_size, self.max_positions = HIDDEN, POSITIONS
        self.words = nn.Embedding(self.vocab_size, HIDDEN, padding_idx=self.tokenizer.pad_token_id)
        self.positions = nn.Embedding(POSITIONS, HIDDEN)
        self.types = nn.Embedding(2, HIDDEN)  # 0: text, 1: image (more rows for NLVR2's 2)
        # Region embeddings: linear, but embeddings all the same, so never pruned.
        self.regions, self.boxes = nn.Linear(self.img_dim, HIDDEN), nn.Linear(6, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.pooler = nn.Linear(HIDDEN, HIDDEN)

    @classmethod
    def build(
        cls, preset: str | None = None, checkpoint: str | os.PathLike | None = None
    ) -> MiniVL:
        """The tiny preset, randomly initialised or with the weights of a checkpoint file
        (e.g. the θ0 the world cached for it); keys beyond the backbone's are reported."""
        backbone = cls(cls.check_preset(preset))
        if checkpoint is not None:
            state, own = read_state_dict(checkpoint), backbone.state_dict()
            for key, tensor in own.items():
                if key not in state or state[key].shape != tensor.shape:
                    found = tuple(state[key].shape) if key in state else "missing"
                    raise VLPruneError(f"{checkpoint}: {key} is {found}, not {tuple(tensor.shape)}")
            backbone.load_state_dict({key: state[key] for key in own})
            backbone.load_report = LoadReport(str(checkpoint), sorted(state.keys() - own.keys()))
        return backbone

    def forward(
        self,
        batch: VLBatch,
        text_delta: torch.Tensor | None = None,
        image_delta: torch.Tensor | None = None,
    ) -> VLOutput:
        words = self.words(batch.input_ids)
        if text_delta is not None:
            words = words + text_delta
        length = batch.input_ids.shape[1]
        types = batch.token_type_ids
        if types is None:
            types = torch.zeros_like(batch.input_ids)
        text = words + self.positions.weight[:length] + self.types(types)
        feats = batch.region_feats.to(words.dtype)
        if batch.masked_regions is not None:  # masked-region modelling: hide those regions
            feats = feats.masked_fill(batch.masked_regions.unsqueeze(-1), 0.0)
        if image_delta is not None:
            feats = feats + image_delta
        image_types = torch.full(feats.shape[:2], batch.image_type, device=feats.device)
        boxes = batch.region_boxes.to(words.dtype)
        image = self.regions(feats) + self.boxes(boxes) + self.types(image_types)
        region_mask = batch.region_mask
        if region_mask is None:
            region_mask = torch.ones(feats.shape[:2], dtype=torch.long, device=feats.device)
        keep = torch.cat([batch.attention_mask, region_mask], dim=1).bool()
        states = self.norm(torch.cat([text, image], dim=1))
        for layer in self.layers:
            states = layer(states, keep)
        pooled = torch.tanh(self.pooler(states[:, 0]))
        return VLOutput(states[:, :length], states[:, length:], pooled)

    def perturbation_shapes(self, batch: VLBatch) -> tuple[torch.Size, torch.Size]:
        return torch.Size((*batch.input_ids.shape, HIDDEN)), batch.region_feats.shape

    def prunable(self) -> list[tuple[nn.Module, str]]:
        """The six linear weights of each layer and the pooler's, as the paper prunes BERT."""
        matrices = ("query", "key", "value", "attention_out", "intermediate", "output")
        pairs = [(getattr(layer, m), "weight") for layer in self.layers for m in matrices]
        return [*pairs, (self.pooler, "weight")]

    def ensure_image_types(self, count: int) -> None:
        self.types = with_image_types(self.types, count)
