"""UNITER (Chen et al., ECCV 2020): one transformer over word tokens and detector regions.

Our own implementation on transformers' `BertLayer`/`BertPooler`, laid out so its state_dict keys
are those of the original checkpoints (`uniter.encoder.layer.0.attention.self.query.weight`, …):
`uniter-base.pt` and `uniter-large.pt` load with nothing missing, heads are reported and ignored.
"""

from __future__ import annotations

import os
import re
from functools import cache, partial
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer, BertPooler

from vl_prune.backbone import (
    Backbone,
    Inputs,
    LoadReport,
    VLBatch,
    VLOutput,
    is_local,
    with_image_types,
)
from vl_prune.checkpoint import read_state_dict
from vl_prune.errors import VLPruneError
from vl_prune.hub import from_hub
from vl_prune.pruning.structured import Block, heads, neurons
from vl_prune.tokenizers import beside, local_tokenizer
from vl_prune.world import embedded_world

_BERT = dict(hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


@cache
def presets() -> dict[str, dict[str, int]]:
    """Each preset's architecture. `tiny` reads the embedded world's words and inputs, asked when
    a preset is first needed, not when the plugin is imported."""
    return {
        # For the embedded world and the tests: trains on 2 CPU cores in seconds; reads the world's
        # words and region features.
        "tiny": dict(
            vocab_size=embedded_world().vocab_size,
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=64,
            type_vocab_size=2,
            img_dim=embedded_world().img_dim,
        ),
        # config/uniter-base.json and uniter-large.json of the original release (bert-base-cased).
        "base": dict(
            vocab_size=28996,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=512,
            type_vocab_size=2,
            img_dim=2048,
        ),
        "large": dict(
            vocab_size=28996,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            max_position_embeddings=512,
            type_vocab_size=2,
            img_dim=2048,
        ),
    }


TOKENIZER = "bert-base-cased"
_PREFIX = "uniter."
#: buffers that some conversions of UNITER's checkpoints carry (transformers' BERT keeps its
#: position ids as one): nothing to load, the model computes them
HARMLESS = ("embeddings.position_ids", "embeddings.token_type_ids")
#: how many missing keys an error lists
LISTED = 10


class TextEmbeddings(nn.Module):
    """Word + position + token type, LayerNorm, dropout (UNITER's UniterTextEmbeddings)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, delta=None):
        if input_ids.shape[1] > self.position_embeddings.num_embeddings:
            raise VLPruneError(
                f"texts of {input_ids.shape[1]} tokens, but the model has "
                f"{self.position_embeddings.num_embeddings} positions"
            )
        words = self.word_embeddings(input_ids)
        if delta is not None:
            words = words + delta
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        embeddings = (
            words + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.LayerNorm(embeddings))


class ImageEmbeddings(nn.Module):
    """Region features and 7-d boxes, each projected and normalised, plus the token type
    (UNITER's UniterImageEmbeddings). Masked regions get the learned mask embedding added."""

    def __init__(self, config: BertConfig, img_dim: int):
        super().__init__()
        self.img_linear = nn.Linear(img_dim, config.hidden_size)
        self.img_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.pos_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.pos_linear = nn.Linear(7, config.hidden_size)
        self.mask_embedding = nn.Embedding(2, img_dim, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, feats, boxes7, type_embeddings, masked=None):
        if masked is not None:
            # Row 0 of the original mask embedding is forced to zero: only row 1 is ever added.
            feats = feats + masked.unsqueeze(-1).to(feats.dtype) * self.mask_embedding.weight[1]
        image = self.img_layer_norm(self.img_linear(feats))
        position = self.pos_layer_norm(self.pos_linear(boxes7))
        return self.dropout(self.LayerNorm(image + position + type_embeddings))


class Encoder(nn.Module):
    """A stack of BERT layers under `layer`, as in the original key names."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden, additive_mask):
        for layer in self.layer:
            hidden = layer(hidden, additive_mask)
        return hidden


class Uniter(Backbone):
    """UNITER: single-stream transformer over words and detector regions; loads the original
    checkpoints."""

    description = (
        "UNITER single-stream transformer over words and detector regions "
        "(own implementation, loads the original .pt checkpoints)"
    )
    presets = ("tiny", "base", "large")
    image_input = "regions"
    lowercase = False  # bert-base-cased

    def __init__(self, preset: str = "tiny", **overrides: int):
        super().__init__()
        settings = {**presets()[self.check_preset(preset)], **overrides}
        self.preset = preset
        self.img_dim = settings.pop("img_dim")
        self.vocab_size = settings["vocab_size"]
        self.max_positions = settings["max_position_embeddings"]
        config = BertConfig(**settings, **_BERT, layer_norm_eps=1e-12)
        config._attn_implementation = "sdpa"
        self.hidden_size = config.hidden_size
        self.embeddings = TextEmbeddings(config)
        self.img_embeddings = ImageEmbeddings(config, self.img_dim)
        self.encoder = Encoder(config)
        self.pooler = BertPooler(config)
        self.apply(_init_weights)
        self._tokenizer = None
        #: a tokenizer folder found beside the checkpoint (set by `build`)
        self.tokenizer_files: Path | None = None

    @property
    def tokenizer(self):
        """The world's word-level tokenizer if the vocabulary is the world's (the tiny preset),
        else bert-base-cased, loaded on first use: from `use_tokenizer`'s path, a tokenizer
        kept beside the checkpoint, or the hub."""
        if self._tokenizer is None:
            self._tokenizer = default_tokenizer(self.vocab_size, self.tokenizer_files)
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
        """The architecture's input needs, from the checkpoint's tensor shapes alone."""
        if checkpoint is None:
            preset = cls.check_preset(preset)
            settings = presets()[preset]
        else:
            state, _ = read_checkpoint(checkpoint, shapes_only=True)
            preset, overrides = _architecture(state, preset, str(checkpoint))
            settings = {**presets()[preset], **overrides}
        vocab = settings["vocab_size"]
        if tokenizer is not None:
            load = partial(local_tokenizer, tokenizer, cls.lowercase)
        else:
            files = beside(checkpoint) if checkpoint is not None else None
            load = partial(default_tokenizer, vocab, files)
        positions = settings["max_position_embeddings"]
        return Inputs(
            f"uniter-{preset}", "regions", load, settings["img_dim"], vocab, None, positions
        )

    @classmethod
    def build(cls, preset: str | None = None, checkpoint: str | os.PathLike | None = None):
        if checkpoint is None:
            return cls(cls.check_preset(preset))
        state, report = read_checkpoint(checkpoint)
        preset, overrides = _architecture(state, preset, str(checkpoint))
        model = cls(preset, **overrides)
        model.load_backbone_state(state, source=str(checkpoint))
        model.load_report = report
        model.tokenizer_files = beside(checkpoint)
        return model

    def load_backbone_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load backbone weights (keys without the `uniter.` prefix); any gap is an error that
        lists what is missing."""
        own = self.state_dict()
        for key, value in state.items():
            if key not in own:
                raise VLPruneError(
                    f"{source}: {_PREFIX}{key} does not exist in uniter-{self.preset}"
                )
            if value.shape != own[key].shape:
                raise VLPruneError(
                    f"{source}: {_PREFIX}{key} has shape {tuple(value.shape)}, "
                    f"uniter-{self.preset} expects {tuple(own[key].shape)}"
                )
        if missing := sorted(own.keys() - state.keys()):
            listed = ", ".join(_PREFIX + key for key in missing[:LISTED])
            more = f", … ({len(missing) - LISTED} more)" if len(missing) > LISTED else ""
            raise VLPruneError(
                f"{source}: {len(missing)} backbone key{'s are' if len(missing) > 1 else ' is'} "
                f"missing: {listed}{more}"
            )
        self.load_state_dict(state)

    def forward(self, batch: VLBatch, text_delta=None, image_delta=None) -> VLOutput:
        ids = batch.input_ids
        types = batch.token_type_ids if batch.token_type_ids is not None else torch.zeros_like(ids)
        text = self.embeddings(ids, types, text_delta)
        feats = batch.region_feats.to(text.dtype)
        if image_delta is not None:
            feats = feats + image_delta
        boxes = batch.region_boxes.to(text.dtype)
        boxes7 = torch.cat([boxes, boxes[..., 4:5] * boxes[..., 5:6]], dim=-1)
        image_types = torch.full(feats.shape[:2], batch.image_type, device=ids.device)
        image = self.img_embeddings(
            feats, boxes7, self.embeddings.token_type_embeddings(image_types), batch.masked_regions
        )
        region_mask = batch.region_mask
        if region_mask is None:
            region_mask = torch.ones(feats.shape[:2], dtype=torch.long, device=ids.device)
        keep = torch.cat([batch.attention_mask, region_mask.to(batch.attention_mask.dtype)], dim=1)
        additive = (1.0 - keep[:, None, None, :].to(text.dtype)) * -10000.0
        hidden = self.encoder(torch.cat([text, image], dim=1), additive)
        length = ids.shape[1]
        return VLOutput(hidden[:, :length], hidden[:, length:], self.pooler(hidden))

    def perturbation_shapes(self, batch: VLBatch) -> tuple[torch.Size, torch.Size]:
        return (
            torch.Size((*batch.input_ids.shape, self.hidden_size)),
            batch.region_feats.shape,
        )

    def prunable(self) -> list[tuple[nn.Module, str]]:
        pairs = []
        for layer in self.encoder.layer:
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
        pairs.append((self.pooler.dense, "weight"))
        return pairs

    def structure(self) -> list[Block]:
        """Each layer's self-attention heads and feed-forward neurons."""
        blocks = []
        for layer in self.encoder.layer:
            attention = layer.attention
            own = attention.self
            blocks.append(heads(own.query, own.key, own.value, attention.output.dense, own))
            blocks.append(neurons(layer.intermediate.dense, layer.output.dense))
        return blocks

    def ensure_vocabulary(self, count: int) -> None:
        """Room for `count` word ids (UNITER's VCR fine-tuning adds 81 person words)."""
        words = self.embeddings.word_embeddings
        if count <= words.num_embeddings:
            return
        self.embeddings.word_embeddings = _grown(words, count)
        self.vocab_size = count
        if self.load_report is not None:
            self.load_report.grown.append(f"word embeddings {words.num_embeddings} → {count} rows")

    def ensure_image_types(self, count: int) -> None:
        """Room for `count` image token types (NLVR2's paired model uses 2), new ones copied from
        the first image type, as UNITER's fine-tuning does."""
        types = self.embeddings.token_type_embeddings
        self.embeddings.token_type_embeddings = with_image_types(types, count)
        grown = self.embeddings.token_type_embeddings.num_embeddings
        if grown != types.num_embeddings and self.load_report is not None:
            self.load_report.grown.append(
                f"token type embeddings {types.num_embeddings} → {grown} rows"
            )


def _grown(embedding: nn.Embedding, count: int) -> nn.Embedding:
    """`embedding` with `count` rows, the new ones drawn as UNITER initialises them."""
    grown = nn.Embedding(count, embedding.embedding_dim, padding_idx=embedding.padding_idx)
    grown.to(embedding.weight.device, embedding.weight.dtype)
    _init_weights(grown)
    with torch.no_grad():
        grown.weight[: embedding.num_embeddings] = embedding.weight
    return grown


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def default_tokenizer(vocab_size: int, files: Path | None):
    """The world's tokenizer for the world's vocabulary; else bert-base-cased, from `files`
    (a tokenizer kept beside the checkpoint) or the hub."""
    if vocab_size == embedded_world().vocab_size:
        return embedded_world().tokenizer()
    if files is not None:
        return local_tokenizer(files, lowercase=False)
    from transformers import BertTokenizerFast

    return from_hub(
        BertTokenizerFast.from_pretrained,
        TOKENIZER,
        hint=f"pass --tokenizer with {TOKENIZER}'s folder or vocab.txt",
    )


def read_checkpoint(
    checkpoint: str | os.PathLike, shapes_only: bool = False
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Backbone tensors of an original UNITER checkpoint (keys without `uniter.`, LayerNorm
    gamma/beta renamed) and the report of what was left out or renamed: task and pre-training
    heads ignored, buffers such as `position_ids` accepted. `shapes_only`: meta tensors."""
    if not is_local(checkpoint):
        raise VLPruneError(
            f"UNITER weights are files, not hub ids: pass the path of uniter-base.pt "
            f"or a .safetensors file (got {checkpoint})"
        )
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        raise VLPruneError(
            f"{path}: a folder; UNITER's weights are one file (uniter-base.pt or a .safetensors)"
        )
    if not path.is_file():
        raise VLPruneError(f"{path}: no such checkpoint file")
    raw = read_state_dict(path, shapes_only)
    report = LoadReport(str(checkpoint))
    parallel = sum(key.startswith("module.") for key in raw)
    if parallel:
        report.converted.append(f"{parallel} 'module.' prefixes (DataParallel) dropped")
    raw = {key.removeprefix("module."): value for key, value in raw.items()}
    # The original checkpoints prefix backbone keys with `uniter.`; a bare backbone state dict
    # (as vl_prune itself saves θ0) has none.
    prefix = "" if "embeddings.word_embeddings.weight" in raw else _PREFIX
    state, renamed = {}, 0
    for key, value in raw.items():
        if not key.startswith(prefix):
            report.ignored.append(key)
            continue
        key = key[len(prefix) :]
        if key in HARMLESS:
            report.accepted.append(_PREFIX + key)
            continue
        plain = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
        renamed += plain != key
        state[plain] = value
    if renamed:
        report.converted.append(f"{renamed} LayerNorm gamma/beta → weight/bias")
    if not state or "embeddings.word_embeddings.weight" not in state:
        raise VLPruneError(f"{path}: no {_PREFIX}embeddings: not a UNITER checkpoint")
    return state, report


def _architecture(
    state: dict[str, torch.Tensor], preset: str | None, source: str
) -> tuple[str, dict]:
    """The preset to build and the settings to change in it for a checkpoint: its own shapes
    when no preset is given (named after the preset of its width), else the preset's, whose
    shapes the checkpoint must then fit (only the token types may have grown)."""
    if preset is not None:
        preset = Uniter.check_preset(preset)
        types = _shape(state, "embeddings.token_type_embeddings", source)[0]
        return preset, {"type_vocab_size": types}
    preset, overrides = _closest_preset(state, source), _settings_from_state(state, source)
    if presets()[preset]["hidden_size"] != overrides["hidden_size"]:
        overrides["num_attention_heads"] = max(1, overrides["hidden_size"] // 64)
    return preset, overrides


def _shape(state: dict[str, torch.Tensor], module: str, source: str) -> torch.Size:
    """The shape of `<module>.weight`, which must exist as a matrix."""
    weight = state.get(f"{module}.weight")
    if weight is None or weight.dim() != 2:
        found = "missing" if weight is None else f"of shape {tuple(weight.shape)}"
        raise VLPruneError(f"{source}: {_PREFIX}{module}.weight is {found}")
    return weight.shape


def _settings_from_state(state: dict[str, torch.Tensor], source: str) -> dict[str, int]:
    vocab, hidden = _shape(state, "embeddings.word_embeddings", source)
    numbers = {int(k.split(".")[2]) for k in state if re.match(r"encoder\.layer\.\d+\.", k)}
    if not numbers:
        raise VLPruneError(f"{source}: no {_PREFIX}encoder.layer.* keys")
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=1 + max(numbers),
        intermediate_size=_shape(state, "encoder.layer.0.intermediate.dense", source)[0],
        max_position_embeddings=_shape(state, "embeddings.position_embeddings", source)[0],
        type_vocab_size=_shape(state, "embeddings.token_type_embeddings", source)[0],
        img_dim=_shape(state, "img_embeddings.img_linear", source)[1],
    )


def _closest_preset(state: dict[str, torch.Tensor], source: str) -> str:
    hidden = _shape(state, "embeddings.word_embeddings", source)[1]
    return next((p for p, s in presets().items() if s["hidden_size"] == hidden), "base")
