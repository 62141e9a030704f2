"""Reading weight files without running code: safetensors, or torch pickles with weights_only."""

from __future__ import annotations

from pathlib import Path

import torch

from vl_prune.errors import VLPruneError


def reason(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_state_dict(path: str | Path, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file or a torch checkpoint (`torch.load` with
    `weights_only=True`, so a pickle can hold nothing but tensors and containers). A state dict
    wrapped as `{"model": ...}` or `{"state_dict": ...}` is unwrapped. `shapes_only` gives
    tensors on the meta device, read without loading the values where the format allows."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors" and shapes_only:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as file:
                state = {
                    key: torch.empty(file.get_slice(key).get_shape(), device="meta")
                    for key in file.keys()  # noqa: SIM118 (safe_open is no mapping)
                }
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = _torch_load(path, shapes_only)
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
    (nothing is read but the tensors' headers), else read whole once for both reads."""
    stat = path.stat()
    key = (path.resolve(), stat.st_mtime_ns, stat.st_size)
    if key in _READ_WHOLE and not shapes_only:
        return _READ_WHOLE.pop(key)
    if shapes_only:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            _READ_WHOLE.clear()
            _READ_WHOLE[key] = torch.load(path, map_location="cpu", weights_only=True)
            return _READ_WHOLE[key]
    return torch.load(path, map_location="cpu", weights_only=True)
