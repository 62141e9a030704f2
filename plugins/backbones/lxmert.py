"""LXMERT (Tan & Bansal, EMNLP 2019): two streams, words and detector regions, joined by
cross-modality layers. A wrapper around transformers' `LxmertModel`.

The model sits under `lxmert`, so parameter paths (and ticket tensor names) are the keys of
`unc-nlp/lxmert-base-uncased`: `lxmert.encoder.x_layers.0.visual_attention.att.query.weight`.
"""

from __future__ import annotations

import os
from functools import cache

import torch
from torch import nn
from transformers import LxmertConfig, LxmertModel, LxmertTokenizerFast

from vl_prune.backbone import Backbone, Inputs, VLBatch, VLOutput
from vl_prune.hub import from_source
from vl_prune.pruning.structured import Block, heads, neurons
from vl_prune.world import embedded_world
from vl_prune_plugins.backbones.hf_checkpoint import (
    check_architecture,
    check_tensors,
    embedding_width,
    file_shapes,
    files_source,
    load_pretrained,
    preset_of_width,
    tokenizer_loader,
)
from vl_prune_plugins.backbones.lxmert_original import convert, is_original, load_original


@cache
def presets() -> dict[str, dict[str, int]]:
    """Each preset's architecture. `tiny` reads the embedded world's words and inputs, asked when
    a preset is first needed, not when the plugin is imported."""
    return {
        # For the embedded world and the tests: trains on 2 CPU cores in seconds. Its region
        # features have uniter-tiny's img_dim, so one synthetic world serves both.
        "tiny": dict(
            vocab_size=embedded_world().vocab_size,
            hidden_size=128,
            num_attention_heads=4,
            intermediate_size=256,
            l_layers=2,
            x_layers=1,
            r_layers=1,
            visual_feat_dim=embedded_world().img_dim,
            visual_pos_dim=4,
            max_position_embeddings=64,
        ),
        # unc-nlp/lxmert-base-uncased (bert-base-uncased vocabulary, Faster R-CNN 2048-d features).
        "base": dict(
            vocab_size=30522,
            hidden_size=768,
            num_attention_heads=12,
            intermediate_size=3072,
            l_layers=9,
            x_layers=5,
            r_layers=5,
            visual_feat_dim=2048,
            visual_pos_dim=4,
            max_position_embeddings=512,
        ),
    }


HUB_ID = "unc-nlp/lxmert-base-uncased"
# The tensors whose shapes give a weights file's vocabulary, hidden size and feature width.
WORDS, FEATURES = "embeddings.word_embeddings.weight", "encoder.visn_fc.visn_fc.weight"
POSITIONS = "embeddings.position_embeddings.weight"


class Lxmert(Backbone):
    """LXMERT: language, object-relationship and cross-modality layers over words and regions."""

    description = (
        "LXMERT two-stream transformer over words and detector regions with cross-modality "
        "layers (transformers' LxmertModel)"
    )
    presets = ("tiny", "base")
    image_input = "regions"

    def __init__(
        self, preset: str = "tiny", model: LxmertModel | None = None, source: str = HUB_ID
    ):
        """The preset's architecture with fresh weights, or `model` (loaded by `build`);
        `source` is where the base tokenizer is read from."""
        super().__init__()
        self.preset = self.check_preset(preset)
        self.lxmert = model if model is not None else LxmertModel(preset_config(self.preset))
        self.hidden_size = self.lxmert.config.hidden_size
        self.img_dim = self.lxmert.config.visual_feat_dim
        self.vocab_size = self.lxmert.config.vocab_size
        self.max_positions = self.lxmert.config.max_position_embeddings
        # The world's vocabulary (the tiny preset's) has the world's tokenizer, others a real one.
        world = embedded_world()
        self._tokenizer = world.tokenizer() if self.vocab_size == world.vocab_size else None
        self._source = source
        # from_pretrained leaves models in eval mode; a fresh module (and uniter) is in train mode.
        self.train()

    @property
    def tokenizer(self):
        """The world's word-level tokenizer (tiny), or the checkpoint's LxmertTokenizerFast loaded
        on first use, so building from local weights needs no network."""
        if self._tokenizer is None:
            self._tokenizer = from_source(LxmertTokenizerFast.from_pretrained, self._source)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    @classmethod
    def inputs(
        cls,
        preset: str | None = None,
        checkpoint: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
    ) -> Inputs:
        """The architecture's input needs, from its config (a save_pretrained folder, a hub id)
        or a weights file's tensor shapes, without the weights."""
        if checkpoint is None:
            settings = presets()[cls.check_preset(preset)]
            names = ("vocab_size", "visual_feat_dim", "hidden_size", "max_position_embeddings")
            vocab, img_dim, hidden, positions = (settings[k] for k in names)
        else:
            vocab, img_dim, hidden, positions = _input_sizes(checkpoint)
        label = f"lxmert-{preset or preset_of_width(presets(), hidden)}"
        load = tokenizer_loader(tokenizer, vocab, checkpoint, LxmertTokenizerFast, HUB_ID)
        return Inputs(label, "regions", load, img_dim, vocab, max_positions=positions)

    @classmethod
    def build(cls, preset: str | None = None, checkpoint: str | os.PathLike | None = None):
        """A save_pretrained folder or hub id brings its own config: under an explicit preset it
        must match it. A state-dict file takes the preset's (default: the one of its width),
        except a file in LXMERT's original layout (`Epoch20_LXRT.pth`), which without a preset
        has the architecture its tensors give (see `lxmert_original`)."""
        if checkpoint is None:
            return cls(cls.check_preset(preset))
        if preset is not None:
            cls.check_preset(preset)

        def file_config(state: dict[str, torch.Tensor]) -> LxmertConfig:
            return preset_config(
                preset or preset_of_width(presets(), embedding_width(state, checkpoint))
            )

        if is_original(checkpoint):
            model, report = load_original(checkpoint, presets(), preset)
        else:
            model, report = load_pretrained(LxmertModel, checkpoint, file_config)
        if preset is None:
            preset = preset_of_width(presets(), model.config.hidden_size)
        else:
            check_architecture(model.config, presets()[preset], f"lxmert-{preset}", report.source)
        source = files_source(checkpoint, "tokenizer_config.json", HUB_ID)
        backbone = cls(preset, model, source)
        backbone.load_report = report
        return backbone

    def forward(
        self,
        batch: VLBatch,
        text_delta: torch.Tensor | None = None,
        image_delta: torch.Tensor | None = None,
    ) -> VLOutput:
        """Encode a batch; masked regions have their features zeroed (LXMERT's masked object
        feature modelling) before `image_delta` perturbs the features the model sees."""
        words = self.lxmert.embeddings.word_embeddings(batch.input_ids)
        if text_delta is not None:
            words = words + text_delta
        feats = batch.region_feats.to(words.dtype)
        if batch.masked_regions is not None:
            feats = feats.masked_fill(batch.masked_regions.bool().unsqueeze(-1), 0.0)
        if image_delta is not None:
            feats = feats + image_delta
        out = self.lxmert(
            inputs_embeds=words,
            attention_mask=batch.attention_mask,
            token_type_ids=batch.token_type_ids,
            visual_feats=feats,
            # x1, y1, x2, y2 of UNITER's norm_bb; LXMERT has no w, h inputs.
            visual_pos=batch.region_boxes[..., :4].to(words.dtype),
            visual_attention_mask=batch.region_mask,
        )
        return VLOutput(out.language_output, out.vision_output, out.pooled_output)

    def perturbation_shapes(self, batch: VLBatch) -> tuple[torch.Size, torch.Size]:
        return torch.Size((*batch.input_ids.shape, self.hidden_size)), batch.region_feats.shape

    def prunable(self) -> list[tuple[nn.Module, str]]:
        """Every linear weight of the language, object-relationship and cross-modality layers
        (self- and cross-attention q/k/v/output, intermediate, output) and the pooler. The
        visual feature encoder (visn_fc, box_fc) is LXMERT's image embedding: not pruned."""
        encoder = self.lxmert.encoder
        layers = [*encoder.layer, *encoder.r_layers, *encoder.x_layers]
        linears = [m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)]
        return [(module, "weight") for module in [*linears, self.lxmert.pooler.dense]]

    def transformers_model(self) -> LxmertModel:
        """The wrapped model, its config fitting the embeddings as they have grown."""
        self.lxmert.config.vocab_size = self.lxmert.embeddings.word_embeddings.num_embeddings
        return self.lxmert

    def structure(self) -> list[Block]:
        """The heads of every attention block (self-attention of the language, object and
        cross-modality layers, and the cross-attention both streams share) and the neurons of
        every feed-forward block."""

        def attention(layer) -> Block:  # LxmertSelfAttentionLayer or LxmertCrossAttentionLayer
            own = layer.att if hasattr(layer, "att") else layer.self
            return heads(own.query, own.key, own.value, layer.output.dense, own)

        encoder, blocks = self.lxmert.encoder, []
        for layer in [*encoder.layer, *encoder.r_layers]:
            blocks.append(attention(layer.attention))
            blocks.append(neurons(layer.intermediate.dense, layer.output.dense))
        for layer in encoder.x_layers:
            blocks += [
                attention(layer.visual_attention),
                attention(layer.lang_self_att),
                attention(layer.visn_self_att),
                neurons(layer.lang_inter.dense, layer.lang_output.dense),
                neurons(layer.visn_inter.dense, layer.visn_output.dense),
            ]
        return blocks

    def ensure_image_types(self, count: int) -> None:
        """Nothing to do: LXMERT has no image token types; two-image tasks encode each image
        separately."""


def _input_sizes(checkpoint: str | os.PathLike) -> tuple[int, int, int, int]:
    """Vocabulary size, region feature width, hidden size and text positions of a checkpoint:
    from a weights file's tensor shapes (any of its layouts), else from its config."""
    state = file_shapes(checkpoint, "lxmert.", is_original, convert)
    if state is None:
        config = from_source(LxmertConfig.from_pretrained, str(checkpoint))
        sizes = (config.vocab_size, config.visual_feat_dim, config.hidden_size)
        return (*sizes, config.max_position_embeddings)
    check_tensors(state, {WORDS: 2, FEATURES: 2, POSITIONS: 2}, checkpoint, "LXMERT")
    vocab, hidden = state[WORDS].shape
    return vocab, state[FEATURES].shape[1], hidden, state[POSITIONS].shape[0]


def preset_config(preset: str) -> LxmertConfig:
    return LxmertConfig(**presets()[preset])
