"""Names users type for a mask rule run a certain way: `rewind` is `imp` with rewinding.

A pruning method is a mask rule only; how the lottery's rounds run (rewinding to θ_k, one-shot
cuts, adversarial fine-tuning) are its settings and combine with any rule, as in OpenLTH. An
alias is registered under `vl_prune.methods` like a rule, so the names of the paper's variants
stay what users type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MethodAlias:
    """A mask rule (its registry name) and the lottery settings the alias stands for."""

    method: str
    description: str
    #: survivors restart from the dense run's weights after `--rewind-step` steps (required)
    rewind: bool = False
    #: every sparsity is cut at once from the dense-trained weights
    one_shot: bool = False
    #: every round fine-tunes adversarially (VILLA)
    adversarial: bool = False


REWIND = MethodAlias(
    "imp", "IMP with rewinding: survivors restart from θ_k (--rewind-step k)", rewind=True
)
ONE_SHOT = MethodAlias(
    "imp",
    "One-shot magnitude pruning: each sparsity cut at once from the dense-trained weights",
    one_shot=True,
)
ADVERSARIAL = MethodAlias(
    "imp",
    "Adversarial IMP: every round fine-tunes with VILLA's adversarial training",
    adversarial=True,
)


def resolve(name: str) -> tuple[Any, MethodAlias | None]:
    """The mask rule registered as `name` (or that the alias `name` stands for) and the alias,
    each checked against its contract."""
    from vl_prune.contract import load_checked

    found = load_checked("methods", name)
    if not isinstance(found, MethodAlias):
        return found, None
    return load_checked("methods", found.method), found
