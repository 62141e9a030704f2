"""Figures written as PNG files (matplotlib, headless, atomic writes)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
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
