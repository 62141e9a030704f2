"""A fine-tuning's resume point, written and read as safetensors and JSON only.

Accelerate's `save_state` pickles the random states and registered objects, and its
`load_state` unpickles them: a crafted file in a run folder (which users share between
machines) would run code on resume. Here nothing is unpickled: tensors go to safetensors,
everything else to JSON, and a folder holding anything else is refused.

A save is a folder: `model.safetensors` (the model as `state_dict` gives it, torch's prune
layout included), `optimizer.safetensors` (its per-parameter tensors; the rest in the file's
metadata), `training.json` (schedule and fp16 loss scale) from the main process, and
`rng_<k>.safetensors` from process k (torch's CPU and CUDA generators, NumPy's and Python's).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from vl_prune.checkpoint import reason
from vl_prune.errors import VLPruneError

MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
TRAINING = "training.json"
RNG = "rng_{}.safetensors"
RANK_FILE = re.compile(r"rng_\d+\.safetensors")


def save(folder: Path, model: Any, optimizer: Any, scheduler: Any, accelerator: Any) -> None:
    """Write the state of every process into the new folder `folder` (every process calls it;
    the caller makes it visible, see `train._save`)."""
    if accelerator.is_main_process:
        folder.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(folder / MODEL), force_contiguous=True)
        tensors, rest = _split_optimizer(optimizer.state_dict())
        save_file(tensors, folder / OPTIMIZER, metadata={"state": json.dumps(rest)})
        training = {"scheduler": scheduler.state_dict()}
        if accelerator.scaler is not None:
            training["scaler"] = accelerator.scaler.state_dict()
        (folder / TRAINING).write_text(json.dumps(training))
    generators, rest = _random_states()
    save_file(generators, folder / RNG.format(accelerator.process_index), metadata=rest)


def load(folder: Path, model: Any, optimizer: Any, scheduler: Any, accelerator: Any) -> None:
    """Restore what `save` wrote into `folder`. A file that is not one of its own (an
    Accelerate pickle of an older vl_prune, or planted) is refused before anything is read."""
    restart = f"delete {folder.parent} to train the round again from its start"
    for path in sorted(folder.iterdir()):
        if path.name not in (MODEL, OPTIMIZER, TRAINING) and not RANK_FILE.fullmatch(path.name):
            raise VLPruneError(
                f"{path}: not part of a vl_prune training state (vl_prune never unpickles "
                f"anything from a run folder); {restart}"
            )
    # Each process's batches depend on how many there are: only the same count resumes.
    saved = sum(1 for path in folder.iterdir() if RANK_FILE.fullmatch(path.name))
    own = folder / RNG.format(accelerator.process_index)
    if saved != accelerator.num_processes:
        raise VLPruneError(
            f"{folder}: saved by a job of {saved} processes, not {accelerator.num_processes}; "
            f"resume with {saved}, or {restart}"
        )
    try:
        load_model(accelerator.unwrap_model(model), str(folder / MODEL), device="cpu")
        optimizer.load_state_dict(_join_optimizer(folder / OPTIMIZER))
        training = json.loads((folder / TRAINING).read_text())
        scheduler.load_state_dict(training["scheduler"])
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(training["scaler"])
        _set_random_states(own)
    except torch.OutOfMemoryError:
        raise  # the save is fine; the device is full
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise VLPruneError(f"{folder}: damaged training state ({reason(exc)}); {restart}") from exc


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state dict as tensors (keyed `<param>.<name>`) and plain JSON values."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _join_optimizer(path: Path) -> dict[str, Any]:
    with safe_open(path, framework="pt") as file:
        rest = json.loads(file.metadata()["state"])
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in load_file(path).items():
        param, name = key.split(".", 1)
        state.setdefault(int(param), {})[name] = tensor
    for param, values in rest["scalars"].items():
        state.setdefault(int(param), {}).update(values)
    # JSON has no tuples: AdamW's betas come back as a list, which it unpacks all the same.
    return {"state": state, "param_groups": rest["param_groups"]}


def _random_states() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every generator that training may draw from: tensors, and the rest as JSON text."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for device, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{device}"] = value
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    rest = {
        "numpy": json.dumps([kind, position, has_gauss, gauss]),
        "python": json.dumps([version, list(internal), gauss_next]),
    }
    return tensors, rest


def _set_random_states(path: Path) -> None:
    with safe_open(path, framework="pt") as file:
        rest = file.metadata()
    tensors = load_file(path)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{d}"] for d in range(len(tensors)) if f"cuda.{d}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, position, has_gauss, gauss = json.loads(rest["numpy"])
    keys = tensors["numpy"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, position, has_gauss, gauss))
    version, internal, gauss_next = json.loads(rest["python"])
    random.setstate((version, tuple(internal), gauss_next))
