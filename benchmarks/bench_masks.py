"""Masks and tickets against their anchors, on BERT-base-shaped weights (≈ 85.5 M prunable).

Anchors: torch's `prune.global_unstructured(..., L1Unstructured)` for global magnitude pruning,
torch's float masks for memory, and BERT-Tickets' `torch.save` of a float mask dict for the
ticket file. Every figure is printed with its ratio against the anchor. Run:

    python benchmarks/bench_masks.py            # full size, about two minutes on 2 cores
    python benchmarks/bench_masks.py --layers 2 # a quick look
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

from vl_prune import Ticket
from vl_prune.pruning import GlobalMagnitude
from vl_prune.ticket import fingerprint, named_parameters

HIDDEN, INTERMEDIATE = 768, 3072


def bert_base_shaped(layers: int, seed: int = 0) -> nn.ModuleDict:
    """q, k, v, attention-out, intermediate and output matrices per layer, plus the pooler."""
    torch.manual_seed(seed)

    def linear(n_in: int, n_out: int) -> nn.Linear:
        return nn.Linear(n_in, n_out, bias=False)

    blocks = nn.ModuleList(
        nn.ModuleDict(
            {
                "query": linear(HIDDEN, HIDDEN),
                "key": linear(HIDDEN, HIDDEN),
                "value": linear(HIDDEN, HIDDEN),
                "attention_out": linear(HIDDEN, HIDDEN),
                "intermediate": linear(HIDDEN, INTERMEDIATE),
                "output": linear(INTERMEDIATE, HIDDEN),
            }
        )
        for _ in range(layers)
    )
    return nn.ModuleDict({"layer": blocks, "pooler": linear(HIDDEN, HIDDEN)})


def parameters(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _prune(which: str, layers: int, amount: float) -> tuple[float, int]:
    """Prune once in a fresh process: (seconds, peak bytes above the weights themselves)."""
    model = bert_base_shaped(layers)
    params = parameters(model)
    before = _rss_bytes()
    start = time.perf_counter()
    if which == "torch":
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    else:
        GlobalMagnitude.prune_group(params, amount)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return seconds, peak - before


def _in_fresh_process(which: str, layers: int, amount: float) -> tuple[float, int]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_prune, (which, layers, amount))


def _warm_times(layers: int, amount: float, repeats: int) -> tuple[float, float]:
    """Median seconds of ours and torch's, after one untimed run has warmed the allocator."""

    def timed(prune_fn) -> float:
        params = parameters(bert_base_shaped(layers))
        start = time.perf_counter()
        prune_fn(params)
        return time.perf_counter() - start

    def ours(params):
        GlobalMagnitude.prune_group(params, amount)

    def anchor(params):
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)

    timed(ours)
    return statistics.median(timed(ours) for _ in range(repeats)), timed(anchor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours (median)")
    args = parser.parse_args()

    model = bert_base_shaped(args.layers)
    n = sum(m.weight.numel() for m, _ in parameters(model))
    print(
        f"BERT-base-shaped weights: {args.layers} layers, {n:,} prunable, {torch.get_num_threads()}"
        f" threads, amount {args.amount}"
    )

    cold_anchor_s, anchor_mem = _in_fresh_process("torch", args.layers, args.amount)
    cold = [_in_fresh_process("ours", args.layers, args.amount) for _ in range(args.repeats)]
    cold_s = statistics.median(s for s, _ in cold)
    ours_mem = statistics.median(m for _, m in cold)
    warm_s, warm_anchor_s = _warm_times(args.layers, args.amount, args.repeats)
    print("\nglobal magnitude pruning")
    print("  in a running process (warm memory, as in an IMP loop):")
    print(f"    torch global_unstructured  {warm_anchor_s:8.2f} s")
    print(
        f"    vl_prune GlobalMagnitude   {warm_s:8.2f} s   speed-up {warm_anchor_s / warm_s:.1f}x"
    )
    print("  in a fresh process (cold memory):")
    mib = 2**20
    print(
        f"    torch global_unstructured  {cold_anchor_s:8.2f} s   peak +{anchor_mem / mib:6.0f} MiB"
    )
    print(f"    vl_prune GlobalMagnitude   {cold_s:8.2f} s   peak +{ours_mem / mib:6.0f} MiB")
    print(
        f"    speed-up {cold_anchor_s / cold_s:.1f}x, peak memory ratio {ours_mem / anchor_mem:.2f}"
    )

    params = parameters(model)
    theta0 = dict(zip(named_parameters(model, params), (m.weight for m, _ in params), strict=True))
    found_from = fingerprint(theta0)
    dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    GlobalMagnitude.prune_group(params, args.amount)
    mask_bytes = sum(m.weight_mask.numel() * m.weight_mask.element_size() for m, _ in params)
    torch_mask_per_weight = torch.empty(0).element_size()
    pruned_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print("\nmask memory")
    print(
        f"  vl_prune {mask_bytes / n:.2f} byte/weight, torch float mask "
        f"{torch_mask_per_weight} byte/weight: ratio {mask_bytes / n / torch_mask_per_weight:.2f}"
    )
    print(
        f"  pruned state_dict / dense: vl_prune {pruned_bytes / dense_bytes:.2f}x, "
        f"torch {(dense_bytes + n * torch_mask_per_weight) / dense_bytes:.2f}x"
    )

    ticket = Ticket.from_model(model, params, weights_fingerprint=found_from)
    with tempfile.TemporaryDirectory() as tmp:
        path = ticket.save(Path(tmp) / "ticket.safetensors")
        ticket_bytes = path.stat().st_size
        float_masks = {name: mask.float() for name, mask in ticket.masks.items()}
        torch.save(float_masks, Path(tmp) / "mask.pt")
        anchor_bytes = (Path(tmp) / "mask.pt").stat().st_size
        del float_masks
        print("\nticket file")
        print(
            f"  vl_prune bundle {ticket_bytes / 1e6:8.2f} MB (n/8 = {n / 8e6:.2f} MB, "
            f"overhead {(ticket_bytes - n / 8) / 1024:.1f} KiB; target <= 64 KiB)"
        )
        print(
            f"  torch.save float masks {anchor_bytes / 1e6:8.2f} MB: "
            f"ratio {ticket_bytes / anchor_bytes:.4f} ({anchor_bytes / ticket_bytes:.0f}x smaller)"
        )

        times = []
        for _ in range(args.repeats):
            fresh = bert_base_shaped(args.layers)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                Ticket.load(path).apply(fresh)
            times.append(time.perf_counter() - start)
        print("\nticket load + apply (fingerprint checked)")
        print(f"  {statistics.median(times):.2f} s (target <= 1 s)")


if __name__ == "__main__":
    main()
