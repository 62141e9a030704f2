"""LoRA adapters (peft) over a pruned tiny UNITER: what is trained, that masks survive training
and merging, peft's own merge on a pruned layer, the saved adapters, and fit on a peft model."""

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import prune

import vl_prune_plugins.world.splits.nlvr2 as nlvr2_world
from vl_prune.backbone import VLBatch
from vl_prune.errors import VLPruneError
from vl_prune.experiment import Experiment, FindSettings
from vl_prune.lora import (
    METADATA,
    add_lora,
    load_adapters,
    lora_ticket,
    merge_lora,
    save_adapters,
)
from vl_prune.pruning import GlobalMagnitude, KeepMask
from vl_prune.task import TaskBatch, VLModel
from vl_prune.ticket import Ticket
from vl_prune.train import TrainSettings
from vl_prune_plugins.backbones.uniter import Uniter


class Head(nn.Module):
    """A small classifier on the pooled vector, with a linear layer named like backbone ones."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 3)

    def forward(self, backbone, inputs):
        return self.out(torch.tanh(self.dense(backbone(inputs[0]).pooled)))


def pruned_model(rows: bool = False) -> VLModel:
    """Tiny UNITER + head, the transformer layers pruned to 50% by magnitude (or, with `rows`,
    every odd output row of every prunable layer) and the pooler left dense."""
    torch.manual_seed(0)
    backbone = Uniter.build("tiny")
    model = VLModel(backbone, Head(backbone.hidden_size)).eval()
    layers = backbone.prunable()[:-1]
    if rows:
        for module, name in layers:
            keep = torch.zeros_like(module.weight, dtype=torch.bool)
            keep[::2] = True
            KeepMask.apply(module, name, importance_scores=keep)
    else:
        GlobalMagnitude.prune_group(layers, 0.5)
    return model


def make_batch(size: int = 3) -> TaskBatch:
    generator = torch.Generator().manual_seed(1)
    inputs = VLBatch(
        input_ids=torch.randint(5, 100, (size, 7), generator=generator),
        attention_mask=torch.ones(size, 7, dtype=torch.long),
        region_feats=torch.randn(size, 5, 64, generator=generator),
        region_boxes=torch.rand(size, 5, 6, generator=generator),
    )
    return TaskBatch([inputs], torch.arange(size) % 3)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def randomize_updates(model: PeftModel, seed: int = 2) -> None:
    """Give every adapter a non-zero update (peft starts B at zero) and move the head."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def masks_and_weights(model: nn.Module) -> tuple[dict, dict]:
    masks, weights = {}, {}
    for name, module in model.named_modules():
        if hasattr(module, "weight_mask"):
            masks[name] = module.weight_mask.clone()
            weights[name] = module.weight_orig.detach().clone()
    return masks, weights


def test_adapters_target_exactly_the_prunable_layers_and_only_they_and_the_head_train():
    model = pruned_model()
    prunable = {m for m, _ in model.backbone.prunable()}
    expected = {f"backbone.{n}" for n, m in model.backbone.named_modules() if m in prunable}
    masks, weights = masks_and_weights(model)
    wrapped = add_lora(model, rank=4, alpha=8)

    base = wrapped.get_base_model()
    assert set(lora_layers(base)) == expected  # 24 pruned layers and the dense pooler
    assert len(expected) == 25
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable
    for name in trainable:
        assert "lora_A" in name or "lora_B" in name or ".head.modules_to_save." in name, name
    heads = {n for n in trainable if ".head." in n}
    assert len(heads) == len(list(Head(128).parameters()))  # the whole head, once
    assert not any(p.requires_grad for n, p in wrapped.named_parameters() if "weight_orig" in n)
    after_masks, after_weights = masks_and_weights(base)
    assert masks.keys() == {n.removesuffix(".base_layer") for n in after_masks}
    for name, mask in masks.items():
        assert torch.equal(after_masks[f"{name}.base_layer"], mask)
        assert torch.equal(after_weights[f"{name}.base_layer"], weights[name])

    # A wrapped pruned layer computes (mask ⊙ W_orig) x + b + scaling · B A x; the prune
    # pre-hook stays on the base layer.
    randomize_updates(wrapped)
    layer = base.backbone.encoder.layer[1].attention.self.value
    inner = layer.get_base_layer()
    assert prune.is_pruned(inner)
    assert any(isinstance(h, prune.BasePruningMethod) for h in inner._forward_pre_hooks.values())
    x = torch.randn(4, 128)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    masked = torch.where(inner.weight_mask, inner.weight_orig, 0.0)
    expected_out = x @ masked.T + inner.bias + 2.0 * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected_out)


def test_training_the_adapters_keeps_masks_and_pruned_weights_at_zero():
    model = pruned_model()
    masks, weights = masks_and_weights(model)
    wrapped = add_lora(model, rank=4)
    wrapped.train()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    batch = make_batch()
    for _ in range(3):
        loss = nn.functional.cross_entropy(wrapped(batch), batch.targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(p, old) for p, old in zip(params, before, strict=True))
    wrapped(batch)  # the prune hooks recompute every layer's weight
    after_masks, after_weights = masks_and_weights(wrapped.get_base_model())
    for name, mask in masks.items():
        assert torch.equal(after_masks[f"{name}.base_layer"], mask)
        assert torch.equal(after_weights[f"{name}.base_layer"], weights[name])
    for module in lora_layers(wrapped).values():
        inner = module.get_base_layer()
        if hasattr(inner, "weight_mask"):
            assert not inner.weight[~inner.weight_mask].any()
    assert torch.equal(
        lora_ticket(wrapped).masks["encoder.layer.2.output.dense.weight"],
        masks["backbone.encoder.layer.2.output.dense"],
    )


def test_peft_merge_and_unload_silently_drops_the_whole_update_of_a_pruned_layer():
    """A known peft/torch-prune interaction, pinned so that a change in either is noticed:
    peft adds B A to the `weight` the prune hook computed last, and the hook's next forward
    recomputes `weight` from `weight_orig`, so merge_and_unload loses the update entirely."""
    model = pruned_model()
    pruned = [n for n, m in model.named_modules() if hasattr(m, "weight_mask")]
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=pruned))
    randomize_updates(wrapped)
    batch = make_batch()
    with torch.no_grad():
        lora_out = wrapped(batch)
        with wrapped.disable_adapter():
            base_out = wrapped(batch)
    assert (lora_out - base_out).abs().max() > 1e-3

    layer = wrapped.get_base_model().backbone.encoder.layer[0].attention.self.query
    inner = layer.get_base_layer()
    delta = layer.get_delta_weight("default").detach()
    masked = torch.where(inner.weight_mask, inner.weight_orig, 0.0).detach()
    merged = wrapped.merge_and_unload()
    assert merged.backbone.encoder.layer[0].attention.self.query is inner
    torch.testing.assert_close(inner.weight, masked + delta)  # peft did write the merge ...
    with torch.no_grad():
        merged_out = merged(batch)
    torch.testing.assert_close(inner.weight, masked)  # ... and the hook's forward undid it
    torch.testing.assert_close(merged_out, base_out)
    assert (merged_out - lora_out).abs().max() > 1e-3


def test_add_lora_makes_peft_merges_refuse_on_pruned_layers():
    wrapped = add_lora(pruned_model(), rank=2)
    randomize_updates(wrapped)
    batch = make_batch()
    with torch.no_grad():
        before = wrapped(batch)
    with pytest.raises(VLPruneError, match=r"pruned layer .*merge_lora"):
        wrapped.merge_and_unload()
    with pytest.raises(VLPruneError, match="merge_lora"):
        wrapped.merge_adapter()
    with torch.no_grad():
        assert torch.equal(wrapped(batch), before)  # the refusal came before any change
    assert len(lora_layers(wrapped)) == 25


def test_merge_lora_keeps_every_mask_and_merges_into_weight_orig():
    model = pruned_model()
    reference = pruned_model()
    sparsity = lora_ticket(model).sparsity
    masks, weights = masks_and_weights(model)
    wrapped = add_lora(model, rank=4, alpha=8)
    randomize_updates(wrapped)
    deltas, dropped, total = {}, 0.0, 0.0
    for name, layer in lora_layers(wrapped.get_base_model()).items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        deltas[name] = (b @ a * 2.0).detach()
        total += deltas[name].double().square().sum().item()
        if name in masks:
            dropped += deltas[name][~masks[name]].double().square().sum().item()
    head = copy.deepcopy(wrapped.get_base_model().head.modules_to_save["default"].state_dict())
    batch = make_batch()
    with torch.no_grad():
        lora_out = wrapped(batch)

    merged, report = merge_lora(wrapped, batch)

    assert isinstance(merged, VLModel) and not lora_layers(merged)
    assert (report.merged, report.pruned) == (25, 24)
    assert report.dropped == pytest.approx(dropped / total, rel=1e-6)
    assert 0.2 < report.dropped < 0.8
    assert report.layers["backbone.pooler.dense"] == 0.0
    assert "masks kept" in str(report) and f"{report.dropped:.1%}" in str(report)
    assert lora_ticket(merged).sparsity == sparsity
    after_masks, after_weights = masks_and_weights(merged)
    assert after_masks.keys() == masks.keys()
    for name, mask in masks.items():
        module = merged.get_submodule(name)
        assert prune.is_pruned(module) and torch.equal(after_masks[name], mask)
        torch.testing.assert_close(after_weights[name], weights[name] + deltas[name])
        assert not module.weight[~mask].any()  # refreshed at once, not at the next forward
    assert all(p.requires_grad for p in merged.parameters())

    # The same model built by hand: θ_orig + ΔW under the old masks, the trained head.
    with torch.no_grad():
        for name, delta in deltas.items():
            module = reference.get_submodule(name)
            (module.weight_orig if name in masks else module.weight).add_(delta)
        reference.head.load_state_dict(head)
        merged_out, hand_out = merged(batch), reference(batch)
    torch.testing.assert_close(merged_out, hand_out)
    change = (merged_out - lora_out).abs()
    assert report.max_change == pytest.approx(change.max().item(), rel=1e-4)
    assert report.mean_change == pytest.approx(change.mean().item(), rel=1e-4)
    assert report.max_change > 1e-3  # dropping the pruned part moved the outputs


def test_merge_lora_reproduces_the_lora_model_when_the_update_spares_pruned_weights():
    model = pruned_model(rows=True)
    wrapped = add_lora(model, rank=4)
    randomize_updates(wrapped)
    with torch.no_grad():
        for layer in lora_layers(wrapped).values():
            if hasattr(layer.get_base_layer(), "weight_mask"):
                layer.lora_B["default"].weight[1::2] = 0.0  # the pruned rows get no update
    batch = make_batch()
    with torch.no_grad():
        lora_out = wrapped(batch)
    merged, report = merge_lora(wrapped, batch)
    with torch.no_grad():
        torch.testing.assert_close(merged(batch), lora_out, rtol=1e-5, atol=1e-5)
    assert report.dropped == 0.0
    assert report.max_change < 1e-5


def test_saved_adapters_load_back_with_peft_and_give_the_same_outputs(tmp_path):
    wrapped = add_lora(pruned_model(), rank=4)
    randomize_updates(wrapped)
    batch = make_batch()
    with torch.no_grad():
        expected = wrapped(batch)
    folder = save_adapters(wrapped, tmp_path / "round_01" / "lora", task="nlvr2")
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", METADATA} <= names
    assert [p.name for p in folder.parent.iterdir()] == ["lora"]  # no temporary left behind
    record = json.loads((folder / METADATA).read_text())
    assert record["task"] == "nlvr2" and (record["rank"], record["alpha"]) == (4, 4)
    assert record["sparsity"] == pytest.approx(lora_ticket(wrapped).sparsity)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"]

    loaded = load_adapters(pruned_model(), folder)
    plain = PeftModel.from_pretrained(pruned_model(), str(folder))  # plain peft reads it too
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), expected, rtol=0, atol=0)
        torch.testing.assert_close(plain(batch), expected, rtol=0, atol=0)
    with pytest.raises(VLPruneError, match="merge_lora"):
        loaded.merge_and_unload()

    other = pruned_model(rows=True)
    with pytest.raises(VLPruneError, match="another ticket"):
        load_adapters(other, folder)
    load_adapters(other, folder, force=True)
    with pytest.raises(VLPruneError, match="not empty"):
        save_adapters(wrapped, folder)


@pytest.mark.parametrize("rank", [0, -2])
def test_a_rank_below_one_is_refused(rank):
    model = pruned_model()
    with pytest.raises(VLPruneError, match=r"^--lora must be a rank of at least 1"):
        add_lora(model, rank)
    assert not lora_layers(model)


def test_fit_trains_a_peft_wrapped_ticket_on_a_world_split(tmp_path, monkeypatch):
    monkeypatch.setenv("VL_PRUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(nlvr2_world, "WORLD_SIZES", {"train": 16, "dev": 8})
    torch.manual_seed(0)
    weights = tmp_path / "theta0.safetensors"
    save_file(Uniter.build("tiny").state_dict(), weights)
    train = TrainSettings(steps=2, batch_size=8, eval_batch_size=8)
    experiment = Experiment(
        FindSettings(backbone="uniter", task="nlvr2", checkpoint=str(weights), train=train)
    )
    model = experiment.fresh()
    GlobalMagnitude.prune_group(model.backbone.prunable(), 0.5)
    ticket = Ticket.from_model(model.backbone, model.backbone.prunable())
    masks, weights_before = masks_and_weights(model)
    wrapped = add_lora(model, rank=2)

    score, trained = experiment.train(wrapped, "lora", quiet=True)

    assert trained is wrapped
    assert 0.0 <= score <= 1.0
    assert all(
        layer.lora_B["default"].weight.abs().sum() > 0 for layer in lora_layers(trained).values()
    )
    after_masks, after_weights = masks_and_weights(trained.get_base_model())
    for name, mask in masks.items():
        assert torch.equal(after_masks[f"{name}.base_layer"], mask)
        assert torch.equal(after_weights[f"{name}.base_layer"], weights_before[name])
    for name, mask in lora_ticket(trained).masks.items():
        assert torch.equal(mask, ticket.masks[name])


def test_evaluate_and_transfer_with_lora_save_adapters_and_merge_keeping_the_mask(
    tmp_path, monkeypatch
):
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from vl_prune_cli.main import cli

    monkeypatch.setenv("VL_PRUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(nlvr2_world, "WORLD_SIZES", {"train": 16, "dev": 8})
    torch.manual_seed(0)
    theta0 = tmp_path / "theta0.safetensors"
    save_file(Uniter.build("tiny").state_dict(), theta0)
    experiment = Experiment(FindSettings(backbone="uniter", task="nlvr2", checkpoint=str(theta0)))
    model = experiment.fresh()
    GlobalMagnitude.prune_group(model.backbone.prunable(), 0.5)
    ticket = Ticket.from_model(model.backbone, model.backbone.prunable())
    ticket.metadata["weights_fingerprint"] = experiment.fingerprint
    path = tmp_path / "t.safetensors"
    ticket.save(path)
    common = [
        *("--task", "nlvr2", "--checkpoint", str(theta0), "--steps", "2"),
        *("--batch-size", "8", "--lr", "0.01", "--quiet"),
    ]
    merged = tmp_path / "merged.safetensors"
    args = ["evaluate", "--ticket", str(path), *common, "--lora", "2", "--merge", str(merged)]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    lora = json.loads(result.stdout)["lora"]
    adapters = tmp_path / "t.lora-r2-nlvr2"  # beside the ticket by default
    assert lora["adapters"] == str(adapters)
    assert (adapters / "adapter_model.safetensors").is_file()
    assert json.loads((adapters / METADATA).read_text())["rank"] == 2
    # The merged weights are the ticket's sparse model: pruned entries zero, same sparsity...
    weights = load_file(merged)
    for name, mask in ticket.masks.items():
        assert not weights[f"backbone.{name}"][~mask].any()
        assert weights[f"backbone.{name}"][mask].count_nonzero() > 0.99 * mask.sum()
    assert 0.0 < lora["merge"]["dropped"] < 1.0
    # ... and score as reported when read back.
    scored = CliRunner().invoke(cli, ["evaluate", "--finetuned", str(merged), *common, "--json"])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["score"] == pytest.approx(lora["merge"]["score"])

    # Adapters are never overwritten: the same command fails before training.
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and "already exists" in again.output
    alone = CliRunner().invoke(cli, ["evaluate", "--ticket", str(path), *common, "--merge", "m"])
    assert alone.exit_code == 2 and "--merge needs --lora" in alone.output

    runs = tmp_path / "runs"
    transfer = ["transfer", "--ticket", str(path), *common, "--runs", str(runs), "--json"]
    with_lora = CliRunner().invoke(cli, [*transfer, "--lora", "2"])
    assert with_lora.exit_code == 0, with_lora.output
    cell = json.loads(with_lora.stdout)
    assert cell["lora"]["rank"] == 2
    assert (Path(cell["lora"]["adapters"]) / "adapter_model.safetensors").is_file()
    plain = CliRunner().invoke(cli, transfer)
    assert plain.exit_code == 0, plain.output
    assert "lora" not in json.loads(plain.stdout)  # a cell of its own, not the LoRA one
