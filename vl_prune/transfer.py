"""Ticket transfer: a mask found on one task, trained from θ0 on another task (with a new head
φ0) and scored against that task's dense score — the paper's transfer tables.

Every result is kept in `<runs>/transfer/` (beside `find`'s run folders), one per seed, keyed
by what decides it (the ticket's bytes, the seed, and the target's settings, data, θ0, process
count and vl_prune version), so a table that was interrupted goes on from the cells it had
finished. The dense model of a task is trained once per seed and shared with `find`'s runs
(`vl_prune.dense`). A cell's score is the mean over the seeds (`settings.seeds`), with
their std and each seed's score.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from vl_prune import __version__
from vl_prune.dense import DenseRounds, training_identity
from vl_prune.distributed import job_lock, process_state
from vl_prune.errors import VLPruneError
from vl_prune.experiment import Experiment, FindSettings
from vl_prune.files import atomic_write
from vl_prune.lora import check_rank
from vl_prune.lottery import METRICS, TICKET
from vl_prune.retrain import Lora, train_mask
from vl_prune.seeds import over_seeds, seed_list
from vl_prune.ticket import Ticket


def ticket_paths(sources: Iterable[str | Path]) -> list[Path]:
    """Ticket files from files and run folders (each seed's finished rounds past the dense one),
    each once."""
    paths = []
    for source in map(Path, sources):
        if source.is_file():
            paths.append(source)
        elif source.is_dir():
            rounds = sorted(
                folder / TICKET
                for folder in source.glob("seed_*/round_*")
                if (folder / METRICS).is_file() and folder.name != "round_00"
            )
            if not rounds:
                raise VLPruneError(f"{source}: no finished pruned rounds (is it a run folder?)")
            paths += rounds
        else:
            raise VLPruneError(f"{source}: no such ticket file or run folder")
    return list({path.resolve(): path for path in paths}.values())


class Transfer:
    """Trains tickets on one target task and scores them against that task's dense model."""

    def __init__(
        self,
        settings: FindSettings,
        runs: str | Path = "runs",
        quiet: bool = False,
        lora: int | None = None,
        log: Callable[[str], None] = lambda line: None,
    ):
        if lora is not None:
            check_rank(lora)
        self.experiment = Experiment(settings, log)
        self.folder = Path(runs) / "transfer"
        self.quiet = quiet
        #: train LoRA adapters of this rank over each masked backbone (the dense model
        #: it is compared with stays fully fine-tuned)
        self.lora = lora
        self.seeds = seed_list(settings.train.seed, settings.seeds)
        # No seed in it: a result is kept per seed.
        self.target = {**training_identity(self.experiment), "vl_prune": __version__}
        self.dense = DenseRounds(self.experiment, runs, log=log)

    def dense_score(self) -> dict[str, Any]:
        """The dense model's score on the target task over the seeds (`over_seeds`), each seed
        trained once, and shared with `find`'s runs on the task (`vl_prune.dense`)."""
        task = self.experiment.settings.task
        return over_seeds(
            [self.dense.train(seed, f"dense on {task}", self.quiet)[0] for seed in self.seeds]
        )

    def run(self, path: Path, force: bool = False) -> dict[str, Any]:
        """Train the ticket at `path` on the target task; its score, the dense score and the
        fraction of dense, with where the ticket came from."""
        ticket = Ticket.load(path)
        key = {"ticket": hashlib.sha256(path.read_bytes()).hexdigest(), "force": force}
        if self.lora is not None:
            key["lora"] = self.lora

        def train(cell: Path, seed: int) -> dict[str, Any]:
            # The adapters go beside the cell's result, named after it.
            adapters = None if self.lora is None else Lora(self.lora, cell.with_suffix(".lora"))
            return train_mask(
                self.experiment, ticket, force, quiet=self.quiet, lora=adapters, seed=seed
            )

        results = [
            self._cached({**key, "seed": seed}, lambda cell, seed=seed: train(cell, seed))
            for seed in self.seeds
        ]
        scores, dense = over_seeds([r["score"] for r in results]), self.dense_score()
        meta = ticket.metadata
        source = ("task", "method", "round", "seed", "backbone")
        return {
            "ticket": str(path),
            "source": {k: meta.get(k) for k in source},
            **results[0],
            **scores,
            "seeds": self.seeds,
            "dense_score": dense["score"],
            "dense_std": dense["std"],
            "fraction_of_dense": scores["score"] / dense["score"] if dense["score"] else None,
        }

    def _cached(self, key: dict[str, Any], compute: Callable[[Path], dict]) -> dict[str, Any]:
        """The result kept under `key`, or `compute(path)`'s, then kept at `path`."""
        identity = json.dumps({**key, "target": self.target}, sort_keys=True)
        digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
        settings = self.experiment.settings
        path = self.folder / f"{settings.backbone}-{settings.task}-{digest}.json"
        state = process_state()
        with job_lock(path):  # one job at a time trains a result
            # Every process looks only once the last result is written, so all of them agree
            # on whether to train (one process training alone would hang the job).
            state.wait_for_everyone()
            if path.is_file():
                return _read_result(path)
            if state.is_main_process:
                shutil.rmtree(path.with_suffix(".lora"), ignore_errors=True)  # a killed run's
            state.wait_for_everyone()
            result = compute(path)
            if state.is_main_process:
                atomic_write(path, json.dumps(result, indent=2).encode())
            state.wait_for_everyone()
            return result


def _read_result(path: Path) -> dict[str, Any]:
    try:
        result = json.loads(path.read_text())
    except ValueError as exc:
        raise VLPruneError(f"{path}: damaged ({exc}); delete it to train again") from exc
    if not isinstance(result, dict) or "score" not in result:
        raise VLPruneError(f"{path}: not a transfer result; delete it to train again")
    return result


def table(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The transfer table: a row per source ticket, a column per target task, cells the
    fraction of the target's dense score."""
    rows = list(dict.fromkeys(r["ticket"] for r in results))
    columns = list(dict.fromkeys(r["task"] for r in results))
    cells = {(r["ticket"], r["task"]): r for r in results}
    first = {row: next(r for r in results if r["ticket"] == row) for row in rows}
    labels = {row: label(result) for row, result in first.items()}
    repeated = {name for name in labels.values() if list(labels.values()).count(name) > 1}
    for row, name in labels.items():
        if name in repeated:  # the seeds of a run, or two runs of the same task and method
            seed = first[row]["source"].get("seed")
            where = ("" if seed is None else f"seed {seed}, ") + "/".join(Path(row).parts[-3:])
            labels[row] = f"{name} ({where})"
    return {
        "columns": columns,
        "dense": {
            task: next(r["dense_score"] for r in results if r["task"] == task) for task in columns
        },
        "rows": [
            {
                "ticket": row,
                "label": labels[row],
                "cells": {task: cells[row, task] for task in columns if (row, task) in cells},
            }
            for row in rows
        ],
    }


def label(result: dict[str, Any]) -> str:
    """A source ticket in a few words: its task, method and sparsity."""
    source = result["source"]
    found = " ".join(str(source[k]) for k in ("task", "method") if source.get(k))
    return f"{found or Path(result['ticket']).name} {result['sparsity']:.0%}"


def markdown(transfer: dict[str, Any]) -> str:
    """The table as markdown; `*` marks a ticket trained on weights it was not found from; over
    several seeds a cell gives the mean ± the std (both as fractions of the mean dense score)."""
    columns = transfer["columns"]
    lines = [
        "| ticket | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        "| dense | " + " | ".join(f"{transfer['dense'][t]:.4f}" for t in columns) + " |",
    ]
    for row in transfer["rows"]:
        cells = []
        for task in columns:
            cell = row["cells"].get(task)
            if cell is None or cell["fraction_of_dense"] is None:
                cells.append("")
                continue
            text = f"{cell['fraction_of_dense']:.1%}"
            if len(cell.get("scores", [])) > 1:
                text += f" ± {cell['std'] / cell['dense_score']:.1%}"
            cells.append(text + ("*" if cell["other_weights"] else ""))
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
