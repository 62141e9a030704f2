"""The backbone contract: what a `vl_prune.backbones` plugin provides.

A backbone is the pruned part f1 of a vision-and-language model (the task head f2 is the task's).
vl_prune only ever talks to it through this interface, so a new backbone is one subclass in any
distribution, registered under the `vl_prune.backbones` entry-point group.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from vl_prune.errors import VLPruneError

if TYPE_CHECKING:
    from vl_prune.pruning.structured import Block

ImageInput = Literal["regions", "pixels"]


@dataclass
class VLBatch:
    """A batch of text + image inputs, in the shapes every backbone understands.

    Region backbones read `region_feats` (B × N × img_dim detector features) and `region_boxes`
    (B × N × 6: x1, y1, x2, y2, w, h normalised by the image size, UNITER's `norm_bb`); pixel
    backbones read `pixel_values` (B × 3 × H × W) and `pixel_mask` (B × H × W).
    `masked_regions` (B × N, bool) marks regions hidden for masked-region modelling. `image_type`
    is the token type of the image: 1, or 2 for the second image of a two-image task (NLVR2).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None = None
    region_feats: torch.Tensor | None = None
    region_boxes: torch.Tensor | None = None
    region_mask: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    pixel_mask: torch.Tensor | None = None
    masked_regions: torch.Tensor | None = None
    image_type: int = 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> VLBatch:
        """The same batch with every tensor moved to `device`."""
        return self.map(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> VLBatch:
        return self.map(torch.Tensor.pin_memory)

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> VLBatch:
        """The same batch with `function` applied to every tensor."""
        mapped = {
            f.name: function(v) if isinstance(v := getattr(self, f.name), torch.Tensor) else v
            for f in fields(self)
        }
        return VLBatch(**mapped)


@dataclass
class VLOutput:
    """What a backbone returns: per-token text states, per-region/patch image states, pooled."""

    text_states: torch.Tensor
    image_states: torch.Tensor
    pooled: torch.Tensor


@dataclass
class LoadReport:
    """What loading a checkpoint did besides filling the backbone: keys it ignored (task and
    pre-training heads), keys it renamed to fit (`converted`), harmless buffers it accepted
    without loading (`accepted`), and embeddings grown since (`grown`)."""

    source: str
    ignored: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    grown: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = []
        if self.ignored:
            heads = ", ".join(sorted({k.split(".")[0] for k in self.ignored}))
            parts.append(f"ignored {len(self.ignored)} non-backbone keys ({heads})")
        if self.converted:
            parts.append(f"converted {', '.join(self.converted)}")
        if self.accepted:
            parts.append(f"accepted {', '.join(self.accepted)} (buffers; not loaded)")
        if self.grown:
            parts.append(f"grew {', '.join(self.grown)}")
        return f"loaded {self.source}: " + ("; ".join(parts) if parts else "every key used")


class Inputs:
    """What collating a batch needs of a backbone, known before any weights are read, so a
    data problem fails in seconds: its image input, region feature width, vocabulary size, the
    longest text it reads and (loaded when first asked for) tokenizer and image processor. A
    built backbone offers the same attributes; `Backbone.inputs` gives one or the other."""

    def __init__(
        self,
        label: str,
        image_input: ImageInput,
        tokenizer: Callable[[], Any],
        img_dim: int | None = None,
        vocab_size: int | None = None,
        image_processor: Callable[[], Any] | None = None,
        max_positions: int | None = None,
    ):
        self.label, self.image_input = label, image_input
        self.img_dim, self.vocab_size, self.max_positions = img_dim, vocab_size, max_positions
        self._load_tokenizer, self._load_processor = tokenizer, image_processor

    @cached_property
    def tokenizer(self) -> Any:
        return self._load_tokenizer()

    @cached_property
    def image_processor(self) -> Any:
        return self._load_processor() if self._load_processor is not None else None


class Backbone(nn.Module):
    """Base class of backbone plugins.

    Subclasses set the class attributes and implement `build`, `forward`, `prunable` and
    `perturbation_shapes`; `tokenizer` (and `image_processor` for pixel backbones) are set by
    `build`, and region backbones set `img_dim`. Parameter paths inside the backbone module are
    the names of ticket tensors, so a wrapper's attribute names (`lxmert.`, `vilt.`) are part of
    its ticket format. `build` returns the module in train mode, like any fresh `nn.Module`.
    """

    #: one line for `vlprune list backbones`
    description: ClassVar[str] = ""
    #: preset names `build` accepts; the first is the default
    presets: ClassVar[tuple[str, ...]] = ()
    #: "regions" (detector features + boxes) or "pixels" (images)
    image_input: ClassVar[ImageInput]

    #: whether the pre-trained vocabulary is lowercased, as bert-base-uncased's: how a plain
    #: vocab.txt given with --tokenizer is read
    lowercase: ClassVar[bool] = True

    preset: str
    hidden_size: int
    #: width of a region feature (region backbones)
    img_dim: int
    #: rows of the word embedding: token ids (a UNITER txt_db's) must be below it
    vocab_size: int | None = None
    #: text positions: longer texts are cut to this many tokens
    max_positions: int | None = None
    tokenizer: Any
    image_processor: Any = None
    load_report: LoadReport | None = None

    @property
    def label(self) -> str:
        """The backbone and its preset, as messages name them: `uniter-base`."""
        return f"{type(self).__name__.lower()}-{self.preset}"

    @classmethod
    def build(cls, preset: str | None = None, checkpoint: str | os.PathLike | None = None):
        """A backbone from a preset, a checkpoint (local file or folder, or a hub id), or both.

        Preset alone: that architecture, freshly initialised. Checkpoint alone: the checkpoint's
        architecture, named after the preset of its width. Both: the preset's architecture,
        which the checkpoint must fit (a wrong shape is an error naming the tensor). Keys of the
        checkpoint outside the backbone (heads) are listed in `load_report`.
        """
        raise NotImplementedError

    @classmethod
    def inputs(
        cls,
        preset: str | None = None,
        checkpoint: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
    ) -> Inputs | Backbone:
        """What collation needs of the backbone `build(preset, checkpoint)` would give (with
        `tokenizer`, see `use_tokenizer`), read before its weights where a plugin can: the
        built-ins read a checkpoint's shapes only. This default builds the backbone."""
        backbone = cls.build(preset, checkpoint)
        if tokenizer is not None:
            backbone.use_tokenizer(tokenizer)
        return backbone

    def use_tokenizer(self, path: str | os.PathLike) -> None:
        """Tokenize with the local tokenizer at `path`, a folder of tokenizer files or a BERT
        vocab.txt (read lowercased if `lowercase`), instead of the default one: how a machine
        without a model hub gives the tokenizer of a real checkpoint."""
        from vl_prune.tokenizers import local_tokenizer

        self.tokenizer = local_tokenizer(path, self.lowercase)

    def forward(
        self,
        batch: VLBatch,
        text_delta: torch.Tensor | None = None,
        image_delta: torch.Tensor | None = None,
    ) -> VLOutput:
        """Encode a batch. The deltas are additive perturbations (adversarial training): of the
        word embeddings, and of the raw image input (region features, or patch embeddings),
        added after `masked_regions` is applied (UNITER adds its learned mask embedding to
        masked regions, others zero them). ViLT samples its patch order at random on every
        call: seed torch before calls whose outputs are compared."""
        raise NotImplementedError

    def perturbation_shapes(self, batch: VLBatch) -> tuple[torch.Size, torch.Size]:
        """Shapes of `text_delta` and `image_delta` for this batch."""
        raise NotImplementedError

    def prunable(self) -> list[tuple[nn.Module, str]]:
        """The (module, "weight") pairs the paper prunes: every linear weight of the transformer
        layers and the pooler; never embeddings, biases, LayerNorms or heads."""
        raise NotImplementedError

    def structure(self) -> list[Block]:
        """The attention heads and feed-forward neurons of the prunable layers, each block made
        with `vl_prune.pruning.structured.heads` or `neurons`: what structured methods cut and
        `vlprune export --shrink` removes. This default declares none; unstructured methods
        need nothing of it."""
        return []

    def transformers_model(self) -> Any:
        """The `transformers.PreTrainedModel` this backbone is, its config fitting its grown
        embeddings (`vlprune export --format transformers` saves it); None, this default, for a
        backbone that is not one."""
        return None

    def ensure_image_types(self, count: int) -> None:
        """Room for `count` image token types (two-image tasks such as NLVR2 use 2), new ones
        initialised from the first image type. Backbones without image types keep this no-op."""

    def ensure_vocabulary(self, count: int) -> None:
        """Room for `count` word ids, new rows initialised as the backbone initialises words
        (a task's data may add words: UNITER's VCR txt_dbs add 81 person words). Backbones that
        cannot grow keep this default, which fails for any word they lack."""
        if self.vocab_size is None or count > self.vocab_size:
            raise VLPruneError(
                f"the data uses {count} word ids; {self.label} has {self.vocab_size} and cannot "
                "add words"
            )

    def prunable_names(self) -> list[str]:
        """The parameter paths of `prunable()`, as tickets name them."""
        from vl_prune.ticket import named_parameters

        return named_parameters(self, self.prunable())

    @classmethod
    def check_preset(cls, preset: str | None) -> str:
        """The preset to use, or a clear error listing the known ones."""
        preset = preset or cls.presets[0]
        if preset not in cls.presets:
            known = ", ".join(cls.presets)
            raise VLPruneError(f"unknown preset {preset!r} for {cls.__name__}; choose from {known}")
        return preset


def with_image_types(types: nn.Embedding, count: int) -> nn.Embedding:
    """A token-type embedding with room for `count` image types after the text type: `types`
    itself if it has it, else a copy grown with rows copied from row 1 (the first image type),
    as UNITER's and ViLT's two-image fine-tuning does."""
    if types.num_embeddings > count:
        return types
    grown = nn.Embedding(count + 1, types.embedding_dim).to(types.weight.device, types.weight.dtype)
    with torch.no_grad():
        grown.weight[: types.num_embeddings] = types.weight
        grown.weight[types.num_embeddings :] = types.weight[1]
    return grown


def is_local(checkpoint: str | os.PathLike) -> bool:
    """Whether a checkpoint argument names something on disk rather than a hub id."""
    text = str(checkpoint)
    return (
        Path(text).expanduser().exists()
        or text.startswith((".", "/", "~"))
        or text.endswith((".pt", ".pth", ".bin", ".safetensors"))
    )
