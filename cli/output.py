"""How results are shown to people: aligned tables, percentages and progress lines."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import click


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; the columns numbered in `right` align right."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    lines = []
    for row in [headers, *rows]:
        cells = [
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def percent(x: float) -> str:
    return f"{100 * x:.2f}%"


def progress(quiet: bool) -> Callable[[str], None]:
    """Progress lines on stderr: from the main process only, none with --quiet."""
    from vl_prune.distributed import process_state

    if quiet or not process_state().is_main_process:
        return lambda line: None
    return lambda line: click.echo(line, err=True)
