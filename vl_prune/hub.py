"""Loading from a model hub: the local cache first, the network only if it answers at once.

No machine of this project reaches a hub, and a user offline should get one clear line, not a
hang followed by a long traceback.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlparse

from vl_prune.checkpoint import reason
from vl_prune.errors import VLPruneError

T = TypeVar("T")


def _online(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}:
        return False
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return True  # the proxy decides; a direct probe would say nothing
    url = urlparse(constants.ENDPOINT)
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def from_hub(
    load: Callable[..., T], hub_id: str, hint: str = "pass a local directory or file", **kwargs
) -> T:
    """`load(...)` (a `from_pretrained`) on the hub cache's copy of `hub_id`, else on `hub_id`
    if the network answers; offline, a VLPruneError that says so and `hint`, what to pass
    instead."""
    from huggingface_hub import snapshot_download

    # Ask the cache ourselves: transformers 5 can quietly build an empty tokenizer instead of
    # failing when `local_files_only=True` finds nothing.
    try:
        return load(snapshot_download(hub_id, local_files_only=True), **kwargs)
    except (OSError, ValueError):  # not cached, or not a valid hub id at all
        pass
    if not _online():
        raise VLPruneError(f"cannot download {hub_id}: no network; {hint}")
    try:
        return load(hub_id, **kwargs)
    except (OSError, ValueError) as exc:
        raise VLPruneError(f"cannot download {hub_id}: {reason(exc)}") from exc


def from_source(load: Callable[..., T], source: str, **kwargs) -> T:
    """`load(source)` (a `from_pretrained`): a local folder directly, a hub id through
    `from_hub` (the cache, else one clear line when offline)."""
    from vl_prune.backbone import is_local

    return load(source, **kwargs) if is_local(source) else from_hub(load, source, **kwargs)
