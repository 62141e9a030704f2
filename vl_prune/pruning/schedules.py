"""Pruning schedules: how many of the original prunable weights are gone after each round.

Counts are exact integers so every round lands on its target, whatever the rounding.
"""

from __future__ import annotations


def _check_final(final: float) -> None:
    if not 0.0 < final < 1.0:
        raise ValueError(f"final sparsity {final} must be strictly between 0 and 1")


def linear(total: int, final: float = 0.9, step: float = 0.1) -> list[int]:
    """The paper's grid: step, 2·step, … of the original weights up to `final` (10%…90%)."""
    _check_final(final)
    if not 0.0 < step <= final:
        raise ValueError(f"step {step} must be in (0, final={final}]")
    rounds = int(final / step + 1e-9)
    # round(i * step, 10): 3 * 0.1 is 0.30000000000000004, which would tip .5 cases.
    targets = [round(round(i * step, 10) * total) for i in range(1, rounds + 1)]
    if not targets or targets[-1] < round(final * total):
        targets.append(round(final * total))
    # Tiny groups round several steps to the same count: a round that prunes nothing is waste.
    return sorted({t for t in targets if t > 0})


def geometric(total: int, rate: float, final: float = 0.9) -> list[int]:
    """OpenLTH's schedule: each round prunes `rate` of the weights still alive, up to `final`."""
    _check_final(final)
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate {rate} must be strictly between 0 and 1")
    goal, pruned, targets = round(final * total), 0, []
    while pruned < goal:
        pruned = min(goal, pruned + max(1, round(rate * (total - pruned))))
        targets.append(pruned)
    return targets


SCHEDULES = {"linear": linear, "geometric": geometric}
