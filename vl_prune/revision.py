"""Which code made a result: vl_prune's version, with the git commit when it runs from a checkout.

Results outlive the code that made them (a study's run folders are reused for weeks), and every
commit of a development version is "0.1.0": tickets record this instead, so a study can say
which commits trained its rounds.
"""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

from vl_prune import __version__

_SOURCE = Path(__file__).resolve().parents[1]


@cache
def revision() -> str:
    """`0.1.0` for an installed release; `0.1.0+g1a2b3c4` from a git checkout, with `.dirty`
    when tracked files differ from that commit (PEP 440 local versions)."""
    if not (_SOURCE / ".git").exists():
        return __version__
    try:
        # The checkout must be vl_prune's own (not a project that copied it into its root);
        # no optional locks: status may run in many processes of one study at once.
        _, commit, changes = (
            subprocess.run(
                ["git", "--no-optional-locks", "-C", str(_SOURCE), *command],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            for command in (
                ("ls-files", "--error-unmatch", "vl_prune/revision.py"),
                ("rev-parse", "--short", "HEAD"),
                ("status", "--porcelain", "--untracked-files=no"),
            )
        )
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{commit}" + (".dirty" if changes else "")
