"""File sizes of `vlprune export` for UNITER-base against the dense model's file.

A randomly initialised UNITER-base backbone (sizes depend on shapes and counts, not values)
pruned with IMP (global magnitude) at 50/70/90%, exported plain and compressed in fp32, fp16
and bf16; and structured tickets at 30/50/70% of heads and neurons, shrunk. The anchor is the
dense backbone as a plain fp32 safetensors file. Run:

    python benchmarks/bench_export.py            # about a minute on 2 cores
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from vl_prune.export import export
from vl_prune.pruning import GlobalMagnitude, prune_to
from vl_prune.pruning.structured import StructuredMagnitude, block_weights
from vl_prune_plugins.backbones.uniter import Uniter


def size(backbone: Uniter, folder: Path, layout: str, dtype: str = "float32") -> int:
    path = folder / f"{layout}-{dtype}.safetensors"
    export(backbone, "uniter", path, layout, dtype)
    return path.stat().st_size


def row(ticket: str, layout: str, found: int, anchor: int) -> None:
    print(f"{ticket:<22} {layout:<18} {found / 1e6:7.1f} {found / anchor:8.3f}")


def main() -> None:
    torch.manual_seed(0)
    dense = Uniter("base").requires_grad_(False)
    prunable = sum(module.weight.numel() for module, _ in dense.prunable())
    total = sum(p.numel() for p in dense.parameters())
    print(f"UNITER-base backbone: {total / 1e6:.1f} M weights, {prunable / 1e6:.1f} M prunable")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        anchor = size(dense, folder, "plain")
        print(f"dense, plain fp32: {anchor / 1e6:.1f} MB (the anchor)\n")
        print(f"{'ticket':<22} {'export':<18} {'MB':>7} {'× dense':>8}")
        for amount in (0.5, 0.7, 0.9):
            pruned = copy.deepcopy(dense)
            GlobalMagnitude.prune_group(pruned.prunable(), amount)
            for layout, dtype in (
                ("plain", "float32"),
                ("compressed", "float32"),
                ("compressed", "float16"),
                ("compressed", "bfloat16"),
            ):
                found = size(pruned, folder, layout, dtype)
                row(f"IMP {amount:.0%}", f"{layout} {dtype}", found, anchor)
        for fraction in (0.3, 0.5, 0.7):
            pruned = copy.deepcopy(dense)
            structure = pruned.structure()
            in_blocks = block_weights(structure)
            target = round(fraction * in_blocks)
            prune_to(pruned.prunable(), StructuredMagnitude, target, structure=structure)
            for dtype in ("float32", "float16"):
                found = size(pruned, folder, "shrunk", dtype)
                row(f"structured {fraction:.0%}", f"shrunk {dtype}", found, anchor)


if __name__ == "__main__":
    main()
