"""The lottery-ticket driver: rounds of any mask rule, iterative or one-shot, from θ0 or rewound,
in a resumable run folder.

A run lives in `runs/<backbone>-<task>-<method>-<hash>/`, the hash taken over everything that
decides its results but the seed; each seed's rounds in its `seed_<s>/`. Round 0 fine-tunes the
dense model from (θ0, φ0), once for every run of the task that prunes from it
(`vl_prune.dense`); round r trains the mask that the method cut for it from the reset
weights (θ0 and φ0, or θ_k and φ_k when rewinding, trained from step k to the end). Seeds
differ in the head φ0, the data order and dropout; θ0 is the same for all. A round is finished
once its `metrics.json` exists: the same command again skips finished rounds and continues an
unfinished one from its last checkpoint (open_lth's levels and "skip what is done"); more
seeds later add to the same folder. The report averages the seeds, and the ticket kept is the
sparsest round whose mean score holds `keep` of the mean dense score. Rounds run round by round
over the seeds, so that `stop_below` can end a schedule once the mean curve has broken; that
ends the rounds run, not the run's identity: the same run without it goes on from there."""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from vl_prune.adversarial import AdversarialSettings
from vl_prune.checkpoint import reason
from vl_prune.cleanup import open_run_folder
from vl_prune.dense import CHECKPOINT, METRICS, DenseRounds
from vl_prune.distributed import job_lock, process_state
from vl_prune.errors import VLPruneError
from vl_prune.experiment import Experiment, FindSettings
from vl_prune.files import atomic_write
from vl_prune.pruning import ScorePruning, geometric, linear, prune_to
from vl_prune.pruning.aliases import MethodAlias, resolve
from vl_prune.pruning.layout import load_plain_state
from vl_prune.seeds import Stream, over_seeds, seed_list, seed_of
from vl_prune.task import VLModel
from vl_prune.ticket import Ticket
from vl_prune.train import Checkpoints

TICKET = "ticket.safetensors"
REWIND = "rewind.safetensors"


@dataclass(frozen=True)
class Round:
    """A finished round as its `metrics.json` and the report hold it."""

    round: int
    sparsity: float
    score: float
    fraction_of_dense: float
    seconds: float
    #: finished by an earlier run of the same command (not written: a property of this run)
    skipped: bool = False

    @classmethod
    def read(cls, path: Path) -> Round:
        """A round an earlier run finished, from its `metrics.json`."""
        try:
            record = json.loads(path.read_text())
            return cls(
                **{f.name: record[f.name] for f in fields(cls) if f.name != "skipped"},
                skipped=True,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise VLPruneError(
                f"{path}: damaged ({reason(exc)}); delete it to train the round again"
            ) from exc

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "skipped"}

    def record(self) -> dict[str, Any]:
        """What a ticket's `history` says of the round."""
        return {"round": self.round, "sparsity": self.sparsity, "score": self.score}

    def line(self) -> str:
        return (
            f"sparsity {self.sparsity:.1%}, score {self.score:.4f} "
            f"({self.fraction_of_dense:.1%} of dense)"
        )


class Lottery:
    """Finds tickets: one run folder, each seed's rounds, the report over the seeds."""

    def __init__(
        self,
        settings: FindSettings,
        runs: str | Path = "runs",
        checkpoint_every: int = 50,
        quiet: bool = False,
        log: Callable[[str], None] = lambda line: None,
    ):
        method, alias = resolve(settings.method)
        #: structured methods cut the heads and neurons the backbone declares
        self.structured = getattr(method, "needs_structure", False) is True
        if not (isinstance(method, type) and (issubclass(method, ScorePruning) or self.structured)):
            raise VLPruneError(
                f"method {settings.method!r} is neither a ScorePruning method nor one that "
                "cuts a backbone's structure (needs_structure), and cannot run rounds"
            )
        implied = alias or MethodAlias(settings.method, "")
        if implied.rewind and settings.rewind_step is None:
            raise VLPruneError(f"method {settings.method!r} needs --rewind-step")
        if checkpoint_every < 1:
            raise VLPruneError(f"--checkpoint-every must be at least 1, not {checkpoint_every}")
        # What the alias stands for is said by its name, in the hash as in the folder's name:
        # `oneshot --one-shot` is the run `oneshot` is.
        if implied.adversarial and settings.train.adversarial is None:
            adversarial = replace(settings.train, adversarial=AdversarialSettings())
            settings = replace(settings, train=adversarial)
        if implied.one_shot:
            settings = replace(settings, one_shot=False)
        self.settings, self.method = settings, method
        self.seeds = seed_list(settings.train.seed, settings.seeds)
        #: the procedure: one-shot cuts, and rewinding (to θ_k, k = `rewind_step`)
        self.one_shot = settings.one_shot or implied.one_shot
        self.rewinds = settings.rewind_step is not None
        #: the method as typed, with the procedure settings given besides it: `random-rewind`
        extras = [("oneshot", settings.one_shot), ("rewind", self.rewinds and not implied.rewind)]
        self.label = "-".join([settings.method, *(name for name, given in extras if given)])
        self.checkpoint_every, self.quiet, self.log = checkpoint_every, quiet, log
        self.experiment = Experiment(settings, log)
        if self.structured and not self.experiment.theta0.structure():
            raise VLPruneError(
                f"method {settings.method!r} cuts heads and neurons, and {settings.backbone} "
                "declares none (Backbone.structure)"
            )
        total = self.experiment.total
        if settings.schedule == "geometric":
            self.targets = geometric(total, settings.rate, settings.sparsity)
        else:
            self.targets = linear(total, settings.sparsity)
        identity = settings.identity()
        del identity["train"]["seed"]  # each seed has its folder in the run's
        self.config = {
            **identity,
            "preset": self.experiment.preset,
            "data": self.experiment.data_fingerprint,
            "weights_fingerprint": self.experiment.fingerprint,
        }
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()
        name = f"{settings.backbone}-{settings.task}-{self.label}-{digest[:10]}"
        self.folder = Path(runs) / name
        #: the dense rounds this run shares with the others of its task and training; a
        #: rewinding run trains its own, as it saves θ_k while training it
        self.dense = DenseRounds(self.experiment, runs, checkpoint_every, log)

    @property
    def rounds(self) -> int:
        """Rounds after the dense one."""
        return len(self.targets)

    def round_folder(self, r: int, seed: int | None = None) -> Path:
        """Where round `r` of `seed` (default: the first seed) keeps its ticket and metrics."""
        return self.folder / f"seed_{self.seeds[0] if seed is None else seed}" / f"round_{r:02d}"

    def run(self, keep: float = 0.99, stop_below: float | None = None) -> dict[str, Any]:
        """Run (or finish) the rounds of every seed, round by round, and write the report,
        curve and ticket. With `stop_below`, the schedule ends after the first round whose mean
        score falls below that fraction of the mean dense score: the curve has broken there,
        and sparser rounds would cost as much to show only that."""
        _check(keep, stop_below)
        state = process_state()
        with job_lock(self.folder):  # one job at a time in a run folder
            if state.is_main_process:
                open_run_folder(self.folder, self.config, self.log)
            state.wait_for_everyone()
            return self._run(keep, stop_below)

    def finished(
        self, keep: float = 0.99, stop_below: float | None = None
    ) -> dict[str, Any] | None:
        """The report `run` with these settings would give, read from the run's finished
        rounds without training any; None while a round it needs is unfinished."""
        _check(keep, stop_below)
        histories: dict[int, list[Round]] = {seed: [] for seed in self.seeds}
        for r in range(self.rounds + 1):
            for seed in self.seeds:
                done = self.round_folder(r, seed) / METRICS
                if not done.is_file():
                    return None
                histories[seed].append(Round.read(done))
            if _broken(histories, r, stop_below):
                break
        return self._report(histories, keep)

    def _run(self, keep: float, stop_below: float | None) -> dict[str, Any]:
        state = process_state()
        started, ran = time.perf_counter(), []
        histories: dict[int, list[Round]] = {seed: [] for seed in self.seeds}
        left = len(self.seeds) * (self.rounds + 1)
        up_to = "up to " if stop_below is not None else ""
        # Round by round, every seed's, so that the mean curve is known after each round.
        for r in range(self.rounds + 1):
            for seed in self.seeds:
                history = histories[seed]
                history.append(self._round(seed, r, history))
                left -= 1
                if not history[-1].skipped:
                    ran.append(history[-1].seconds)
                    if left:
                        self.log(f"  {up_to}about {_duration(left * sum(ran) / len(ran))} left")
            if _broken(histories, r, stop_below):
                if r < self.rounds:
                    self.log(
                        f"round {r} holds {_held(histories, r):.1%} of dense, below "
                        f"--stop-below {stop_below:g}: the schedule ends here"
                    )
                break
        report = self._report(histories, keep)
        if state.is_main_process:
            self._write_outputs(report)
        state.wait_for_everyone()
        report["seconds"] = round(time.perf_counter() - started, 1)
        return report

    def _round(self, seed: int, r: int, history: list[Round]) -> Round:
        folder = self.round_folder(r, seed)
        named = f"seed {seed}, round {r}" if len(self.seeds) > 1 else f"round {r}"
        named += f"/{self.rounds}"
        done = folder / METRICS
        if done.is_file():
            finished = Round.read(done)
            self.log(f"{named}: finished earlier, skipped ({finished.line()})")
            return finished
        state = process_state()
        if state.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
        state.wait_for_everyone()
        if r == 0 and not self.rewinds:
            score, trained, seconds = self.dense.train(seed, named, self.quiet)
            own = Ticket.from_model(trained.backbone, trained.backbone.prunable())
        else:
            started = time.perf_counter()
            own, score, trained = self._train(seed, r, named)
            seconds = round(time.perf_counter() - started, 1)
        dense = score if r == 0 else history[0].score
        finished = Round(
            round=r,
            sparsity=own.sparsity,
            score=score,
            fraction_of_dense=score / dense if dense else 0.0,
            seconds=seconds,
        )
        records = [h.record() for h in [*history, finished]]
        self._cut(seed, r, trained, dense, records)
        if state.is_main_process:
            self._ticket(own, seed, r, dense, records, score=score).save(folder / TICKET)
            atomic_write(done, json.dumps(finished.as_json(), indent=2).encode())
            shutil.rmtree(folder / CHECKPOINT, ignore_errors=True)
        state.wait_for_everyone()
        self.log(f"{named}: {finished.line()}")
        return finished

    def _train(self, seed: int, r: int, named: str) -> tuple[Ticket, float, VLModel]:
        """Train round `r` of `seed` in its own folder (a rewinding run's dense round too, which
        saves θ_k as it trains): its mask, score and trained model."""
        folder = self.round_folder(r, seed)
        model = self.experiment.fresh(seed)
        rewound = r > 0 and self.rewinds
        if r == 0:
            own = Ticket.from_model(model.backbone, model.backbone.prunable())
        else:
            ticket_path = folder / TICKET
            if not ticket_path.is_file():
                raise VLPruneError(
                    f"{ticket_path} is missing: round {r - 1} finished without cutting it; "
                    f"delete {self.round_folder(r - 1, seed)} to redo that round"
                )
            own = Ticket.load(ticket_path)  # the mask the last round cut, with its metadata
            own.metadata.pop("created", None)  # a round's ticket is made when it finishes
            own.apply(model.backbone, strict=True)
            if rewound:
                load_plain_state(model, _read_rewind(self.round_folder(0, seed) / REWIND))
        self.log(
            f"{named}: training at sparsity {own.sparsity:.1%}"
            + (" (dense)" if r == 0 else "")
            + (f" from step {self.settings.rewind_step}" if rewound else "")
        )
        score, trained = self.experiment.train(
            model,
            description=named,
            seed=seed,
            quiet=self.quiet,
            checkpoints=Checkpoints(folder / CHECKPOINT, self.checkpoint_every),
            on_step=self._rewind_saver(seed) if r == 0 and self.rewinds else None,
            start=self.settings.rewind_step if rewound else 0,
        )
        return own, score, trained

    def _cut(self, seed: int, r: int, trained: VLModel, dense: float, records: list[dict]) -> None:
        """Write the masks that round r's trained weights give the rounds after it: the next
        round's, or (one-shot, after the dense round) every round's."""
        if self.one_shot:
            levels = range(1, self.rounds + 1) if r == 0 else range(0)
        else:
            levels = range(r + 1, min(r + 1, self.rounds) + 1)
        if levels and process_state().is_main_process:
            # Later rounds derive from this cut: anything left of them (a redone round) is stale.
            for later in range(r + 1, self.rounds + 1):
                shutil.rmtree(self.round_folder(later, seed), ignore_errors=True)
        process_state().wait_for_everyone()
        parameters = trained.backbone.prunable()
        rule = {"structure": trained.backbone.structure()} if self.structured else {}
        for level in levels:
            # The trained model itself is cut: its masks are the next round's ticket.
            choices = seed_of(seed, Stream.PRUNE, level)  # random pruning's
            prune_to(parameters, self.method, self.targets[level - 1], seed=choices, **rule)
            if process_state().is_main_process:
                cut = Ticket.from_model(trained.backbone, parameters)
                self.round_folder(level, seed).mkdir(exist_ok=True)
                self._ticket(cut, seed, level, dense, records).save(
                    self.round_folder(level, seed) / TICKET
                )

    def _rewind_saver(self, seed: int) -> Callable[[int, VLModel], None]:
        """Saves θ_k and φ_k, the dense run's weights after `rewind_step` steps."""

        def save(step: int, model: VLModel) -> None:
            if step == self.settings.rewind_step and process_state().is_main_process:
                from safetensors.torch import save as to_bytes

                state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                atomic_write(self.round_folder(0, seed) / REWIND, to_bytes(state))

        return save

    def _ticket(
        self,
        ticket: Ticket,
        seed: int,
        r: int,
        dense: float,
        history: list[dict],
        score: float | None = None,
    ) -> Ticket:
        settings = self.settings
        ticket.metadata.update(
            backbone=settings.backbone,
            preset=self.config["preset"],
            weights_fingerprint=self.experiment.fingerprint,
            task=settings.task,
            metric=self.experiment.task.metric,
            method=self.label,
            schedule=settings.schedule,
            seed=seed,
            round=r,
            score=score,
            dense_score=dense,
            history=history,
            run=self.folder.name,
        )
        return ticket

    def _report(self, histories: dict[int, list[Round]], keep: float) -> dict[str, Any]:
        """The report users read (report.json, `--json`): plain JSON, each round's score the
        mean over the seeds, with their spread (sample std; 0 for one seed) and each seed's."""
        rounds = []
        for r in range(len(histories[self.seeds[0]])):
            level = [histories[seed][r] for seed in self.seeds]
            rounds.append(
                {
                    "round": r,
                    "sparsity": level[0].sparsity,
                    **over_seeds([h.score for h in level]),
                    "seconds": round(sum(h.seconds for h in level), 1),
                }
            )
        dense = rounds[0]["score"]
        for row in rounds:
            row["fraction_of_dense"] = row["score"] / dense if dense else 0.0
        holding = [row for row in rounds if row["score"] >= keep * dense]
        final = max(holding, key=lambda row: row["sparsity"])
        return {
            "run": self.folder.name,
            "backbone": self.settings.backbone,
            "preset": self.config["preset"],
            "task": self.settings.task,
            "metric": self.experiment.task.metric,
            "method": self.label,
            "seeds": self.seeds,
            "dense_score": dense,
            "dense_std": rounds[0]["std"],
            "keep": keep,
            #: the schedule ended before its last round (`stop_below`)
            "stopped_early": len(rounds) < self.rounds + 1,
            "rounds": rounds,
            "final": {**final, "ticket": str(self.folder / TICKET), "seed": self.seeds[0]},
        }

    def _write_outputs(self, report: dict[str, Any]) -> None:
        """The ticket kept (the first seed's mask at the round chosen on the mean, carrying the
        seeds' scores and the mean dense score; its `history` is its own seed's), report.json
        and curve.png."""
        from vl_prune.plots import curves

        final = report["final"]
        ticket = Ticket.load(self.round_folder(final["round"]) / TICKET)
        ticket.metadata.update(
            score=final["score"],
            std=final["std"],
            scores=final["scores"],
            seeds=self.seeds,
            dense_score=report["dense_score"],
            dense_std=report["dense_std"],
        )
        ticket.save(self.folder / TICKET)
        atomic_write(self.folder / "report.json", json.dumps(report, indent=2).encode())
        curves([report], self.folder / "curve.png")


def _read_rewind(path: Path) -> dict[str, Any]:
    """θ_k as `_rewind_saver` wrote it: read as safetensors whatever the file holds, so nothing
    in a run folder goes through torch's unpickler."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (OSError, SafetensorError) as exc:
        raise VLPruneError(
            f"{path}: damaged ({reason(exc)}); delete {path.parent} to train from the dense round"
        ) from exc


def _check(keep: float, stop_below: float | None) -> None:
    if not 0.0 < keep <= 1.0:
        raise VLPruneError(f"--keep must be in (0, 1], not {keep}")
    if stop_below is not None and not 0.0 < stop_below <= keep:
        # above --keep it would end schedules at rounds that still hold the ticket
        raise VLPruneError(f"--stop-below must be in (0, --keep {keep:g}], not {stop_below}")


def _broken(histories: dict[int, list[Round]], r: int, stop_below: float | None) -> bool:
    """Whether the schedule ends after round `r`: its mean fell below `stop_below` of dense."""
    return bool(r) and stop_below is not None and _held(histories, r) < stop_below


def _held(histories: dict[int, list[Round]], r: int) -> float:
    """Round `r`'s mean score as a fraction of the mean dense score."""
    dense = _mean(histories, 0)
    return _mean(histories, r) / dense if dense > 0 else 1.0  # nothing to fall from


def _mean(histories: dict[int, list[Round]], r: int) -> float:
    """The mean score of round `r` over the seeds."""
    return statistics.fmean(history[r].score for history in histories.values())


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"
