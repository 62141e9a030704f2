"""Reading weight files without running code: safetensors, or torch pickles with weights_only."""

from __future__ import annotations

from pathlib import Path

import torch

from vl_prune.errors import VLPruneError


def reason(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file or a torch checkpoint (`torch.load` with
    `weights_only=True`, so a pickle can hold nothing but tensors and containers). A state dict
    wrapped as `{"model": ...}` or `{"state_dict": ...}` is unwrapped."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise VLPruneError(f"{path}: cannot read checkpoint ({reason(exc)})") from exc
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VLPruneError(f"{path}: not a state dict of tensors")
    return state
