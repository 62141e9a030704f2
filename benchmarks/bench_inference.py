"""Inference of UNITER-base-shaped tickets against the dense model: does a ticket run faster?

Rows, each a copy of one randomly initialised UNITER-base (12 layers, 768 wide, 36 regions of
2048-d features and 24 words an example), measured in one run, interleaved:

- dense;
- unstructured IMP at 70% and 90%, as zeros in dense weights (`prune.remove`), and the same
  weights as CSR sparse matrices (`torch.sparse.mm`);
- structured tickets (heads and neurons, `structured`) at 30/50/70% of heads and neurons,
  shrunk (`vl_prune.pruning.shrink`), with the largest difference from their masked form;
- on a CUDA device only: 2:4 (`nm`) in fp16 through `torch.sparse.to_sparse_semi_structured`,
  against dense fp16.

Latency is the median over repeats of one forward at batch 1 and batch 32 (no autograd);
throughput is examples a second. Every ratio is dense time / row time (above 1: faster).

    python benchmarks/bench_inference.py               # full size, about 2 minutes on 2 cores
    python benchmarks/bench_inference.py --layers 2 --repeats 3   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import prune

from vl_prune.backbone import VLBatch
from vl_prune.pruning import GlobalMagnitude, NMMagnitude, prune_to
from vl_prune.pruning.layout import pruned_parameters
from vl_prune.pruning.shrink import shrink
from vl_prune.pruning.structured import StructuredMagnitude, block_weights
from vl_prune_plugins.backbones.uniter import Uniter

WORDS, REGIONS = 24, 36


class CSRLinear(nn.Module):
    """A linear layer whose weight is a CSR sparse matrix: y = (W x^T)^T + b."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            self.register_buffer("weight", linear.weight.detach().to_sparse_csr())
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1)


def model(layers: int) -> Uniter:
    torch.manual_seed(0)
    return Uniter("base", num_hidden_layers=layers).eval().requires_grad_(False)


def batch(size: int, img_dim: int, device: str) -> VLBatch:
    generator = torch.Generator().manual_seed(size)
    ids = torch.randint(1000, 20000, (size, WORDS), generator=generator)
    return VLBatch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        region_feats=torch.rand(size, REGIONS, img_dim, generator=generator),
        region_boxes=torch.rand(size, REGIONS, 6, generator=generator),
    ).to(device)


def baked(pruned: Uniter) -> Uniter:
    for module, name in pruned_parameters(pruned):
        prune.remove(module, name)
    return pruned


def unstructured(dense: Uniter, amount: float) -> Uniter:
    pruned = copy.deepcopy(dense)
    GlobalMagnitude.prune_group(pruned.prunable(), amount)
    return baked(pruned)


def as_csr(zeros: Uniter) -> Uniter:
    sparse = copy.deepcopy(zeros)
    targets = {id(module) for module, _ in sparse.prunable()}
    for parent in list(sparse.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in targets:
                setattr(parent, name, CSRLinear(child))
    return sparse


def structured(dense: Uniter, fraction: float) -> tuple[Uniter, Uniter]:
    """The masked and the shrunk model with `fraction` of heads and of neurons cut."""
    masked = copy.deepcopy(dense)
    structure = masked.structure()
    in_blocks = block_weights(structure)
    prune_to(
        masked.prunable(), StructuredMagnitude, round(fraction * in_blocks), structure=structure
    )
    small = copy.deepcopy(masked)
    shrink(small.structure())
    return masked, small


def two_four(dense: Uniter) -> Uniter:
    from torch.sparse import to_sparse_semi_structured

    sparse = copy.deepcopy(dense)
    NMMagnitude.prune_group(sparse.prunable())
    for module, _ in baked(sparse).prunable():
        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight), requires_grad=False)
    return sparse


def median_seconds(rows: dict[str, nn.Module], inputs: VLBatch, repeats: int, sync: Callable):
    """Each row's median forward time, the rows interleaved so drift hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    with torch.inference_mode():
        for row in rows.values():  # warm-up: allocator, kernels, first-call paths
            row(inputs)
        for _ in range(repeats):
            for name, row in rows.items():
                sync()
                start = time.perf_counter()
                row(inputs)
                sync()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def max_difference(a: nn.Module, b: nn.Module, inputs: VLBatch) -> float:
    with torch.inference_mode():
        x, y = a(inputs), b(inputs)
    return max(
        float((p - q).abs().max())
        for p, q in ((x.text_states, y.text_states), (x.image_states, y.image_states))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="encoder layers (12: UNITER-base)")
    parser.add_argument(
        "--repeats", type=int, default=0, help="timed forwards a row [20 at batch 1, 5 at 32]"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"device: {name}; torch {torch.__version__}; UNITER-base shape, {args.layers} layers")
    dense = model(args.layers)
    rows: dict[str, nn.Module] = {"dense": dense}
    checks: dict[str, tuple[nn.Module, nn.Module]] = {}
    for amount in (0.7, 0.9):
        zeros = unstructured(dense, amount)
        rows[f"unstructured {amount:.0%}, zeros"] = zeros
        rows[f"unstructured {amount:.0%}, CSR"] = as_csr(zeros)
        checks[f"unstructured {amount:.0%}, CSR"] = (zeros, rows[f"unstructured {amount:.0%}, CSR"])
    for fraction in (0.3, 0.5, 0.7):
        masked, small = structured(dense, fraction)
        rows[f"structured {fraction:.0%}, shrunk"] = small
        checks[f"structured {fraction:.0%}, shrunk"] = (masked, small)
    sync: Callable[[], None] = lambda: None  # noqa: E731
    if device == "cuda":
        sync = torch.cuda.synchronize
        half = copy.deepcopy(dense).half()
        rows = {name: row.to(device) for name, row in rows.items()}
        rows["dense fp16"] = half.to(device)
        rows["2:4 fp16"] = two_four(half.to(device))

    img_dim = dense.img_dim
    probe = batch(2, img_dim, device)
    for name, (reference, row) in checks.items():
        difference = max_difference(reference.to(device), row.to(device), probe)
        print(f"{name}: max |difference| from its masked form {difference:.2e}")
    for size in args.batches:
        inputs = batch(size, img_dim, device)
        if device == "cuda":
            inputs_half = inputs.map(lambda t: t.half() if t.is_floating_point() else t)
        repeats = args.repeats or (20 if size == 1 else 5)
        fp32 = {k: v for k, v in rows.items() if "fp16" not in k}
        seconds = median_seconds(fp32, inputs, repeats, sync)
        if device == "cuda":
            half_rows = {k: v for k, v in rows.items() if "fp16" in k}
            seconds |= median_seconds(half_rows, inputs_half, repeats, sync)
        print(f"\nbatch {size} ({repeats} repeats, median)")
        print(f"  {'row':<28} {'ms':>9} {'examples/s':>11} {'× dense':>8}")
        for name, took in seconds.items():
            anchor = seconds["dense fp16" if "fp16" in name else "dense"]
            print(f"  {name:<28} {took * 1e3:9.1f} {size / took:11.1f} {anchor / took:8.2f}")


if __name__ == "__main__":
    main()
