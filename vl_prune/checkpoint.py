"""Reading weight files without running code: safetensors, or torch pickles with weights_only."""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from pathlib import Path

import torch

from vl_prune.errors import VLPruneError

#: what a weights file must be
EXPECTED = "expected a .safetensors file or a torch checkpoint (torch.save)"
#: the sentences of torch's weights-only refusals that are advice, not the reason: its advice
#: (load with weights_only=False) would run whatever code the file holds
_ADVICE = ("weights_only", "Weights only load failed", "torch.load", "WeightsUnpickler error")


def reason(exc: BaseException) -> str:
    """The first line of an exception's message that says what went wrong (never torch's advice
    to load without weights_only), or its type when it has none."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if isinstance(exc, pickle.UnpicklingError):
        lines = [line for line in lines if not any(a in line for a in _ADVICE)]
    return lines[0] if lines else type(exc).__name__


def _kind(path: Path) -> str:
    """The file's format, "safetensors" or "torch", told by its first bytes, not its name."""
    with path.open("rb") as file:
        head = file.read(16)
    if not head:
        raise VLPruneError(f"{path}: empty file (0 bytes); {EXPECTED}")
    # torch's zip format, or its pre-1.6 format: a pickle of protocol 2 or later
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return "torch"
    # safetensors: the header's length as 8 bytes, then the header, a JSON object
    if head[8:9] == b"{":
        return "safetensors"
    raise VLPruneError(f"{path}: not a safetensors file or torch checkpoint (it starts {head!r})")


def read_state_dict(path: str | Path, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file or a torch checkpoint (`torch.load` with
    `weights_only=True`, so a pickle can hold nothing but tensors and containers; see `_load` for
    the objects a training framework saves beside them). A state dict wrapped as
    `{"model": ...}` or `{"state_dict": ...}` (a Lightning `.ckpt`) is unwrapped. `shapes_only`
    gives tensors on the meta device, read without loading the values where the format allows."""
    path = Path(path)
    if path.is_dir():
        raise VLPruneError(f"{path}: a folder; {EXPECTED}")
    if not path.exists():
        raise VLPruneError(f"{path}: no such checkpoint file")
    kind = _kind(path)
    try:
        if kind == "safetensors" and shapes_only:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as file:
                state = {
                    key: torch.empty(file.get_slice(key).get_shape(), device="meta")
                    for key in file.keys()  # noqa: SIM118 (safe_open is no mapping)
                }
        elif kind == "safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = _torch_load(path, shapes_only)
    except VLPruneError:
        raise
    except pickle.UnpicklingError as exc:
        if named := re.search(r"GLOBAL (\S+)", str(exc)):
            raise VLPruneError(
                f"{path}: refused: the pickle names {named[1]}, which is no tensor or container "
                "(nothing from the file ran)"
            ) from exc
        raise VLPruneError(f"{path}: not a torch checkpoint of tensors ({reason(exc)})") from exc
    except EOFError as exc:
        raise VLPruneError(f"{path}: cannot read checkpoint (it ends early: truncated?)") from exc
    except Exception as exc:
        raise VLPruneError(f"{path}: cannot read checkpoint ({reason(exc)})") from exc
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VLPruneError(f"{path}: not a state dict of tensors")
    if shapes_only:
        return {key: value.to("meta") for key, value in state.items()}
    return state


#: a checkpoint read whole for its shapes (torch's pre-1.6 format, which UNITER's releases
#: were saved in, cannot be memory-mapped), kept for the read of its values that follows
_READ_WHOLE: dict[tuple[Path, int, int], object] = {}


def _torch_load(path: Path, shapes_only: bool) -> object:
    """`torch.load`; for shapes only, memory-mapped where the file is in torch's zip format
    (nothing is read but the tensors' headers), else read whole once and kept for every read
    after it, the last of which (the values) takes it."""
    stat = path.stat()
    key = (path.resolve(), stat.st_mtime_ns, stat.st_size)
    if key in _READ_WHOLE:
        return _READ_WHOLE[key] if shapes_only else _READ_WHOLE.pop(key)
    if not shapes_only:
        return _load(path)
    try:
        return _load(path, mmap=True)
    except RuntimeError:
        _READ_WHOLE.clear()
        _READ_WHOLE[key] = _load(path)
        return _READ_WHOLE[key]


class _StandIn:
    """Stands in for a class or function that a checkpoint names beside its tensors, such as
    `pytorch_lightning.utilities.parsing.AttributeDict` (hyper-parameters) or a callback's
    class: creating or calling it gives an empty OrderedDict, which the weights-only unpickler
    lets the pickle fill with items or attributes. Nothing from the file runs."""

    def __new__(cls, *args, **kwargs) -> OrderedDict:
        return OrderedDict()


def _load(path: Path, mmap: bool = False) -> object:
    """`torch.load` with `weights_only=True`, the globals it refuses outside torch (a Lightning
    checkpoint's classes, importable only with Lightning installed) read as `_StandIn`s: only
    the state dict matters, and `read_state_dict` checks it holds nothing but tensors."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except ValueError:  # not torch's zip format (torch < 1.6): read as is
        found = []
    if refused := [name for name in found if name.startswith("torch.")]:
        raise VLPruneError(
            f"{path}: names {', '.join(refused[:3])}, which a weights-only read refuses "
            "(nothing from the file ran)"
        )
    stand_ins = [(_StandIn, name) for name in found]
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
