"""Figures written as PNG files (matplotlib, headless, atomic writes)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path


def iou_heatmap(
    matrix: Sequence[Sequence[float]], labels: Sequence[str], path: os.PathLike
) -> Path:
    """A labelled heatmap of pairwise ticket overlap."""
    # A bare Figure, not pyplot: a library must not switch the user's matplotlib backend.
    from matplotlib.figure import Figure

    from vl_prune.files import atomic_write

    size = 1.6 + 0.9 * len(labels)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.subplots()
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(
                j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k"
            )
    fig.colorbar(image, ax=ax, label="IoU of kept weights")
    ax.set_title("Ticket overlap")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return atomic_write(path, buffer.getvalue())


def curves(reports: Sequence[Mapping], path: os.PathLike) -> Path:
    """Score against sparsity for one or more runs (their `report.json` contents), with each
    run's dense score as a dashed line and the band within `keep` of it shaded."""
    from matplotlib.figure import Figure

    from vl_prune.files import atomic_write

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    bands = set()
    for index, report in enumerate(reports):
        colour = f"C{index}"
        rounds = sorted(report["rounds"], key=lambda r: r["sparsity"])
        label = f"{report['backbone']}-{report['preset']} {report['method']}"
        ax.plot(
            [100 * r["sparsity"] for r in rounds],
            [r["score"] for r in rounds],
            marker="o",
            color=colour,
            label=label,
        )
        dense, keep = report["dense_score"], report["keep"]
        if (dense, keep) not in bands:
            bands.add((dense, keep))
            ax.axhline(dense, color=colour, linestyle="--", linewidth=1)
            ax.axhspan(keep * dense, dense, color=colour, alpha=0.12, linewidth=0)
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
