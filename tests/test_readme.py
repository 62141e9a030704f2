"""The README's commands and code blocks are what users copy: they must stay true."""

import re
from pathlib import Path

import torch
from torch import nn

from vl_prune import Ticket
from vl_prune.pruning import GlobalMagnitude

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
MARKER = "<!-- tests/test_readme.py runs this block -->"


def readme_blocks() -> list[str]:
    return re.findall(re.escape(MARKER) + r"\n```python\n(.*?)```", README, flags=re.S)


def test_ci_runs_exactly_the_readme_test_line():
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    test_line = next(c for c in commands if "pytest" in c)
    assert test_line in (ROOT / ".ci" / "run").read_text().splitlines()


def test_pruning_example_runs_and_reaches_90_percent():
    namespace: dict = {}
    exec(readme_blocks()[0], namespace)
    params = namespace["params"]
    pruned = sum(int((~m.weight_mask).sum()) for m, _ in params)
    total = sum(m.weight_mask.numel() for m, _ in params)
    assert pruned == round(0.9 * total)


def test_standalone_apply_snippet_reproduces_the_ticket(tmp_path):
    namespace: dict = {}
    exec(readme_blocks()[1], namespace)

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 3))

    source = build()
    params = [(source[0], "weight"), (source[2], "weight")]
    GlobalMagnitude.prune_group(params, 0.6)
    Ticket.from_model(source, params).save(tmp_path / "t.safetensors")

    target = build()
    namespace["apply_ticket"](target, str(tmp_path / "t.safetensors"))
    for index in (0, 2):
        assert torch.equal(target[index].weight_mask.bool(), source[index].weight_mask)
    x = torch.randn(5, 12)
    assert torch.allclose(target(x), source(x))
