"""The data pipeline against its anchor, the training step it feeds: can the loader keep up?

Writes an NLVR2 data set in UNITER's released layout at base shapes (a txt_db of `--pairs`
sentence/image-pair examples; an img_db, msgpack values as UNITER's default, of 2048-d region
features, 36 to 100 regions an image as UNITER's conf > 0.2 rule leaves them), then measures:

1. examples per second the loader delivers (`vl_prune.data.loader.batches`: LMDB reads,
   decoding, collation into NLVR2 batches of UNITER-base's inputs) with 0, 2 and 4 workers,
   over one epoch after its first batch (which waits for the workers to start);
2. one UNITER-base training step (forward, backward, AdamW) on a batch of the same size.

The ratio says how many steps' worth of batches the loader prepares in a step's time: at least
1 with workers is the target. On a GPU the step is far shorter: run it there (Accelerate's
device is used when present).

    python benchmarks/bench_data.py                  # about 5 minutes on 2 CPU cores
    python benchmarks/bench_data.py --pairs 128 --layers 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import lmdb
import lz4.frame
import msgpack
import numpy as np
import torch

from vl_prune.data.loader import batches
from vl_prune.task import VLModel
from vl_prune_plugins.backbones.uniter import Uniter
from vl_prune_plugins.tasks.nlvr2 import Nlvr2, PairedHead

IMG_DIM, WORDS = 2048, (106, 28996)
REGIONS = (36, 100)
DB = "feat_th0.2_max100_min10"


def _array(array: np.ndarray) -> dict:
    """An array as msgpack-numpy encodes it (what UNITER's img_db values hold)."""
    return {
        b"nd": True,
        b"type": array.dtype.str,
        b"kind": b"",
        b"shape": list(array.shape),
        b"data": array.tobytes(),
    }


def write_release(root: Path, pairs: int) -> None:
    """txt_db/nlvr2_train.db and img_db/nlvr2_train/ with `pairs` examples at base shapes."""
    rng = np.random.default_rng(0)
    images, counts = {}, {}
    for pair in range(pairs):
        for side in (0, 1):
            key = f"nlvr2_train-{pair}-0-img{side}.npz"
            n = int(rng.integers(*REGIONS, endpoint=True))
            xy = rng.uniform(0, 0.6, (n, 2))
            wh = rng.uniform(0.05, 0.4, (n, 2))
            value = {
                "norm_bb": _array(np.concatenate([xy, xy + wh, wh], 1).astype(np.float16)),
                "features": _array(rng.gamma(0.6, 1.0, (n, IMG_DIM)).astype(np.float16)),
                "conf": _array(np.linspace(0.99, 0.21, n, dtype=np.float16)[:, None]),
            }
            images[key], counts[key] = msgpack.packb(value, use_bin_type=True), n
    split = root / "img_db" / "nlvr2_train"
    split.mkdir(parents=True)
    (split / "nbb_th0.2_max100_min10.json").write_text(json.dumps(counts))
    _write_lmdb(split / DB, images)
    examples, lengths, txt2img = {}, {}, {}
    for pair in range(pairs):
        key = f"train-{pair}-0-0"
        ids = rng.integers(*WORDS, size=int(rng.integers(8, 30))).tolist()
        fnames = [f"nlvr2_train-{pair}-0-img{side}.npz" for side in (0, 1)]
        record = {"identifier": key, "input_ids": ids, "img_fname": fnames, "target": pair % 2}
        examples[key] = lz4.frame.compress(msgpack.packb(record, use_bin_type=True))
        lengths[key], txt2img[key] = len(ids), fnames
    db = root / "txt_db" / "nlvr2_train.db"
    _write_lmdb(db, examples)
    meta = {"CLS": 101, "SEP": 102, "MASK": 103, "UNK": 100, "v_range": list(WORDS)}
    for name, content in (("meta", meta), ("id2len", lengths), ("txt2img", txt2img)):
        (db / f"{name}.json").write_text(json.dumps(content))


def _write_lmdb(path: Path, values: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 36)
    with env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(key.encode(), value)
    env.close()


def loader_rate(task: Nlvr2, backbone: Uniter, size: int, workers: int) -> float:
    """Examples per second over one epoch after its first batch, which waits for the workers
    to start (they start once a run)."""
    examples = task.examples("train")
    loader, _ = batches(examples, partial(task.collate, backbone=backbone), size, 0, True, workers)
    stream = iter(loader)
    next(stream)
    started, seen = time.perf_counter(), 0
    for batch in stream:
        seen += len(batch.targets)
    return seen / (time.perf_counter() - started)


def step_seconds(task: Nlvr2, backbone: Uniter, size: int, repeats: int, device: str) -> float:
    """The median time of a UNITER-base training step on a batch the loader made."""
    model = VLModel(backbone, PairedHead(backbone.hidden_size)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    batch = task.collate(task.examples("train")[:size], backbone).to(device)
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        task.loss(model(batch), batch.targets).backward()
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1024, help="NLVR2 examples written")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per batch")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--layers", type=int, default=12, help="UNITER-base layers in the step")
    parser.add_argument("--repeats", type=int, default=3, help="measured training steps")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        started = time.perf_counter()
        write_release(root, args.pairs)
        print(f"wrote {args.pairs} pairs at base shapes in {time.perf_counter() - started:.0f} s")
        torch.manual_seed(0)
        backbone = Uniter("base", num_hidden_layers=args.layers, type_vocab_size=3)
        task = Nlvr2(root)
        rates = {w: loader_rate(task, backbone, args.batch_size, w) for w in args.workers}
        step = step_seconds(task, backbone, args.batch_size, args.repeats, device)
    print(
        f"UNITER-base training step ({args.layers} layers, {args.batch_size} pairs, {device}): "
        f"{step:.3f} s, {args.batch_size / step:.1f} pairs/s"
    )
    print("workers  pairs/s  batch load s  load / step")
    for workers, rate in rates.items():
        load = args.batch_size / rate
        print(f"{workers:7d}  {rate:7.1f}  {load:12.3f}  {load / step:11.3f}")


if __name__ == "__main__":
    main()
