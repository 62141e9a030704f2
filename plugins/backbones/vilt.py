"""ViLT (Kim et al., ICML 2021): one transformer over words and raw image patches, no detector.
A wrapper around transformers' `ViltModel`.

The model sits under `vilt`, so parameter paths (and ticket tensor names) are the keys of
`dandelin/vilt-b32-mlm`: `vilt.encoder.layer.0.attention.attention.query.weight`.
"""

from __future__ import annotations

import os
from functools import cache, partial
from pathlib import Path

import torch
from torch import nn
from transformers import BertTokenizerFast, ViltConfig, ViltModel

from vl_prune.backbone import Backbone, Inputs, VLBatch, VLOutput, is_local, with_image_types
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
from vl_prune_plugins.backbones.vilt_original import convert, is_original, load_original


@cache
def presets() -> dict[str, dict[str, int]]:
    """Each preset's architecture. `tiny` reads the embedded world's words and inputs, asked when
    a preset is first needed, not when the plugin is imported."""
    return {
        # For the embedded world and the tests: 64-pixel images in 16-pixel patches (4 × 4 for a
        # square image), trains on 2 CPU cores in seconds.
        "tiny": dict(
            vocab_size=embedded_world().vocab_size,
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=256,
            image_size=embedded_world().image_size,
            patch_size=16,
            max_position_embeddings=64,
        ),
        # dandelin/vilt-b32-mlm: ViT-B/32 on 384-pixel images, bert-base-uncased vocabulary.
        "b32": dict(
            vocab_size=30522,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            image_size=384,
            patch_size=32,
            max_position_embeddings=40,
        ),
    }


# Not checked against a checkpoint: ensure_image_types grows it. The tiny preset is pre-trained
# here, so it is born with a second image type (NLVR2); the b32 checkpoint has text + one image.
IMAGE_TYPES = {"tiny": 3, "b32": 2}
HUB_ID = "dandelin/vilt-b32-mlm"
# The tensors whose shapes give a weights file's vocabulary, hidden size and image size.
WORDS = "embeddings.text_embeddings.word_embeddings.weight"
PATCHES, GRID = "embeddings.patch_embeddings.projection.weight", "embeddings.position_embeddings"
POSITIONS = "embeddings.text_embeddings.position_embeddings.weight"
# The modality type embedding (the text embeddings have a token_type_embeddings of their own).
_TYPES = "embeddings.token_type_embeddings.weight"


class Vilt(Backbone):
    """ViLT: single-stream transformer over words and image patches."""

    description = (
        "ViLT single-stream transformer over words and raw image patches (transformers' ViltModel)"
    )
    presets = ("tiny", "b32")
    image_input = "pixels"

    def __init__(self, preset: str = "tiny", model: ViltModel | None = None, source: str = HUB_ID):
        """The preset's architecture with fresh weights, or `model` (loaded by `build`);
        `source` (a folder or hub id) is where the b32 tokenizer and image processor are read."""
        super().__init__()
        self.preset = self.check_preset(preset)
        self.vilt = model if model is not None else ViltModel(preset_config(self.preset))
        self.hidden_size = self.vilt.config.hidden_size
        self.vocab_size = self.vilt.config.vocab_size
        self.max_positions = self.vilt.config.max_position_embeddings
        # The world's vocabulary (the tiny preset's) has the world's tokenizer, others a real one.
        world = embedded_world()
        self._tokenizer = world.tokenizer() if self.vocab_size == world.vocab_size else None
        self._image_processor = None
        self._source = source
        # from_pretrained leaves models in eval mode; a fresh module (and uniter) is in train mode.
        self.train()

    @property
    def tokenizer(self):
        """The world's word-level tokenizer (tiny), or the checkpoint's BertTokenizerFast loaded
        on first use, so building from local weights needs no network."""
        if self._tokenizer is None:
            self._tokenizer = from_source(BertTokenizerFast.from_pretrained, self._source)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    @property
    def image_processor(self):
        """Resizes (shorter side to the model's image size, sides a multiple of 32), normalises
        and pads images into pixel_values + pixel_mask: the checkpoint folder's, else ViLT's own
        preprocessing made here (no hub needed)."""
        if self._image_processor is None:
            self._image_processor = image_processor(self._source, self.vilt.config.image_size)
        return self._image_processor

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
            names = ("vocab_size", "hidden_size", "image_size", "max_position_embeddings")
            vocab, hidden, size, positions = (settings[k] for k in names)
            source = HUB_ID
        else:
            vocab, hidden, size, positions = _input_sizes(checkpoint)
            source = files_source(checkpoint, "preprocessor_config.json", HUB_ID)
        load = tokenizer_loader(tokenizer, vocab, checkpoint, BertTokenizerFast, HUB_ID)
        label = f"vilt-{preset or preset_of_width(presets(), hidden)}"
        processor = partial(image_processor, source, size)
        return Inputs(
            label,
            "pixels",
            load,
            vocab_size=vocab,
            image_processor=processor,
            max_positions=positions,
        )

    @classmethod
    def build(cls, preset: str | None = None, checkpoint: str | os.PathLike | None = None):
        """A save_pretrained folder or hub id brings its own config: under an explicit preset it
        must match it. A state-dict file takes the preset's (default: the one of its width),
        except a checkpoint in ViLT's original layout (`vilt_200k_mlm_itm.ckpt`), which has the
        architecture its tensors give (see `vilt_original`)."""
        if checkpoint is None:
            return cls(cls.check_preset(preset))
        if preset is not None:
            cls.check_preset(preset)

        def file_config(state: dict[str, torch.Tensor]) -> ViltConfig:
            chosen = preset or preset_of_width(presets(), embedding_width(state, checkpoint))
            # A fine-tuned NLVR2 checkpoint has a third modality type.
            types = next(
                (v.shape[0] for k, v in state.items() if k.removeprefix("vilt.") == _TYPES),
                None,
            )
            return preset_config(chosen, image_types=types)

        if is_original(checkpoint):
            model, report = load_original(checkpoint, presets(), preset)
        else:
            model, report = load_pretrained(ViltModel, checkpoint, file_config)
        if preset is None:
            preset = preset_of_width(presets(), model.config.hidden_size)
        else:
            check_architecture(model.config, presets()[preset], f"vilt-{preset}", report.source)
        source = files_source(checkpoint, "preprocessor_config.json", HUB_ID)
        backbone = cls(preset, model, source)
        backbone.load_report = report
        return backbone

    def forward(
        self,
        batch: VLBatch,
        text_delta: torch.Tensor | None = None,
        image_delta: torch.Tensor | None = None,
    ) -> VLOutput:
        """Encode a batch; `image_delta` is added to the patch projection's output, before the
        position embeddings. ViLT visits the patches in a random order (torch.multinomial):
        image_states rows follow it, so seed torch's generator to repeat a run exactly."""
        embeddings = self.vilt.embeddings
        words = embeddings.text_embeddings.word_embeddings(batch.input_ids)
        if text_delta is not None:
            words = words + text_delta
        hook = None
        if image_delta is not None:
            hook = embeddings.patch_embeddings.register_forward_hook(
                lambda _module, _inputs, patches: patches + image_delta
            )
        try:
            out = self.vilt(
                inputs_embeds=words,
                attention_mask=batch.attention_mask,
                token_type_ids=batch.token_type_ids,
                pixel_values=batch.pixel_values,
                pixel_mask=batch.pixel_mask,
                image_token_type_idx=batch.image_type,
            )
        finally:
            if hook is not None:
                hook.remove()
        hidden = out.last_hidden_state
        length = batch.input_ids.shape[1]
        return VLOutput(hidden[:, :length], hidden[:, length:], out.pooler_output)

    def perturbation_shapes(self, batch: VLBatch) -> tuple[torch.Size, torch.Size]:
        """The word embeddings' shape, and the patch grid's: B × hidden × H/patch × W/patch."""
        height, width = self.vilt.embeddings.patch_embeddings.patch_size
        batch_size, _, pixels_high, pixels_wide = batch.pixel_values.shape
        return (
            torch.Size((*batch.input_ids.shape, self.hidden_size)),
            torch.Size((batch_size, self.hidden_size, pixels_high // height, pixels_wide // width)),
        )

    def prunable(self) -> list[tuple[nn.Module, str]]:
        """Every linear weight of the encoder layers (query, key, value, attention output,
        intermediate, output) and the pooler; not the patch projection or any embedding."""
        linears = [m for m in self.vilt.encoder.layer.modules() if isinstance(m, nn.Linear)]
        return [(module, "weight") for module in [*linears, self.vilt.pooler.dense]]

    def transformers_model(self) -> ViltModel:
        """The wrapped model, its config fitting the embeddings as they have grown."""
        config = self.vilt.config
        config.vocab_size = self.vilt.embeddings.text_embeddings.word_embeddings.num_embeddings
        config.modality_type_vocab_size = self.vilt.embeddings.token_type_embeddings.num_embeddings
        return self.vilt

    def structure(self) -> list[Block]:
        """Each encoder layer's self-attention heads and feed-forward neurons."""
        blocks = []
        for layer in self.vilt.encoder.layer:
            own = layer.attention.attention
            output = layer.attention.output.dense
            blocks.append(heads(own.query, own.key, own.value, output, own))
            blocks.append(neurons(layer.intermediate.dense, layer.output.dense))
        return blocks

    def ensure_image_types(self, count: int) -> None:
        """Room for `count` image types in the modality type embedding (row 0 is text); new rows
        start as copies of the first image's, as ViLT's NLVR2 fine-tuning does."""
        embeddings = self.vilt.embeddings
        embeddings.token_type_embeddings = with_image_types(embeddings.token_type_embeddings, count)
        # save_pretrained must write a config that fits the grown embedding.
        self.vilt.config.modality_type_vocab_size = embeddings.token_type_embeddings.num_embeddings


def preset_config(preset: str, image_types: int | None = None) -> ViltConfig:
    return ViltConfig(
        **presets()[preset], modality_type_vocab_size=image_types or IMAGE_TYPES[preset]
    )


def image_processor(source: str, size: int):
    """A checkpoint folder's image processor (its preprocessor_config.json), else ViLT's own
    preprocessing built in memory: the PIL backend (no torchvision needed), bicubic resize of
    the shorter side to `size`, sides a multiple of 32, 0.5 mean/std normalisation."""
    from transformers import ViltImageProcessorPil

    if is_local(source) and (Path(source) / "preprocessor_config.json").is_file():
        return ViltImageProcessorPil.from_pretrained(source)
    return ViltImageProcessorPil(size={"shortest_edge": size}, size_divisor=32)


def _input_sizes(checkpoint: str | os.PathLike) -> tuple[int, int, int, int]:
    """Vocabulary size, hidden size, image size and text positions of a checkpoint: from a
    weights file's tensor shapes (any of its layouts), else from its config."""
    state = file_shapes(checkpoint, "vilt.", is_original, convert)
    if state is None:
        config = from_source(ViltConfig.from_pretrained, str(checkpoint))
        sizes = (config.vocab_size, config.hidden_size, config.image_size)
        return (*sizes, config.max_position_embeddings)
    dims = {WORDS: 2, PATCHES: 4, POSITIONS: 2, **({GRID: 3} if GRID in state else {})}
    check_tensors(state, dims, checkpoint, "ViLT")
    words, patches, positions = state[WORDS], state[PATCHES], state[POSITIONS]
    vocab, hidden = words.shape
    # The position grid (cls first) times the patch size: the image size trained on.
    grid = round((state[GRID].shape[1] - 1) ** 0.5) if GRID in state else 0
    size = grid * patches.shape[-1] or presets()["b32"]["image_size"]
    return vocab, hidden, size, positions.shape[0]
