"""Structured tickets: `structured` and `structured-layerwise` cut whole heads and neurons by L1
norm in torch's prune layout, `Backbone.structure` declares them for uniter, lxmert and vilt,
`shrink` removes them without changing any output, `fit_to` rebuilds a shrunk model, and a
`find --method structured` run gives whole-unit tickets.
"""

import copy
import itertools

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn.utils import prune

from vl_prune.backbone import VLBatch
from vl_prune.errors import VLPruneError
from vl_prune.experiment import FindSettings
from vl_prune.lottery import Lottery
from vl_prune.pruning import KeepMask, count_pruned, prune_to
from vl_prune.pruning.layout import alive_mask, stored_parameter
from vl_prune.pruning.schedules import geometric as geometric_schedule
from vl_prune.pruning.schedules import linear as linear_schedule
from vl_prune.pruning.shrink import fit_to, shrink
from vl_prune.pruning.structured import (
    HEADS,
    NEURONS,
    LayerwiseStructuredMagnitude,
    StructuredMagnitude,
    unit_scores,
)
from vl_prune.registry import load
from vl_prune.ticket import Ticket
from vl_prune.train import TrainSettings
from vl_prune_cli.main import cli
from vl_prune_plugins.backbones.lxmert import Lxmert
from vl_prune_plugins.backbones.uniter import Uniter
from vl_prune_plugins.backbones.vilt import Vilt

BACKBONES = {"uniter": Uniter, "lxmert": Lxmert, "vilt": Vilt}


def build(cls, seed: int = 0):
    torch.manual_seed(seed)
    return cls.build("tiny").eval()


def batch_for(backbone) -> VLBatch:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 20, (2, 7), generator=generator)
    attention = torch.ones(2, 7, dtype=torch.long)
    attention[1, 5:] = 0  # padding must stay padding in the shrunk model too
    if backbone.image_input == "regions":
        return VLBatch(
            ids,
            attention,
            region_feats=torch.randn(2, 5, backbone.img_dim, generator=generator),
            region_boxes=torch.rand(2, 5, 6, generator=generator),
        )
    return VLBatch(
        ids,
        attention,
        pixel_values=torch.randn(2, 3, 64, 64, generator=generator),
        pixel_mask=torch.ones(2, 64, 64, dtype=torch.long),
    )


def outputs(backbone, batch: VLBatch) -> list[torch.Tensor]:
    torch.manual_seed(1)  # ViLT samples its patches at random on every call
    with torch.no_grad():
        out = backbone(batch)
    return [out.text_states, out.image_states, out.pooled]


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def mask_of(linear: nn.Linear) -> torch.Tensor:
    mask = alive_mask(linear, "weight")
    return torch.ones(linear.weight.shape, dtype=torch.bool) if mask is None else mask


def kept(parts, units: int, width: int, masks=mask_of) -> list[bool]:
    """Which units are kept, after checking that every part keeps or cuts each unit whole and
    that all parts agree. Sliced unit by unit, independently of the library's reshapes."""
    states = []
    for linear, dim in parts:
        mask = masks(linear)
        assert mask.shape[dim] == units * width, (linear, mask.shape)
        state = []
        for unit in range(units):
            piece = mask.narrow(dim, unit * width, width)
            assert bool(piece.all()) or not bool(piece.any()), f"unit {unit} of {linear} is cut"
            state.append(bool(piece.all()))
        states.append(state)
    assert all(state == states[0] for state in states), "the parts cut different units"
    return states[0]


def block_kept(block, masks=mask_of) -> list[bool]:
    return kept(block.parts, block.units, block.width, masks)


def in_blocks(structure) -> int:
    return sum(linear.weight.numel() for block in structure for linear, _ in block.parts)


def scale_unit(block, unit: int, factor: float) -> None:
    """Multiply one unit's weights in every part (rows or columns) by `factor`."""
    with torch.no_grad():
        for linear, dim in block.parts:
            linear.weight.narrow(dim, unit * block.width, block.width).mul_(factor)


def total_of(parameters) -> int:
    return sum(module.weight.numel() for module, _ in parameters)


def test_structured_cuts_are_whole_heads_and_neurons_in_torch_layout():
    backbone = build(Uniter)
    structure = backbone.structure()
    parameters = backbone.prunable()
    prune_to(parameters, StructuredMagnitude, total_of(parameters) // 2, structure=structure)

    # Checked against the layers' own modules, so a structure() that misdeclares one fails.
    layers = list(backbone.encoder.layer)
    assert len(structure) == 2 * len(layers)
    cut_heads = cut_neurons = 0
    pairs = zip(structure[::2], structure[1::2], strict=True)
    for layer, (attention, ffn) in zip(layers, pairs, strict=True):
        own = layer.attention.self
        parts = [(own.query, 0), (own.key, 0), (own.value, 0), (layer.attention.output.dense, 1)]
        assert [(id(m), d) for m, d in attention.parts] == [(id(m), d) for m, d in parts]
        width = own.query.weight.shape[0] // own.num_attention_heads
        cut_heads += kept(parts, own.num_attention_heads, width).count(False)
        ffn_parts = [(layer.intermediate.dense, 0), (layer.output.dense, 1)]
        assert [(id(m), d) for m, d in ffn.parts] == [(id(m), d) for m, d in ffn_parts]
        cut_neurons += kept(ffn_parts, layer.intermediate.dense.weight.shape[0], 1).count(False)
    assert cut_heads > 0 and cut_neurons > 0

    pooler = backbone.pooler.dense
    assert bool(mask_of(pooler).all()), "the pooler belongs to no block and must never be cut"

    for block in structure:
        for linear, _ in block.parts:
            assert prune.is_pruned(linear)
            assert "weight_orig" in dict(linear.named_parameters())
            assert linear.weight_mask.dtype == torch.bool
            mask, orig = linear.weight_mask.clone(), linear.weight_orig.detach().clone()
            prune.remove(linear, "weight")
            assert isinstance(linear.weight, nn.Parameter)
            assert torch.equal(linear.weight.detach(), torch.where(mask, orig, 0.0))


def test_the_registry_names_both_methods():
    assert load("methods", "structured") is StructuredMagnitude
    assert load("methods", "structured-layerwise") is LayerwiseStructuredMagnitude


def test_unit_scores_are_l1_norms_with_pruned_weights_as_zero():
    backbone = build(Uniter)
    block = backbone.structure()[0]
    query = block.parts[0][0]
    keep = torch.ones_like(query.weight, dtype=torch.bool)
    keep[3, 5] = False  # a weight of head 0 pruned by an earlier, unstructured round
    KeepMask.apply(query, "weight", importance_scores=keep)
    width = block.width
    expected = []
    for head in range(block.units):
        rows = slice(head * width, (head + 1) * width)
        total = 0.0
        for linear, dim in block.parts:
            weight = torch.where(mask_of(linear), stored_parameter(linear, "weight").detach(), 0)
            piece = weight[rows] if dim == 0 else weight[:, rows]
            total += float(piece.double().abs().sum())
        expected.append(total)
    assert torch.allclose(unit_scores(block), torch.tensor(expected, dtype=torch.float64))


def test_global_selection_cuts_the_units_with_the_lowest_l1_norm_first():
    backbone = build(Uniter)
    structure = backbone.structure()
    attention = [b for b in structure if b.kind == HEADS]
    ffn = [b for b in structure if b.kind == NEURONS]
    heads_total = sum(b.units for b in attention)
    neurons_total = sum(b.units for b in ffn)
    # An eighth of each kind, spread over the layers: one cut of an eighth takes exactly them.
    weak_heads = {(1, 2), (3, 0)}
    assert len(weak_heads) * 8 == heads_total
    pairs = [(i, j) for i, b in enumerate(ffn) for j in range(b.units)]
    chosen = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(3))
    weak_neurons = {pairs[k] for k in chosen[: neurons_total // 8].tolist()}
    for i, j in weak_heads:
        scale_unit(attention[i], j, 1e-3)
    for i, j in weak_neurons:
        scale_unit(ffn[i], j, 1e-3)

    prune_to(
        backbone.prunable(), StructuredMagnitude, in_blocks(structure) // 8, structure=structure
    )

    cut_heads = {
        (i, j) for i, b in enumerate(attention) for j, k in enumerate(block_kept(b)) if not k
    }
    cut_neurons = {(i, j) for i, b in enumerate(ffn) for j, k in enumerate(block_kept(b)) if not k}
    assert cut_heads == weak_heads
    assert cut_neurons == weak_neurons


def test_equal_scores_keep_the_earlier_unit():
    backbone = build(Uniter)
    structure = backbone.structure()
    block = structure[0]
    for head in (1, 3):
        scale_unit(block, head, 0.0)  # two heads with the same L1 norm, 0
    heads_total = sum(b.units for b in structure if b.kind == HEADS)
    # A sixteenth of the block weights: one head of the sixteen.
    prune_to(
        backbone.prunable(),
        StructuredMagnitude,
        in_blocks(structure) // heads_total,
        structure=structure,
    )
    state = block_kept(block)
    assert state.count(False) == 1
    assert state[1] and not state[3], (
        "StructuredMagnitude.kept_units documents 'ties: the earlier unit stays', but of two "
        f"heads with equal L1 norm it cut the earlier one (kept: {state})"
    )


def test_layerwise_cuts_the_same_number_in_every_block():
    backbone = build(Uniter)
    structure = backbone.structure()
    # Layer 0 made weak: a global cut of a quarter would take all of it, layerwise must not.
    for block in structure[:2]:
        for unit in range(block.units):
            scale_unit(block, unit, 1e-3)
    global_copy = copy.deepcopy(backbone)
    target = in_blocks(structure) // 4

    prune_to(backbone.prunable(), LayerwiseStructuredMagnitude, target, structure=structure)
    for kind in (HEADS, NEURONS):
        blocks = [b for b in structure if b.kind == kind]
        cuts = [block_kept(b).count(False) for b in blocks]
        assert cuts == [blocks[0].units // 4] * len(blocks), (kind, cuts)

    global_structure = global_copy.structure()
    prune_to(global_copy.prunable(), StructuredMagnitude, target, structure=global_structure)
    assert [block_kept(b).count(False) for b in global_structure] == [
        b.units if i < 2 else 0 for i, b in enumerate(global_structure)
    ]


@pytest.mark.parametrize("name", ["uniter", "lxmert"])
def test_rounds_only_add_cuts_and_land_within_a_unit_of_the_schedule(name):
    backbone = build(BACKBONES[name])
    parameters = backbone.prunable()
    structure = backbone.structure()
    attention = next(b for b in structure if b.kind == HEADS)
    one_head = 4 * backbone.hidden_size * attention.width
    one_neuron = 2 * backbone.hidden_size
    generator = torch.Generator().manual_seed(5)
    before = [block_kept(b) for b in structure]
    for target in linear_schedule(total_of(parameters)):
        prune_to(parameters, StructuredMagnitude, target, structure=structure)
        pruned = count_pruned(parameters)
        assert abs(pruned - target) <= one_head + one_neuron, (target, pruned)
        after = [block_kept(b) for b in structure]
        for old, new in zip(before, after, strict=True):
            assert all(o or not n for o, n in zip(old, new, strict=True)), "a cut unit came back"
        before = after
        # Training between rounds reorders the survivors: the next cut must still only add.
        with torch.no_grad():
            for module, _ in parameters:
                weight = getattr(module, "weight_orig", module.weight)
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)


@pytest.mark.parametrize("method", [StructuredMagnitude, LayerwiseStructuredMagnitude])
@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_rounds_never_pass_their_target_on_any_schedule(method, rate):
    # A round past its target would put the next, small geometric step behind what is already
    # pruned: prune_to would refuse it after the round had trained.
    backbone = build(Uniter)
    parameters = backbone.prunable()
    for target in geometric_schedule(total_of(parameters), rate, final=0.95):
        prune_to(parameters, method, target, structure=backbone.structure())
        assert count_pruned(parameters) <= target


def _pruned_and_shrunk(name: str, all_heads_cut: bool):
    backbone = build(BACKBONES[name])
    structure = backbone.structure()
    if all_heads_cut:
        for unit in range(structure[0].units):
            scale_unit(structure[0], unit, 1e-6)
    parameters = backbone.prunable()
    # Outside autograd each `weight` the hooks compute is a leaf, which deepcopy needs.
    with torch.no_grad():
        prune_to(parameters, StructuredMagnitude, total_of(parameters) // 2, structure=structure)
    if all_heads_cut:
        assert not any(block_kept(structure[0])), "the test needs a block with no head left"
    alive = [sum(block_kept(b)) for b in structure]
    shrunk = copy.deepcopy(backbone)
    returned = shrink(shrunk.structure())
    return backbone, shrunk, alive, returned


CASES = [(name, extreme) for name in BACKBONES for extreme in (False, True)]


@pytest.fixture(
    scope="module", params=CASES, ids=[f"{n}-{'nohead' if e else 'half'}" for n, e in CASES]
)
def shrunk_case(request):
    return (*_pruned_and_shrunk(*request.param), request.param[1])


def test_shrinking_keeps_the_outputs_and_narrows_every_block(shrunk_case):
    masked, shrunk, alive, returned, all_heads_cut = shrunk_case
    batch = batch_for(masked)
    difference = max_difference(outputs(masked, batch), outputs(shrunk, batch))
    assert difference <= 1e-5

    # Attention cannot run headless: a block with every head cut keeps one (of zeros).
    expected = [
        max(n, 1) if b.kind == HEADS else n for n, b in zip(alive, shrunk.structure(), strict=True)
    ]
    assert returned == expected
    if all_heads_cut:
        assert expected[0] == 1
    for block, units, old in zip(shrunk.structure(), expected, masked.structure(), strict=True):
        assert block.units == units
        for (linear, dim), (old_linear, _) in zip(block.parts, old.parts, strict=True):
            assert not prune.is_pruned(linear)
            assert linear.weight.shape[dim] == units * old.width
            assert linear.weight.shape[1 - dim] == old_linear.weight.shape[1 - dim]
            assert (linear.out_features, linear.in_features) == tuple(linear.weight.shape)
            if dim == 0 and linear.bias is not None:
                assert linear.bias.shape == (units * old.width,)
        if block.kind == HEADS:
            assert block.owner.num_attention_heads == units
    # The masked model holds every original weight (as `weight_orig`): shrinking saves memory.
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in masked.parameters())


def test_fit_to_rebuilds_a_shrunk_model_from_its_weights(shrunk_case):
    _, shrunk, _, _, _ = shrunk_case
    state = shrunk.state_dict()
    fresh = build(type(shrunk), seed=7)
    fit_to(fresh, fresh.structure(), state)
    fresh.load_state_dict(state)  # strict: every shape must fit
    fresh.eval()
    batch = batch_for(shrunk)
    assert max_difference(outputs(fresh, batch), outputs(shrunk, batch)) <= 1e-6


def test_fit_to_rejects_weights_that_are_not_whole_units():
    backbone = build(Uniter)
    state = dict(backbone.state_dict())
    query = "encoder.layer.0.attention.self.query.weight"
    state[query] = state[query][:-1]  # one row short of whole heads
    fresh = build(Uniter)
    with pytest.raises(VLPruneError, match="not whole heads"):
        fit_to(fresh, fresh.structure(), state)


def test_a_backbone_without_structure_is_refused():
    backbone = build(Uniter)
    with pytest.raises(VLPruneError, match=r"Backbone\.structure"):
        StructuredMagnitude.prune_group(backbone.prunable(), 0.3, structure=())
    assert not any(prune.is_pruned(m) for m, _ in backbone.prunable())


# The lottery, on conftest's world: a small NLVR2 split and a fresh tiny UNITER checkpoint.


def find_settings(world, theta0) -> FindSettings:
    return FindSettings(
        backbone="uniter",
        task="nlvr2",
        checkpoint=str(theta0),
        data=str(world),
        method="structured",
        sparsity=0.3,
        train=TrainSettings(steps=2, batch_size=8, eval_batch_size=24),
    )


def test_find_structured_gives_whole_unit_tickets_of_rising_sparsity(
    world, theta0, tmp_path, one_thread
):
    lottery = Lottery(find_settings(world, theta0), runs=tmp_path)
    report = lottery.run()
    folders = sorted(lottery.folder.glob("seed_*/round_*"))
    tickets = [Ticket.load(folder / "ticket.safetensors") for folder in folders]
    assert len(tickets) == lottery.rounds + 1
    assert [t.metadata["method"] for t in tickets] == ["structured"] * len(tickets)

    shape = Uniter.build("tiny")
    paths = {id(module): path for path, module in shape.named_modules()}
    structure = shape.structure()
    one_head = 4 * shape.hidden_size * structure[0].width
    one_neuron = 2 * shape.hidden_size
    for ticket, target in zip(tickets[1:], lottery.targets, strict=True):
        masks = lambda linear, t=ticket: t.masks[f"{paths[id(linear)]}.weight"]  # noqa: E731
        for block in structure:
            block_kept(block, masks)
        assert bool(ticket.masks["pooler.dense.weight"].all())
        assert abs(ticket.pruned - target) <= one_head + one_neuron
    assert tickets[0].pruned == 0
    sparsities = [t.sparsity for t in tickets]
    assert sparsities == sorted(sparsities) and len(set(sparsities)) == len(sparsities)
    for before, after in itertools.pairwise(tickets):
        assert all(bool((after.masks[n] <= before.masks[n]).all()) for n in before.masks)
    assert [r["sparsity"] for r in report["rounds"]] == sparsities


def test_find_refuses_a_backbone_without_structure_before_training(
    world, theta0, tmp_path, monkeypatch
):
    monkeypatch.setattr(Uniter, "structure", lambda self: [])
    with pytest.raises(VLPruneError, match=r"Backbone\.structure"):
        Lottery(find_settings(world, theta0), runs=tmp_path)
    assert not list(tmp_path.iterdir())


def test_find_cli_runs_method_structured(world, theta0, tmp_path, one_thread):
    args = [
        *("find", "--model", "uniter", "--task", "nlvr2", "--checkpoint", str(theta0)),
        *("--data", str(world), "--batch-size", "8", "--runs", str(tmp_path), "--quiet"),
        *("--method", "structured", "--steps", "2", "--sparsity", "0.2", "--json"),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    (run,) = tmp_path.glob("uniter-nlvr2-*")
    assert "-structured-" in run.name
    final = Ticket.load(run / "ticket.safetensors")
    assert final.metadata["method"] == "structured"
