"""vl_prune: find, ship and apply lottery tickets in pre-trained vision-and-language transformers.

Importing the package is cheap: the ticket machinery (torch, safetensors) loads on first use and
plugins load only through :mod:`vl_prune.registry`.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Ticket", "VLPruneError", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Ticket":
        from vl_prune.ticket import Ticket

        return Ticket
    if name == "VLPruneError":
        from vl_prune.errors import VLPruneError

        return VLPruneError
    raise AttributeError(f"module 'vl_prune' has no attribute {name!r}")
