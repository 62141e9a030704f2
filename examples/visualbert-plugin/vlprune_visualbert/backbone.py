"""VisualBERT (Li et al., 2019) as a vl_prune backbone, wrapping transformers' `VisualBertModel`.

A worked example of the backbone contract (`vl_prune.backbone.Backbone`): every method below is
one the contract asks for, and the README of this distribution walks through them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import VisualBertConfig, VisualBertModel

from vl_prune.backbone import Backbone, LoadReport, VLBatch, VLOutput, is_local, with_image_types
from vl_prune.checkpoint import reason
from vl_prune.errors import VLPruneError
from vl_prune.world import embedded_world

#: The configuration of each preset. `tiny` reads the embedded world: its vocabulary and its
#: region features' width (filled in by `_config`). `base` is uclanlp/visualbert-vqa-coco-pre:
#: VisualBertConfig's defaults except the region feature size, 2048 (Detectron features;
#: transformers' conversion script sets it for the VQA checkpoints) and the padding id of
#: bert-base-uncased.
PRESETS = {
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
    ),
    "base": dict(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
        visual_embedding_dim=2048,
        pad_token_id=0,
    ),
}
#: What a checkpoint must share with a preset it is explicitly loaded as (else, e.g., the tiny
#: tokenizer would silently feed a base model).
_ARCHITECTURE = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "visual_embedding_dim",
)
#: VisualBERT's text side is bert-base-uncased.
TOKENIZER = "google-bert/bert-base-uncased"


def _config(preset: str) -> VisualBertConfig:
    settings = dict(PRESETS[preset])
    if preset == "tiny":
        world = embedded_world()
        tokenizer = world.tokenizer()
        settings.update(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            visual_embedding_dim=world.img_dim,
        )
    return VisualBertConfig(**settings)


class VisualBert(Backbone):
    """VisualBERT: BERT over words and detector region features (transformers'
    VisualBertModel)."""

    description = (
        "VisualBERT single-stream transformer over words and detector regions "
        "(transformers' VisualBertModel; example third-party plugin)"
    )
    presets = ("tiny", "base")
    image_input = "regions"

    def __init__(self, model: VisualBertModel, preset: str, tokenizer_source: str = TOKENIZER):
        super().__init__()
        # The attribute name is the prefix of every parameter path, hence of every tensor name in
        # a ticket. `visual_bert` is the name transformers' VisualBertFor* heads use, so a ticket
        # found here applies unchanged to e.g. VisualBertForQuestionAnswering.
        self.visual_bert = model
        self.preset = preset
        self.hidden_size = model.config.hidden_size
        self.img_dim = model.config.visual_embedding_dim
        self._tokenizer = embedded_world().tokenizer() if preset == "tiny" else None
        self._tokenizer_source = tokenizer_source

    @property
    def tokenizer(self):
        """The embedded world's tokenizer (tiny), or a BERT tokenizer loaded on first use: the
        checkpoint folder's if it has one, else bert-base-uncased."""
        if self._tokenizer is None:
            from transformers import BertTokenizerFast

            from vl_prune.hub import from_hub

            self._tokenizer = from_hub(BertTokenizerFast.from_pretrained, self._tokenizer_source)
        return self._tokenizer

    @classmethod
    def build(cls, preset: str | None = None, checkpoint: str | os.PathLike | None = None):
        """Randomly initialised from a preset, or the weights of a `save_pretrained` folder or hub
        id (e.g. uclanlp/visualbert-vqa-coco-pre); pre-training and task heads are ignored. A
        checkpoint brings its own config: under an explicit preset it must match it, without one
        the preset (tokenizer) is the one of its width."""
        if checkpoint is None:
            preset = cls.check_preset(preset)
            return cls(VisualBertModel(_config(preset)), preset)
        if preset is not None:
            cls.check_preset(preset)
        model, info = _from_pretrained(checkpoint)
        if missing := sorted(info["missing_keys"]):
            # Never a silent random init of a weight that is then pruned as if pre-trained.
            raise VLPruneError(f"{checkpoint}: backbone key {missing[0]} is missing")
        if mismatched := sorted(info["mismatched_keys"]):
            key, found, expected = mismatched[0]
            raise VLPruneError(
                f"{checkpoint}: {key} has shape {tuple(found)}, the model expects {tuple(expected)}"
            )
        if preset is None:
            hidden = model.config.hidden_size
            preset = next((p for p, s in PRESETS.items() if s["hidden_size"] == hidden), "base")
        else:
            config = _config(preset)
            for key in _ARCHITECTURE:
                found, expected = getattr(model.config, key), getattr(config, key)
                if found != expected:
                    raise VLPruneError(
                        f"{checkpoint}: {key} is {found}, visualbert-{preset} has {expected}; "
                        "leave out the preset to take the checkpoint's architecture"
                    )
        folder = Path(checkpoint).expanduser()
        has_tokenizer = is_local(checkpoint) and (folder / "tokenizer_config.json").is_file()
        backbone = cls(model, preset, str(folder) if has_tokenizer else TOKENIZER)
        # from_pretrained returns eval mode; a backbone starts in training mode like any module.
        backbone.train()
        backbone.load_report = LoadReport(str(checkpoint), sorted(info["unexpected_keys"]))
        return backbone

    def forward(self, batch: VLBatch, text_delta=None, image_delta=None) -> VLOutput:
        """Text and region states and the pooled [CLS]. `text_delta` is added to the word
        embeddings (before position and type embeddings), `image_delta` to the region features
        the model sees (after masking, before VisualBERT's projection)."""
        words = self.visual_bert.embeddings.word_embeddings(batch.input_ids)
        if text_delta is not None:
            words = words + text_delta
        feats = batch.region_feats.to(words.dtype)
        if batch.masked_regions is not None:
            # VisualBERT was not pre-trained with masked-region modelling and has no mask
            # embedding: a hidden region's feature is zeroed (LXMERT's convention).
            feats = feats.masked_fill(batch.masked_regions.bool().unsqueeze(-1), 0.0)
        if image_delta is not None:
            feats = feats + image_delta
        # VisualBERT does not use region boxes: `batch.region_boxes` is ignored. Every region gets
        # visual position 0, so the regions are an unordered set to the model.
        regions = feats.shape[:2]
        region_mask = batch.region_mask
        if region_mask is None:
            region_mask = torch.ones(regions, dtype=torch.long, device=feats.device)
        out = self.visual_bert(
            inputs_embeds=words,
            attention_mask=batch.attention_mask,
            token_type_ids=batch.token_type_ids,
            visual_embeds=feats,
            visual_attention_mask=region_mask.to(batch.attention_mask.dtype),
            visual_token_type_ids=torch.full(regions, batch.image_type, device=feats.device),
        )
        states, length = out.last_hidden_state, batch.input_ids.shape[1]
        return VLOutput(states[:, :length], states[:, length:], out.pooler_output)

    def perturbation_shapes(self, batch: VLBatch) -> tuple[torch.Size, torch.Size]:
        """Word embeddings (B × L × hidden) and region features (B × N × img_dim)."""
        return (
            torch.Size((*batch.input_ids.shape, self.hidden_size)),
            batch.region_feats.shape,
        )

    def prunable(self) -> list[tuple[nn.Module, str]]:
        """The six linear weights of every encoder layer and the pooler's. The visual projection
        is an embedding (region feature → hidden) and stays dense, like UNITER's img_linear."""
        layers = list(self.visual_bert.encoder.layer)
        if self.visual_bert.bypass_transformer:
            # Checkpoints trained with bypass_transformer have one more layer over both streams.
            layers.append(self.visual_bert.additional_layer)
        pairs = []
        for layer in layers:
            attention = layer.attention
            for module in (
                attention.self.query,
                attention.self.key,
                attention.self.value,
                attention.output.dense,
                layer.intermediate.dense,
                layer.output.dense,
            ):
                pairs.append((module, "weight"))
        pairs.append((self.visual_bert.pooler.dense, "weight"))
        return pairs

    def ensure_image_types(self, count: int) -> None:
        """Room for `count` image token types (NLVR2's second image is type 2). VisualBERT gives
        images their own type table (`visual_token_type_embeddings`, 2 rows); new rows start as
        copies of row 1, the type every VisualBERT checkpoint was trained with."""
        embeddings = self.visual_bert.embeddings
        types = embeddings.visual_token_type_embeddings
        embeddings.visual_token_type_embeddings = with_image_types(types, count)


def _from_pretrained(checkpoint: str | os.PathLike) -> tuple[VisualBertModel, dict]:
    """`VisualBertModel.from_pretrained` with its loading info: a local folder directly, a hub id
    through vl_prune's offline-aware `from_hub`; failures become one-line errors."""
    load = VisualBertModel.from_pretrained
    # Mismatched shapes are reported back rather than raised, so `build` can name the tensor.
    options = dict(output_loading_info=True, ignore_mismatched_sizes=True)
    if not is_local(checkpoint):
        from vl_prune.hub import from_hub

        return from_hub(load, str(checkpoint), **options)
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise VLPruneError(f"{path}: not a folder written by save_pretrained")
    try:
        return load(path, **options)
    except (OSError, ValueError, RuntimeError) as exc:
        raise VLPruneError(f"{path}: cannot load VisualBERT weights ({reason(exc)})") from exc
