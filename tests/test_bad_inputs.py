"""Every bad input gets one line: `vlprune: error: <what is wrong, naming the file>` on stderr,
exit code 2, no traceback and no file written.

One table: each row writes a bad input into its own folder (mostly a valid fixture, broken)
and gives the command line; the real command runs in that folder with `$VL_PRUNE_HOME` inside
it, and must refuse before any world or θ0 is built. To add a case, add a `Row`.

Each command runs in a process forked from a server that has imported vlprune once (see
`serve`): a fresh interpreter spends ~3 s importing torch and transformers, which would make
the table take minutes; `test_the_server_runs_what_the_console_script_runs` checks that a row
answers the same through the installed `vlprune` script.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

SERVER_MODULES = ("vl_prune_cli.main", "vl_prune.lottery", "vl_prune.retrain", "vl_prune.transfer")
PLUGIN_GROUPS = ("vl_prune.backbones", "vl_prune.tasks", "vl_prune.methods")
#: seconds a command may run before it is killed (each is refused in well under one)
TIME_LIMIT = 60


# The server ------------------------------------------------------------------------------------


def serve() -> None:
    """Answer requests ({argv, cwd, env} a line on stdin) with {rc, stdout, stderr, seconds} a
    line on stdout, each command run in a child forked from this process with everything
    imported. Forking before any torch operation ran is safe: no thread pool exists yet."""
    import importlib
    from importlib.metadata import entry_points

    modules = [*SERVER_MODULES, *(e.module for g in PLUGIN_GROUPS for e in entry_points(group=g))]
    for module in modules:
        # One that does not import fails the command that needs it, as it would for a user.
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    scratch = Path(tempfile.mkdtemp(prefix="vlprune-server-"))
    channel = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        out, err = scratch / "stdout", scratch / "stderr"
        channel.flush()
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            _child(request, out, err)
        _, status = os.waitpid(pid, 0)
        seconds = time.perf_counter() - start
        reply = {
            "rc": os.waitstatus_to_exitcode(status),
            "stdout": out.read_text(errors="replace"),
            "stderr": err.read_text(errors="replace"),
            "seconds": seconds,
        }
        channel.write(json.dumps(reply) + "\n")
        channel.flush()
    shutil.rmtree(scratch)


def _child(request: dict, out: Path, err: Path) -> None:
    """Run `vlprune ARGV` as the console script does, then leave without returning to the
    server's loop."""
    code = 1
    try:
        # A command that is not refused goes on to train: stop it, the test will say why.
        signal.alarm(TIME_LIMIT)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        from vl_prune_cli.main import main

        sys.argv = ["vlprune", *request["argv"]]
        try:
            main()
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str
    seconds: float


class Server:
    """The client side of `serve`."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, argv: list[str], cwd: Path, env: dict[str, str]) -> Result:
        request = {"argv": argv, "cwd": str(cwd), "env": env}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        assert reply, "the command server died"
        return Result(**json.loads(reply))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server():
    server = Server()
    yield server
    server.close()


def environment(folder: Path) -> dict[str, str]:
    """The user's environment, with a home of their own inside `folder` and no hub."""
    return {**os.environ, "VL_PRUNE_HOME": str(folder / "home"), "HF_HUB_OFFLINE": "1"}


# Valid inputs, written once: each row copies what it breaks ----------------------------------


@dataclass(frozen=True)
class Sources:
    release: Path  # NLVR2 as UNITER released it: txt_db/ + img_db/
    official: Path  # NLVR2's official json lines with UNITER's img_db/
    npz: Path  # NLVR2's official json lines with per-image features/*.npz
    vqa: Path  # VQA's official questions and annotations with UNITER's img_db/
    lxmert: Path  # LXMERT's NLVR2 json with its *_obj36.tsv features
    vilt: Path  # ViLT's NLVR2 Arrow tables
    refcoco: Path  # RefCOCO+ instances.json and refs(unc).json with UNITER's img_db/
    uniter: Path  # a tiny UNITER θ0 (the world's words, 64-d regions), safetensors
    lxmert_weights: Path  # a tiny LXMERT θ0, a state dict in transformers' names
    vilt_weights: Path  # a tiny ViLT θ0, a state dict in transformers' names
    ticket: Path  # a ticket of the tiny UNITER's prunable weights
    interrupted: Path  # runs/ of `RESUME` on `official`, stopped in round 1 after a save


def write_sources(root: Path) -> Sources:
    from lxmert_vilt_folders import lxmert_nlvr2, vilt_nlvr2
    from safetensors.torch import save_file
    from uniter_folders import IMG_DIM, write_folder
    from uniter_release import detection, write_npz_file

    from vl_prune.ticket import Ticket
    from vl_prune_plugins.backbones.lxmert import Lxmert
    from vl_prune_plugins.backbones.uniter import Uniter
    from vl_prune_plugins.backbones.vilt import Vilt

    official = write_folder(root / "official", "nlvr2", release=False)
    npz = Path(shutil.copytree(official, root / "npz", ignore=shutil.ignore_patterns("img_db")))
    (npz / "features").mkdir()
    for split in ("train", "dev"):
        for line in (npz / f"{split}.json").read_text().splitlines():
            pair = json.loads(line)["identifier"].rsplit("-", 1)[0]
            for image in (f"{pair}-img0", f"{pair}-img1"):
                dump = detection(image, boxes=16, img_dim=IMG_DIM, above=12)
                write_npz_file(npz / "features" / f"{image}.npz", dump)
    torch.manual_seed(0)
    uniter = Uniter.build("tiny")
    save_file(uniter.state_dict(), root / "uniter.safetensors")
    save_file(Lxmert.build("tiny").lxmert.state_dict(), root / "lxmert.safetensors")
    save_file(Vilt.build("tiny").vilt.state_dict(), root / "vilt.safetensors")
    ticket = Ticket.from_model(uniter, uniter.prunable(), backbone="uniter", task="nlvr2")
    return Sources(
        release=write_folder(root / "release", "nlvr2", release=True),
        official=official,
        npz=npz,
        vqa=write_folder(root / "vqa", "vqa", release=False),
        lxmert=lxmert_nlvr2(root / "lxmert", img_dim=IMG_DIM),
        vilt=vilt_nlvr2(root / "vilt"),
        refcoco=write_folder(root / "refcoco", "refcoco+", release=False),
        uniter=root / "uniter.safetensors",
        lxmert_weights=root / "lxmert.safetensors",
        vilt_weights=root / "vilt.safetensors",
        ticket=ticket.save(root / "ticket.safetensors"),
        interrupted=interrupted_run(root / "interrupted", official, root / "uniter.safetensors"),
    )


def interrupted_run(root: Path, data: Path, checkpoint: Path) -> Path:
    """The runs/ folder of `RESUME` run in `root` on a copy of `data`, its round 1 stopped by a
    NaN loss at step 3, after its save of step 2."""
    import vl_prune_plugins.tasks.nlvr2 as nlvr2
    from vl_prune_cli.main import cli

    shutil.copytree(data, root / "data")
    loss, calls = nlvr2.Nlvr2.loss, [0]

    def poisoned(self, logits, targets):
        calls[0] += 1
        return loss(self, logits, targets) * (float("nan") if calls[0] > 6 else 1.0)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nlvr2.Nlvr2, "loss", poisoned)
        patch.chdir(root)
        result = CliRunner().invoke(cli, [*find("nlvr2", checkpoint), *RESUME])
    assert result.exit_code == 2 and "loss became nan" in result.stderr, result.output
    return root / "runs"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Sources:
    return write_sources(tmp_path_factory.mktemp("sources"))


# Breaking them: each row's setup writes into its folder and gives the command line -------------

Setup = Callable[[Path, Sources], list[str]]
#: a file's new bytes, None to remove it, or a function that rewrites the file at that path
Change = bytes | None | Callable[[Path], object]


def find(task: str = "nlvr2", checkpoint: Path | str = "", *more: str) -> list[str]:
    """`find` on the row's data/ folder, with flags that would keep a run short."""
    return [
        *("find", "--task", task, "--data", "data", "--checkpoint", str(checkpoint)),
        *("--steps", "1", "--batch-size", "2", *more),
    ]


def apply(change: Change, path: Path) -> None:
    if change is None:
        path.unlink()
    elif isinstance(change, bytes):
        path.write_bytes(change)
    else:
        change(path)


def data_case(source: str, path: str | None, change: Change = None, *more: str) -> Setup:
    """`find` on a copy of a source folder with its file `path` changed (`more`: the task and
    flags; the tiny UNITER is the checkpoint)."""

    def setup(tmp: Path, src: Sources) -> list[str]:
        data = Path(shutil.copytree(getattr(src, source), tmp / "data"))
        if path is not None:
            apply(change, data / path)
        task, *flags = more or ("nlvr2",)
        return find(task, src.uniter, *flags)

    return setup


def checkpoint_case(
    write: Callable[[Path, Sources], object], name: str = "theta0.pt", source: str = "official"
) -> Setup:
    """`find` on valid data, with the checkpoint `write` makes (or not) at `name`."""

    def setup(tmp: Path, src: Sources) -> list[str]:
        shutil.copytree(getattr(src, source), tmp / "data")
        write(tmp / name, src)
        return find("nlvr2", name)

    return setup


def state_case(change: Callable[[dict], dict], model: str = "uniter") -> Setup:
    """`find` with a torch.save'd checkpoint (as UNITER's are) of the valid θ0's tensors,
    changed."""

    def write(path: Path, src: Sources) -> None:
        from safetensors.torch import load_file

        valid = {"uniter": src.uniter, "lxmert": src.lxmert_weights, "vilt": src.vilt_weights}
        torch.save(change(load_file(valid[model])), path)

    setup = checkpoint_case(write, source="vilt" if model == "vilt" else "official")
    return lambda tmp, src: [*setup(tmp, src), "--model", model]


def file_case(name: str, change: Change, *argv: str) -> Setup:
    """`argv` with a file `name` written by `change` into the row's folder."""

    def setup(tmp: Path, src: Sources) -> list[str]:
        apply(change, tmp / name)
        return list(argv)

    return setup


def ticket_case(change: Callable[[dict, dict], tuple[dict, dict]]) -> Setup:
    """`inspect` of ticket.safetensors: the valid ticket with its tensors and header metadata
    rewritten by `change`."""

    def setup(tmp: Path, src: Sources) -> list[str]:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(src.ticket, framework="pt") as file:
            metadata = file.metadata()
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
        tensors, metadata = change(tensors, metadata)
        save_file(tensors, tmp / "ticket.safetensors", metadata=metadata)
        return ["inspect", "ticket.safetensors"]

    return setup


#: a find whose round 1 saves its state at step 2 (of 4)
RESUME = ("--steps", "4", "--checkpoint-every", "2", "--sparsity", "0.2", "--quiet")


def resume_case(change: Callable[[Path], object]) -> Setup:
    """The same find again on the interrupted run, with `change(save)` made to its step-2
    save (`save.parent`: the checkpoint folder, `save.parent.parent`: round 1)."""

    def setup(tmp: Path, src: Sources) -> list[str]:
        shutil.copytree(src.official, tmp / "data")
        shutil.copytree(src.interrupted, tmp / "runs")
        (save,) = (tmp / "runs").glob("*/seed_*/round_01/checkpoint/step_0000002")
        change(save)
        return [*find("nlvr2", src.uniter), *RESUME]

    return setup


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def rewrite_npz(**changes: np.ndarray | None) -> Callable[[Path], None]:
    """Rewrites a feature file with arrays changed (None: left out)."""

    def rewrite(path: Path) -> None:
        with np.load(path) as npz:
            arrays = {name: npz[name] for name in npz.files} | changes
        with path.open("wb") as file:
            np.savez_compressed(file, **{k: v for k, v in arrays.items() if v is not None})

    return rewrite


def npy(path: Path) -> None:
    with path.open("wb") as file:
        np.save(file, np.zeros((16, 64), np.float16))


def img_db_value(change: Callable[[dict], dict] | bytes) -> Callable[[Path], None]:
    """Rewrites an img_db LMDB's first image: its arrays changed, or these bytes."""

    def rewrite(db: Path) -> None:
        import lmdb
        import msgpack_numpy

        from vl_prune.data.codecs import decode_arrays

        env = lmdb.open(str(db))
        with env.begin(write=True) as txn:
            key = next(k for k, _ in txn.cursor() if k != b"__keys__")
            arrays = {k: v.copy() for k, v in decode_arrays(txn.get(key)).items()}
            value = change if isinstance(change, bytes) else change(arrays)
            if isinstance(value, dict):
                value = msgpack_numpy.packb(value, use_bin_type=True)
            txn.put(key, value)
        env.close()

    return rewrite


def with_nan(arrays: dict) -> dict:
    arrays["features"][0, 0] = np.nan
    return arrays


def tsv_nan(path: Path) -> None:
    """The first image's features NaN, in an LXMERT feature file."""
    lines = path.read_bytes().splitlines(keepends=True)
    fields = lines[0].rstrip(b"\r\n").split(b"\t")
    fields[9] = base64.b64encode(np.full((int(fields[7]), 64), np.nan, np.float32).tobytes())
    path.write_bytes(b"\t".join(fields) + b"\r\n" + b"".join(lines[1:]))


def folder(path: Path, src: Sources) -> None:
    path.mkdir()
    (path / "notes.txt").write_text("the weights are on the other disk\n")


class RunsCode:
    """What a malicious checkpoint holds: a call, made as it is unpickled."""

    def __reduce__(self):
        return (os.system, ("echo ran",))


def without(tensors: dict, metadata: dict, name: str) -> tuple[dict, dict]:
    """A ticket without tensor `name`, in its shapes too."""
    shapes = {k: v for k, v in json.loads(metadata["shapes"]).items() if k != name}
    tensors = {k: v for k, v in tensors.items() if k != name}
    return tensors, {**metadata, "shapes": json.dumps(shapes)}


def compare_with_the_valid_ticket(tmp: Path, src: Sources) -> list[str]:
    ticket_case(lambda t, m: without(t, m, QUERY))(tmp, src)
    return ["compare", str(src.ticket), "ticket.safetensors"]


def ticket_of_another_backbone(tmp: Path, src: Sources) -> list[str]:
    shutil.copytree(src.official, tmp / "data")
    ticket_case(lambda t, m: (t, {**m, "backbone": "lxmert"}))(tmp, src)
    flags = find("nlvr2", src.uniter)[1:]
    return ["evaluate", "--ticket", "ticket.safetensors", "--model", "uniter", *flags]


#: a prunable weight of the tiny UNITER, and UNITER's and LXMERT's word embedding
QUERY = "encoder.layer.0.attention.self.query.weight"
WORDS = "embeddings.word_embeddings.weight"
GRID = "embeddings.position_embeddings"  # ViLT's patch positions
NLVR2_LINE = b'{"identifier": "train-0-0-0", "sentence": "Two dogs.", "label": "True"}\n'
LATIN1 = NLVR2_LINE.replace(b"Two dogs", "Two caf\xe9s".encode("latin-1"))
IMG_DB = "img_db/nlvr2_train/feat_th0.2_max100_min10"
QUESTIONS = "v2_OpenEnded_mscoco_train2014_questions.json"
#: a report whose round has no score
REPORT = {
    "backbone": "uniter",
    "preset": "tiny",
    "method": "imp",
    "task": "nlvr2",
    "metric": "accuracy",
    "dense_score": 0.7,
    "keep": 0.99,
    "rounds": [{"sparsity": 0.0}],
}
FIRST_NPZ = "features/train-0-0-img0.npz"


@dataclass(frozen=True)
class Row:
    id: str
    #: writes the bad input into the row's folder and gives the command line to run there
    setup: Setup
    #: what the one line must say
    message: str


ROWS = [
    # Per-image feature files (features/*.npz).
    Row("npz-empty", data_case("npz", FIRST_NPZ, b""), "train-0-0-img0.npz: empty (0 bytes)"),
    Row("npz-is-npy", data_case("npz", FIRST_NPZ, npy), "train-0-0-img0.npz: an .npy file"),
    Row(
        "npz-truncated",
        data_case("npz", FIRST_NPZ, lambda p: p.write_bytes(p.read_bytes()[:300])),
        "train-0-0-img0.npz: not readable npz",
    ),
    Row(
        "npz-norm-bb-n-by-4",
        data_case("npz", FIRST_NPZ, rewrite_npz(norm_bb=np.zeros((16, 4)))),
        "train-0-0-img0.npz: 'norm_bb' has shape (16, 4), expected 16 × 6",
    ),
    Row(
        "npz-no-features",
        data_case("npz", FIRST_NPZ, rewrite_npz(features=None)),
        "train-0-0-img0.npz: no 'features' array",
    ),
    Row(
        "npz-nan",
        data_case("npz", FIRST_NPZ, rewrite_npz(features=np.full((16, 64), np.nan))),
        "train-0-0-img0.npz: features or boxes hold NaN or infinite values",
    ),
    # UNITER's img_db (LMDB) and txt_db.
    Row(
        "imgdb-empty-value",
        data_case("official", IMG_DB, img_db_value(b"")),
        "feat_th0.2_max100_min10: key 'nlvr2_train-0-0-img0.npz': empty (0 bytes)",
    ),
    Row(
        "imgdb-norm-bb-n-by-4",
        data_case("official", IMG_DB, img_db_value(lambda a: a | {"norm_bb": a["norm_bb"][:, :4]})),
        "key 'nlvr2_train-0-0-img0.npz': 'norm_bb' has shape (12, 4), expected 12 × 6",
    ),
    Row(
        "imgdb-nan",
        data_case("official", IMG_DB, img_db_value(with_nan)),
        "key 'nlvr2_train-0-0-img0.npz': features or boxes hold NaN or infinite values",
    ),
    Row(
        "imgdb-missing",
        data_case("official", "img_db", shutil.rmtree),
        "data/train.json:1: image train-0-0-img0 is missing",
    ),
    Row(
        "imgdb-nbb-json-not-utf8",
        data_case("official", "img_db/nlvr2_train/nbb_th0.2_max100_min10.json", b'{"\xe9": 1}'),
        "nbb_th0.2_max100_min10.json:1: not UTF-8 text (byte 0xe9)",
    ),
    Row(
        "txtdb-meta-not-utf8",
        data_case("release", "txt_db/nlvr2_train.db/meta.json", b"{\xff}"),
        "txt_db/nlvr2_train.db/meta.json:1: not UTF-8 text (byte 0xff)",
    ),
    Row(
        "txtdb-id2len-a-list",
        data_case("release", "txt_db/nlvr2_train.db/id2len.json", b"[1, 2]"),
        "txt_db/nlvr2_train.db/id2len.json: expected {id: length}",
    ),
    # Annotation files.
    Row(
        "nlvr2-train-not-utf8",
        data_case("official", "train.json", LATIN1),
        "data/train.json:1: not UTF-8 text (byte 0xe9)",
    ),
    Row(
        "nlvr2-train-missing",
        data_case("official", "train.json", None),
        "data/train.json: annotation file is missing",
    ),
    Row("nlvr2-train-empty", data_case("official", "train.json", b""), "train.json: no examples"),
    Row(
        "nlvr2-train-nested-deep",
        data_case("official", "train.json", NLVR2_LINE + b"[" * 100_000 + b"]" * 100_000),
        "data/train.json:2: JSON nested too deeply to read",
    ),
    Row(
        "nlvr2-train-a-list-line",
        data_case("official", "train.json", NLVR2_LINE + b"[1, 2]\n"),
        "data/train.json:2: expected a JSON object",
    ),
    Row(
        "nlvr2-train-bad-label",
        data_case("official", "train.json", NLVR2_LINE.replace(b'"True"', b'"yes"')),
        "data/train.json:1: label 'yes' is not",
    ),
    Row(
        "vqa-questions-not-utf8",
        data_case("vqa", QUESTIONS, b'{"questions": "\xe9"}', "vqa"),
        f"{QUESTIONS}:1: not UTF-8 text",
    ),
    Row(
        "vqa-questions-a-list",
        data_case("vqa", QUESTIONS, b"[]", "vqa"),
        f"{QUESTIONS}: ",
    ),
    Row(
        "vqa-answer-vocab-not-utf8",
        data_case(
            "vqa", "ans2label.json", b'{"\xe9": 0}', "vqa", "--answer-vocab", "data/ans2label.json"
        ),
        "data/ans2label.json:1: not UTF-8 text",
    ),
    Row(
        "lxmert-json-not-utf8",
        data_case("lxmert", "nlvr2/train.json", b'[{"sent": "\xe9"}]'),
        "data/nlvr2/train.json:1: not UTF-8 text",
    ),
    Row(
        "lxmert-tsv-empty",
        data_case("lxmert", "nlvr2_imgfeat/train_obj36.tsv", b""),
        "data/nlvr2/train.json: [0]: image train-0-0-img0 is missing",
    ),
    Row(
        "lxmert-tsv-nan",
        data_case("lxmert", "nlvr2_imgfeat/train_obj36.tsv", tsv_nan),
        "train_obj36.tsv:1: image 'train-0-0-img0': features or boxes hold NaN or infinite",
    ),
    Row(
        "vilt-arrow-empty",
        data_case("vilt", "nlvr2_train.arrow", b""),
        "data/nlvr2_train.arrow: ",
    ),
    Row(
        "refcoco-refs-pickle-empty",
        data_case("refcoco", "refcoco+/refs(unc).p", b"", "refcoco+"),
        "data/refcoco+/refs(unc).p: empty file (0 bytes)",
    ),
    Row(
        "refcoco-instances-not-utf8",
        data_case("refcoco", "refcoco+/instances.json", b'{"images": "\xe9"}', "refcoco+"),
        "data/refcoco+/instances.json:1: not UTF-8 text",
    ),
    # Checkpoints (--checkpoint).
    Row("ckpt-missing", checkpoint_case(lambda p, s: None), "theta0.pt: no such checkpoint file"),
    Row(
        "ckpt-empty",
        checkpoint_case(lambda p, s: p.write_bytes(b"")),
        "theta0.pt: empty file (0 bytes); expected a .safetensors file or a torch checkpoint",
    ),
    Row(
        "ckpt-a-folder",
        checkpoint_case(folder, "theta0"),
        "theta0: a folder; UNITER's weights are one file",
    ),
    Row(
        "ckpt-a-text-file",
        checkpoint_case(lambda p, s: p.write_text("the weights are on the other disk\n")),
        "theta0.pt: not a safetensors file or torch checkpoint (it starts b'the weights are ')",
    ),
    Row(
        "ckpt-pickle-that-runs-code",
        checkpoint_case(lambda p, s: p.write_bytes(pickle.dumps(RunsCode(), protocol=2))),
        "theta0.pt: refused: the pickle names posix.system, which is no tensor or container",
    ),
    Row(
        "ckpt-truncated-safetensors",
        checkpoint_case(
            lambda p, s: p.write_bytes(s.uniter.read_bytes()[:5000]), "theta0.safetensors"
        ),
        "theta0.safetensors: cannot read checkpoint",
    ),
    Row(
        "ckpt-embeddings-only",
        state_case(lambda s: {k: v for k, v in s.items() if k.startswith("embeddings.")}),
        "theta0.pt: no uniter.encoder.layer.* keys",
    ),
    Row(
        "ckpt-no-position-embeddings",
        state_case(lambda s: {k: v for k, v in s.items() if "position_embeddings" not in k}),
        "theta0.pt: uniter.embeddings.position_embeddings.weight is missing",
    ),
    Row(
        "ckpt-1d-word-embedding",
        state_case(lambda s: s | {WORDS: s[WORDS][0]}),
        "theta0.pt: uniter.embeddings.word_embeddings.weight is of shape (128,)",
    ),
    Row(
        "lxmert-ckpt-folder-without-config",
        lambda tmp, src: [*checkpoint_case(folder, "theta0")(tmp, src), "--model", "lxmert"],
        "theta0: a folder without config.json; expected a save_pretrained folder",
    ),
    Row(
        "lxmert-ckpt-embeddings-only",
        state_case(lambda s: {k: v for k, v in s.items() if k.startswith("embeddings.")}, "lxmert"),
        "theta0.pt: no encoder.visn_fc.visn_fc.weight: not a checkpoint of LXMERT",
    ),
    Row(
        "lxmert-ckpt-no-position-embeddings",
        state_case(lambda s: {k: v for k, v in s.items() if "position_emb" not in k}, "lxmert"),
        "theta0.pt: no embeddings.position_embeddings.weight: not a checkpoint of LXMERT",
    ),
    Row(
        "lxmert-ckpt-1d-word-embedding",
        state_case(lambda s: s | {WORDS: s[WORDS][0]}, "lxmert"),
        "theta0.pt: embeddings.word_embeddings.weight has shape (128,), expected 2 dimensions",
    ),
    Row(
        "vilt-ckpt-1d-position-grid",
        state_case(lambda s: s | {GRID: s[GRID].flatten()}, "vilt"),
        f"theta0.pt: {GRID} has shape (",
    ),
    Row(
        "vilt-ckpt-no-patch-projection",
        state_case(lambda s: {k: v for k, v in s.items() if "patch_embeddings" not in k}, "vilt"),
        "theta0.pt: no embeddings.patch_embeddings.projection.weight: not a checkpoint of ViLT",
    ),
    # Tickets.
    Row(
        "ticket-metadata-nested-deep",
        ticket_case(lambda t, m: (t, m | {"history": "[" * 100_000 + "]" * 100_000})),
        "ticket.safetensors: metadata 'history' is nested too deeply",
    ),
    Row(
        "ticket-shape-against-shapes",
        ticket_case(lambda t, m: (t | {QUERY: torch.ones(64, 256, dtype=torch.bool)}, m)),
        f"ticket.safetensors: tensor {QUERY!r} has shape (64, 256), expected (128, 128)",
    ),
    Row(
        "ticket-extra-tensor",
        ticket_case(lambda t, m: (t | {"extra.weight": t[QUERY].clone()}, m)),
        "ticket.safetensors: tensor 'extra.weight' has no shape in the metadata",
    ),
    Row(
        "ticket-missing-tensor",
        ticket_case(lambda t, m: ({k: v for k, v in t.items() if k != QUERY}, m)),
        f"ticket.safetensors: tensor {QUERY!r} is listed but not stored",
    ),
    Row(
        "ticket-bool-in-shapes",
        ticket_case(lambda t, m: (t, m | {"shapes": m["shapes"].replace("[128", "[true", 1)})),
        "has a bad shape [True, 128]",
    ),
    Row(
        "ticket-a-checkpoint",
        lambda tmp, src: ["inspect", str(src.uniter)],
        "uniter.safetensors: not a ticket (its metadata lacks format=vl_prune.ticket/1)",
    ),
    Row(
        "ticket-truncated",
        file_case("t.safetensors", b"\x08" + b"\0" * 7 + b'{"a":', "inspect", "t.safetensors"),
        "t.safetensors: not a readable safetensors ticket",
    ),
    Row(
        "ticket-empty",
        file_case("t.safetensors", b"", "inspect", "t.safetensors"),
        "t.safetensors: not a readable safetensors ticket",
    ),
    Row(
        "ticket-a-folder",
        file_case("t", lambda p: p.mkdir(), "inspect", "t"),
        "t: a folder; expected a ticket file (.safetensors)",
    ),
    Row(
        "compare-other-tensors",
        compare_with_the_valid_ticket,
        f"tickets cover different tensors (e.g. {QUERY!r})",
    ),
    Row(
        "evaluate-ticket-of-another-backbone",
        ticket_of_another_backbone,
        "the ticket was found on lxmert, not uniter",
    ),
    # Run reports (plot).
    Row(
        "plot-not-a-report",
        file_case("r.json", b'{"rounds": []}', "plot", "r.json"),
        "r.json: 'backbone' should be a str, found missing",
    ),
    Row(
        "plot-a-round-without-score",
        file_case("r.json", json.dumps(REPORT).encode(), "plot", "r.json"),
        "r.json: rounds[0]: 'score' should be a number, found missing",
    ),
    Row(
        "plot-a-list",
        file_case("r.json", b"[1, 2]", "plot", "r.json"),
        "r.json: not a run report",
    ),
    Row(
        "plot-not-utf8",
        file_case("r.json", b'{"task": "\xe9"}', "plot", "r.json"),
        "r.json:1: not UTF-8 text",
    ),
    Row("plot-no-run-folder", lambda tmp, src: ["plot", "runs/x"], "runs/x: no report.json"),
    # Names, flags and usage.
    Row("unknown-task", data_case("official", None, None, "nlvr3"), "nlvr3"),
    Row(
        "unknown-model",
        data_case("official", None, None, "nlvr2", "--model", "unitr"),
        "unitr",
    ),
    Row(
        "unknown-method",
        data_case("official", None, None, "nlvr2", "--method", "imq"),
        "imq",
    ),
    Row(
        "negative-steps",
        data_case("official", None, None, "nlvr2", "--steps", "-3"),
        "--steps",
    ),
    Row(
        "unknown-option",
        lambda tmp, src: ["find", "--task", "nlvr2", "--stpes", "3"],
        "No such option '--stpes'",
    ),
    Row(
        "bad-choice",
        lambda tmp, src: ["find", "--task", "nlvr2", "--schedule", "cubic"],
        "'--schedule': 'cubic' is not one of 'linear', 'geometric' (see `vlprune find -h`)",
    ),
    Row(
        "missing-option",
        lambda tmp, src: ["find"],
        "Missing option '--task' (see `vlprune find -h`)",
    ),
    Row("unknown-command", lambda tmp, src: ["fnd"], "No such command 'fnd'"),
    Row(
        "answer-vocab-for-nlvr2",
        data_case("official", None, None, "nlvr2", "--answer-vocab", "ans2label.json"),
        "--answer-vocab: Nlvr2 chooses among no answers; drop the flag",
    ),
    Row(
        "find-out-a-folder",
        data_case("official", None, None, "nlvr2", "--out", "data"),
        "--out data: is a folder",
    ),
    Row(
        "find-out-in-a-missing-folder",
        data_case("official", None, None, "nlvr2", "--out", "nowhere/t.safetensors"),
        "--out nowhere/t.safetensors: folder nowhere does not exist",
    ),
    Row(
        "find-runs-a-file",
        data_case("official", "train.json", lambda p: None, "nlvr2", "--runs", "data/train.json"),
        "--runs data/train.json: is a file, not a folder",
    ),
    Row("find-keep-zero", lambda tmp, src: ["find", "--task", "nlvr2", "--keep", "0"], "--keep"),
    Row(
        "find-sparsity-above-one",
        lambda tmp, src: ["find", "--task", "nlvr2", "--sparsity", "1.5"],
        "'--sparsity': 1.5 is not in the range 0<x<1",
    ),
    Row(
        "find-checkpoint-every-zero",
        lambda tmp, src: ["find", "--task", "nlvr2", "--checkpoint-every", "0"],
        "--checkpoint-every",
    ),
    Row(
        "find-rewind-step-past-the-end",
        data_case("official", None, None, "nlvr2", "--method", "rewind", "--rewind-step", "9"),
        "--rewind-step must be between 1 and --steps - 1 (0), not 9",
    ),
    Row(
        "find-tokenizer-without-checkpoint",
        lambda tmp, src: ["find", "--task", "nlvr2", "--tokenizer", "vocab.txt"],
        "--tokenizer goes with --checkpoint",
    ),
    Row(
        "find-split-without-data",
        lambda tmp, src: ["find", "--task", "nlvr2", "--train-split", "train"],
        "--train-split describes --data",
    ),
    Row(
        "transfer-out-a-file",
        file_case(
            "out",
            b"",
            "transfer",
            "--ticket",
            "ticket.safetensors",
            "--task",
            "nlvr2",
            "--out",
            "out",
        ),
        "--out out: is a file, not a folder",
    ),
    Row(
        "evaluate-merge-in-a-missing-folder",
        lambda tmp, src: [
            *("evaluate", "--ticket", str(src.ticket), "--task", "nlvr2", "--lora", "4"),
            *("--merge", "nowhere/merged.safetensors"),
        ],
        "--merge nowhere/merged.safetensors: folder nowhere does not exist",
    ),
    # Resuming a run folder: nothing in it is unpickled, damage is named.
    Row(
        "resume-a-pickle-in-the-save",
        resume_case(
            lambda save: (save / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(RunsCode()))
        ),
        "custom_checkpoint_0.pkl: not part of a vl_prune training state",
    ),
    Row(
        "resume-a-pickle-as-random-states",
        resume_case(
            lambda save: (save / "rng_0.safetensors").write_bytes(pickle.dumps(RunsCode()))
        ),
        "damaged training state",
    ),
    Row(
        "resume-truncated-weights",
        resume_case(lambda save: truncate(save / "model.safetensors")),
        "damaged training state",
    ),
    Row(
        "resume-training-json-not-json",
        resume_case(lambda save: (save / "training.json").write_text("{")),
        "damaged training state",
    ),
    Row(
        "resume-saved-by-another-job-size",
        resume_case(
            lambda save: shutil.copy(save / "rng_0.safetensors", save / "rng_1.safetensors")
        ),
        "saved by a job of 2 processes, not 1; resume with 2",
    ),
    Row(
        "resume-latest-names-a-missing-save",
        resume_case(shutil.rmtree),
        "latest names 'step_0000002', which is no save",
    ),
    Row(
        "resume-damaged-metrics",
        resume_case(
            lambda save: (save.parents[2] / "round_00" / "metrics.json").write_text('{"round": 0')
        ),
        "round_00/metrics.json: damaged",
    ),
    Row(
        "data-world-missing-option",
        lambda tmp, src: ["data", "world", "--task", "nlvr2"],
        "Missing option '--out' (see `vlprune data world -h`)",
    ),
    Row(
        "data-world-unknown-task",
        lambda tmp, src: ["data", "world", "--task", "nlvr3", "--out", "x"],
        "nlvr3",
    ),
]


def listing(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_is_refused_in_one_line(row: Row, sources: Sources, server: Server, tmp_path):
    argv = row.setup(tmp_path, sources)
    before = listing(tmp_path)
    result = server.run(argv, tmp_path, environment(tmp_path))
    shown = (
        f"vlprune {' '.join(argv)}\nrc={result.rc} after {result.seconds:.2f} s\n"
        f"{result.stderr}{result.stdout}"
    )
    assert "Traceback" not in result.stderr + result.stdout, shown
    assert result.rc == 2, shown
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlprune: error: "), shown
    assert row.message in lines[0], shown
    assert listing(tmp_path) == before, f"{shown}\nwrote {sorted(listing(tmp_path) - before)}"


def test_the_server_runs_what_the_console_script_runs(sources: Sources, server: Server, tmp_path):
    row = next(row for row in ROWS if row.id == "npz-norm-bb-n-by-4")
    argv = row.setup(tmp_path, sources)
    served = server.run(argv, tmp_path, environment(tmp_path))
    script = subprocess.run(
        ["vlprune", *argv], cwd=tmp_path, env=environment(tmp_path), capture_output=True, text=True
    )
    assert (script.returncode, script.stderr, script.stdout) == (
        served.rc,
        served.stderr,
        served.stdout,
    )


def test_inspect_json_says_what_is_wrong(sources: Sources, server: Server, tmp_path):
    row = next(row for row in ROWS if row.id == "ticket-extra-tensor")
    argv = [*row.setup(tmp_path, sources), "--json"]
    result = server.run(argv, tmp_path, environment(tmp_path))
    assert result.rc == 2
    assert json.loads(result.stdout) == {
        "path": "ticket.safetensors",
        "valid": False,
        "problems": [result.stderr.strip().removeprefix("vlprune: error: ")],
    }
    valid = server.run(["inspect", str(sources.ticket), "--json"], tmp_path, environment(tmp_path))
    assert valid.rc == 0 and json.loads(valid.stdout)["valid"] is True


@pytest.mark.parametrize("debug", [False, True])
def test_an_eof_error_is_no_abort(monkeypatch, tmp_path, debug):
    """click takes an EOFError for the end of stdin and prints "Aborted!", even under --debug;
    here it is a file that ended early."""
    from vl_prune.ticket import Ticket
    from vl_prune_cli.main import cli

    def ended(path):
        raise EOFError("Ran out of input")

    monkeypatch.setattr(Ticket, "load", ended)
    result = CliRunner().invoke(cli, [*(["--debug"] if debug else []), "inspect", "t"])
    assert result.exit_code == 2
    assert "Aborted" not in result.output
    assert result.stderr.splitlines()[-1] == (
        "vlprune: error: a file ended early (EOFError: Ran out of input); --debug shows which"
    )
    assert ("Traceback" in result.stderr) == debug


def test_an_interrupt_is_one_line_and_exit_code_130(monkeypatch):
    from vl_prune.ticket import Ticket
    from vl_prune_cli.main import cli

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(Ticket, "load", interrupted)
    result = CliRunner().invoke(cli, ["inspect", "t"])
    assert (result.exit_code, result.stderr) == (130, "vlprune: interrupted\n")


def test_ctrl_c_during_find_says_the_run_resumes(sources: Sources, tmp_path):
    """A real SIGINT while `find` trains."""
    shutil.copytree(sources.official, tmp_path / "data")
    argv = ["vlprune", *find("nlvr2", sources.uniter), "--steps", "100000"]
    process = subprocess.Popen(
        argv, cwd=tmp_path, env=environment(tmp_path), stderr=subprocess.PIPE, text=True
    )
    for line in process.stderr:
        if line.startswith("run folder:"):  # θ0 is built: training starts
            break
    else:
        pytest.fail(f"find ended before training: {process.wait()}")
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=60)
    assert process.returncode == 130, rest
    assert rest.splitlines()[-1] == (
        "vlprune: interrupted; run the same command again to resume "
        "(finished rounds and checkpoints are kept)"
    )
    assert "Traceback" not in rest and "Aborted" not in rest


if __name__ == "__main__":
    serve()
