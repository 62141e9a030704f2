"""Figures written as PNG files (matplotlib, headless, atomic writes)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vl_prune.errors import VLPruneError

#: what `curves` reads of a run's report.json, and of each of its rounds
REPORT_KEYS = {
    "backbone": str,
    "preset": str,
    "method": str,
    "task": str,
    "metric": str,
    "dense_score": float,
    "keep": float,
    "rounds": list,
}
ROUND_KEYS = {"sparsity": float, "score": float}


def iou_heatmap(
    matrix: Sequence[Sequence[float]], labels: Sequence[str], path: os.PathLike
) -> Path:
    """A labelled heatmap of pairwise ticket overlap."""
    return _heatmap(matrix, labels, labels, "{:.2f}", "IoU of kept weights", "Ticket overlap", path)


def transfer_heatmap(transfer: Mapping, path: os.PathLike) -> Path:
    """The transfer table (`vl_prune.transfer.table`): source tickets against target tasks,
    each cell the fraction of the target's dense score."""
    columns = transfer["columns"]
    nan = float("nan")
    matrix = [
        [(row["cells"].get(t) or {}).get("fraction_of_dense") or nan for t in columns]
        for row in transfer["rows"]
    ]
    labels = [row["label"] for row in transfer["rows"]]
    title = "Ticket transfer (fraction of the target's dense score)"
    return _heatmap(matrix, labels, columns, "{:.1%}", "of dense", title, path, (0.5, 1.05))


def _heatmap(matrix, rows, columns, fmt, legend, title, path, limits=(0.0, 1.0)) -> Path:
    # A bare Figure, not pyplot: a library must not switch the user's matplotlib backend.
    from matplotlib.figure import Figure

    from vl_prune.files import atomic_write

    fig = Figure(figsize=(3.1 + 0.9 * len(columns), 1.6 + 0.9 * len(rows)))
    ax = fig.subplots()
    image = ax.imshow(matrix, vmin=limits[0], vmax=limits[1], cmap="viridis")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    middle = (limits[0] + limits[1]) / 2
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value == value:  # not NaN: a cell that was not run stays blank
                colour = "w" if value < middle else "k"
                ax.text(j, i, fmt.format(value), ha="center", va="center", color=colour)
    fig.colorbar(image, ax=ax, label=legend)
    ax.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return atomic_write(path, buffer.getvalue())


def check_report(report: Any, where: str) -> None:
    """`report` (read from `where`) must be a run's report.json as `curves` reads it; the
    error names the key that is missing or wrong."""
    if not isinstance(report, dict):
        raise VLPruneError(f"{where}: not a run report (a JSON object with 'rounds', 'task', …)")
    _check_keys(report, REPORT_KEYS, where)
    if not report["rounds"]:
        raise VLPruneError(f"{where}: 'rounds' is empty")
    seeds = report.get("seeds", [0])
    if not isinstance(seeds, list):
        raise VLPruneError(f"{where}: 'seeds' should be a list, found {seeds!r:.40}")
    several = len(seeds) > 1
    for i, record in enumerate(report["rounds"]):
        keys = {**ROUND_KEYS, "std": float} if several else ROUND_KEYS
        if not isinstance(record, dict):
            raise VLPruneError(f"{where}: rounds[{i}] is not a JSON object")
        _check_keys(record, keys, f"{where}: rounds[{i}]")


def _check_keys(record: dict, keys: Mapping[str, type], where: str) -> None:
    for key, kind in keys.items():
        value = record.get(key)
        number = kind is float and isinstance(value, int | float) and not isinstance(value, bool)
        if not (number or (kind is not float and isinstance(value, kind))):
            found = "missing" if key not in record else f"{value!r:.40}"
            wanted = "a number" if kind is float else f"a {kind.__name__}"
            raise VLPruneError(f"{where}: {key!r} should be {wanted}, found {found}")


def curves(reports: Sequence[Mapping], path: os.PathLike) -> Path:
    """Score against sparsity for one or more runs (their `report.json` contents): the mean
    over seeds, ± one std shaded where a run has several seeds, each run's dense score as a
    dashed line and the band within `keep` of it shaded lightly."""
    from matplotlib.figure import Figure

    from vl_prune.files import atomic_write

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    bands = set()
    for index, report in enumerate(reports):
        colour = f"C{index}"
        rounds = sorted(report["rounds"], key=lambda r: r["sparsity"])
        label = f"{report['backbone']}-{report['preset']} {report['method']}"
        x = [100 * r["sparsity"] for r in rounds]
        seeds = len(report.get("seeds", [0]))
        ax.plot(
            x,
            [r["score"] for r in rounds],
            marker="o",
            color=colour,
            label=label + (f" ({seeds} seeds, ± std)" if seeds > 1 else ""),
        )
        if seeds > 1:
            low = [r["score"] - r["std"] for r in rounds]
            high = [r["score"] + r["std"] for r in rounds]
            ax.fill_between(x, low, high, color=colour, alpha=0.25, linewidth=0)
        dense, keep = report["dense_score"], report["keep"]
        if (dense, keep) not in bands:
            bands.add((dense, keep))
            ax.axhline(dense, color=colour, linestyle="--", linewidth=1)
            ax.axhspan(keep * dense, dense, color=colour, alpha=0.08, linewidth=0)
    first = reports[0]
    ax.set_xlabel("sparsity of the prunable weights (%)")
    ax.set_ylabel(f"{first['task']} {first['metric']}")
    ax.set_title(f"Tickets on {first['task']}: dense (dashed), within {first['keep']:.0%} (band)")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return atomic_write(path, buffer.getvalue())
