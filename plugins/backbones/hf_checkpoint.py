"""Loading transformers backbones: save_pretrained folders, state-dict files, hub ids, and
checking them against a preset. Shared by the lxmert and vilt plugins."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from vl_prune.backbone import LoadReport, is_local
from vl_prune.checkpoint import read_state_dict, reason
from vl_prune.errors import VLPruneError
from vl_prune.hub import from_hub, from_source
from vl_prune.tokenizers import local_tokenizer
from vl_prune.world import embedded_world


def preset_of_width(presets: dict[str, dict[str, int]], hidden: int) -> str:
    """The preset of that hidden size; failing that the last, largest one."""
    return next((p for p, s in presets.items() if s["hidden_size"] == hidden), [*presets][-1])


def embedding_width(state: dict[str, torch.Tensor], checkpoint: str | os.PathLike) -> int:
    """The hidden size of a state dict, read off its word embeddings."""
    for key, value in state.items():
        if key.endswith("word_embeddings.weight"):
            return value.shape[1]
    raise VLPruneError(f"{checkpoint}: no word embeddings: not a checkpoint of this backbone")


def check_architecture(
    config: PreTrainedConfig, preset: dict[str, int], name: str, source: str
) -> None:
    """A checkpoint loaded under an explicit preset must have that preset's shape (else, e.g.,
    the tiny tokenizer would silently feed a base model)."""
    for key, value in preset.items():
        if getattr(config, key) != value:
            raise VLPruneError(
                f"{source}: {key} is {getattr(config, key)} but {name} has {value}; "
                "leave out the preset to take the checkpoint's architecture"
            )


def files_source(checkpoint: str | os.PathLike, marker: str, default: str) -> str:
    """Where the tokenizer (or image processor) files come from: the checkpoint's folder if it
    holds `marker` (e.g. tokenizer_config.json), the hub id given as checkpoint, else `default`."""
    if not is_local(checkpoint):
        return str(checkpoint)
    folder = Path(checkpoint).expanduser()
    if folder.is_file():  # a weights file: its tokenizer files would sit beside it
        folder = folder.parent
    return str(folder) if (folder / marker).is_file() else default


@contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' loading without its progress bar and load report: vl_prune reports what
    loading did itself (`LoadReport`), in one line."""
    from transformers.utils import logging

    shown, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if shown:
            logging.enable_progress_bar()


def file_shapes(
    checkpoint: str | os.PathLike,
    base: str,
    is_original: Callable[[str | os.PathLike], bool],
    convert: Callable[[dict[str, torch.Tensor], str], tuple],
) -> dict[str, torch.Tensor] | None:
    """A weights file's tensors as meta tensors under the backbone model's own names (the base
    model's prefix `base` dropped; a file in the original release's layout converted, so that a
    key mapping onto nothing is refused before any weight is read); None for a save_pretrained
    folder or a hub id, whose config tells the sizes instead."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        check_folder(path)
    if not is_local(checkpoint) or path.is_dir():
        return None
    if not path.is_file():
        raise VLPruneError(f"{path}: no such checkpoint file or folder")
    state = read_state_dict(path, shapes_only=True)
    if is_original(checkpoint):
        state = convert(state, str(checkpoint))[0]
    return {key.removeprefix(base): value for key, value in state.items()}


def check_tensors(
    state: dict[str, torch.Tensor], dims: dict[str, int], checkpoint: str | os.PathLike, name: str
) -> None:
    """The tensors a weights file's sizes are read off must exist, each with `dims[key]`
    dimensions."""
    for key, dim in dims.items():
        if key not in state:
            raise VLPruneError(f"{checkpoint}: no {key}: not a checkpoint of {name}")
        if state[key].dim() != dim:
            raise VLPruneError(
                f"{checkpoint}: {key} has shape {tuple(state[key].shape)}, expected {dim} "
                "dimensions"
            )


def check_folder(path: Path) -> None:
    """A checkpoint folder must be a save_pretrained one: transformers reads a folder without
    config.json as the default architecture, with random weights."""
    if not (path / "config.json").is_file():
        raise VLPruneError(
            f"{path}: a folder without config.json; expected a save_pretrained folder "
            "(config.json and the weights) or a weights file"
        )


def tokenizer_loader(
    tokenizer: str | os.PathLike | None,
    vocab_size: int,
    checkpoint: str | os.PathLike | None,
    tokenizer_class: type,
    hub_id: str,
) -> Callable[[], object]:
    """How to load a checkpoint's tokenizer, lazily: `--tokenizer`'s local files; the world's
    tokenizer for the world's vocabulary; else the checkpoint folder's files or the hub's."""
    if tokenizer is not None:
        return partial(local_tokenizer, tokenizer, lowercase=True)
    if vocab_size == embedded_world().vocab_size:
        return embedded_world().tokenizer
    source = files_source(checkpoint, "tokenizer_config.json", hub_id) if checkpoint else hub_id
    return partial(from_source, tokenizer_class.from_pretrained, source)


def load_pretrained(
    model_class: type[PreTrainedModel],
    checkpoint: str | os.PathLike,
    file_config: Callable[[dict[str, torch.Tensor]], PreTrainedConfig],
) -> tuple[PreTrainedModel, LoadReport]:
    """A transformers model from a save_pretrained folder, a state-dict file (.safetensors, or a
    .bin/.pt/.pth pickle read with weights_only; its config from `file_config`) or a hub id.
    Checkpoints of the pre-training models load too: transformers strips their base-model prefix
    (`lxmert.`, `vilt.`) and the keys left over (the heads) go into the report. A backbone key
    the checkpoint lacks is an error, never a silent random init."""
    source = str(checkpoint)
    # Mismatched shapes are reported back, so the error below can name the tensor.
    options = dict(output_loading_info=True, ignore_mismatched_sizes=True)
    if not is_local(checkpoint):
        with quiet_loading():
            model, info = from_hub(model_class.from_pretrained, source, **options)
    else:
        path = Path(checkpoint).expanduser()
        if path.is_dir():
            check_folder(path)
            args, kwargs = (path,), {}
        elif path.is_file():
            state = read_state_dict(path)
            args, kwargs = (None,), {"config": file_config(state), "state_dict": state}
        else:
            raise VLPruneError(f"{path}: no such checkpoint file or folder")
        try:
            with quiet_loading():
                model, info = model_class.from_pretrained(*args, **kwargs, **options)
        except Exception as exc:
            name = model_class.__name__
            raise VLPruneError(f"{path}: cannot load a {name} ({reason(exc)})") from exc
    if missing := sorted(info["missing_keys"]):
        raise VLPruneError(f"{source}: backbone key {missing[0]} is missing")
    if mismatched := sorted(info["mismatched_keys"]):
        key, found, expected = mismatched[0]
        raise VLPruneError(
            f"{source}: {key} has shape {tuple(found)}, the model expects {tuple(expected)}"
        )
    return model, LoadReport(source, sorted(info["unexpected_keys"]))
