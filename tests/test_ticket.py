"""Ticket bundles: round trip, file layout, apply, statistics, bad input, fingerprints, writes."""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import subprocess
import warnings
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import prune

import vl_prune
import vl_prune.revision
from vl_prune.errors import VLPruneError
from vl_prune.pruning import GlobalMagnitude
from vl_prune.revision import revision
from vl_prune.ticket import FingerprintMismatch, Ticket, current_weights, fingerprint

FORMAT = "vl_prune.ticket/1"
# Parameter paths of the tensors `prunable` lists; 15, 3 and 21 elements: none a multiple of 8.
NAMES = ["0.weight", "0.bias", "2.weight"]
TO_PRUNE = 17


def make_model(seed: int = 0, out: int = 7) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, out))


def prunable(model: nn.Sequential) -> list[tuple[nn.Module, str]]:
    return [(model[0], "weight"), (model[0], "bias"), (model[2], "weight")]


def model_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The pruning masks of a model read straight from its `<name>_mask` buffers."""
    return {
        name.removesuffix("_mask"): buf.bool().clone()
        for name, buf in model.named_buffers()
        if name.endswith("_mask")
    }


def theta(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in NAMES}


def assert_untouched(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Nothing pruned, no hook added, every tensor as it was."""
    assert not prune.is_pruned(model)
    assert all(not m._forward_pre_hooks for m in model.modules())
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def pruned() -> tuple[nn.Sequential, dict[str, torch.Tensor]]:
    """A model with TO_PRUNE weights of its prunable group removed, and its weights before."""
    model = make_model()
    before = theta(model)
    GlobalMagnitude.prune_group(prunable(model), TO_PRUNE)
    return model, before


@pytest.fixture
def ticket(pruned) -> Ticket:
    model, _ = pruned
    return Ticket.from_model(model, prunable(model))


def write_bundle(path, tensors: dict[str, torch.Tensor], shapes, **metadata) -> None:
    """A bundle written by hand. `shapes` is a dict or raw text; a None value leaves a key out."""
    header = {"format": FORMAT, "shapes": shapes if isinstance(shapes, str) else json.dumps(shapes)}
    if shapes is None:
        del header["shapes"]
    header.update(metadata)
    save_file(tensors, str(path), metadata={k: v for k, v in header.items() if v is not None})


def kept(*shape: int) -> torch.Tensor:
    """An all-kept mask."""
    return torch.ones(shape, dtype=torch.bool)


def packbits(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.numpy().ravel(), bitorder="big"))


# 1. Round trip ----------------------------------------------------------------------------------


def test_round_trip_keeps_masks_and_typed_metadata(pruned, tmp_path):
    model, before = pruned
    fp = fingerprint(before)
    history = [{"round": 1, "sparsity": 0.2, "score": 0.805}, {"round": 2, "score": 0.802}]
    ticket = Ticket.from_model(
        model,
        prunable(model),
        backbone="uniter",
        task="nlvr2",
        score=0.8,
        dense_score=0.81,
        round=3,
        history=history,
        weights_fingerprint=fp,
    )
    start = datetime.now(timezone.utc).replace(microsecond=0)
    path = ticket.save(tmp_path / "ticket.safetensors")
    loaded = Ticket.load(path)

    assert path == tmp_path / "ticket.safetensors"
    assert loaded.masks.keys() == set(NAMES)
    for name, mask in model_masks(model).items():
        assert loaded.masks[name].dtype == torch.bool
        assert torch.equal(loaded.masks[name], mask), name

    meta = loaded.metadata
    assert (meta["backbone"], meta["task"], meta["weights_fingerprint"]) == ("uniter", "nlvr2", fp)
    assert meta["score"] == 0.8 and type(meta["score"]) is float
    assert meta["dense_score"] == 0.81 and type(meta["dense_score"]) is float
    assert meta["round"] == 3 and type(meta["round"]) is int
    assert meta["history"] == history
    assert meta["format"] == FORMAT
    assert meta["shapes"] == {n: list(p.shape) for n, p in before.items()}
    assert meta["vl_prune_version"] == revision()
    created = datetime.fromisoformat(meta["created"])
    assert created.utcoffset() == timedelta(0)
    assert start <= created <= datetime.now(timezone.utc)

    masks = model_masks(model)
    total = sum(m.numel() for m in masks.values())
    dead = sum(int((~m).sum()) for m in masks.values())
    assert meta["sparsity"] == dead / total == TO_PRUNE / total


def test_resaving_a_loaded_ticket_keeps_its_metadata(ticket, tmp_path):
    ticket.metadata.update(task="vqa", round=2)
    first = Ticket.load(ticket.save(tmp_path / "a.safetensors"))
    second = Ticket.load(first.save(tmp_path / "b.safetensors"))
    assert second.metadata == first.metadata
    assert all(torch.equal(second.masks[n], first.masks[n]) for n in NAMES)


# 2. On-disk layout ------------------------------------------------------------------------------


def test_file_holds_packed_uint8_masks_and_string_metadata(pruned, tmp_path):
    model, _ = pruned
    path = Ticket.from_model(model, prunable(model), round=1).save(tmp_path / "t.safetensors")
    masks = model_masks(model)

    with safe_open(str(path), framework="pt") as bundle:
        header = bundle.metadata()
        stored = {name: bundle.get_tensor(name) for name in bundle.keys()}  # noqa: SIM118

    assert stored.keys() == set(NAMES)
    for name, mask in masks.items():
        assert mask.numel() % 8 != 0
        packed = stored[name]
        assert packed.dtype == torch.uint8 and packed.dim() == 1
        assert packed.numel() == math.ceil(mask.numel() / 8)
        assert torch.equal(packed, packbits(mask)), name
        # Independently of numpy: most significant bit first, zero padded.
        bits = mask.reshape(-1).tolist() + [False] * (8 * packed.numel() - mask.numel())
        by_hand = [sum(bits[8 * i + j] << (7 - j) for j in range(8)) for i in range(len(bits) // 8)]
        assert packed.tolist() == by_hand, name

    assert all(isinstance(k, str) and isinstance(v, str) for k, v in header.items())
    assert header["format"] == FORMAT
    assert json.loads(header["shapes"]) == {n: list(m.shape) for n, m in masks.items()}
    assert load_file(str(path)).keys() == set(NAMES)


# 3. Unpacked bool tensors -----------------------------------------------------------------------


def test_reader_accepts_unpacked_bool_masks(ticket, tmp_path):
    path = tmp_path / "bool.safetensors"
    # One tensor unpacked (bool, the parameter's shape), the others packed: both forms mix.
    tensors = {n: packbits(m) for n, m in ticket.masks.items()}
    tensors["2.weight"] = ticket.masks["2.weight"].clone()
    write_bundle(path, tensors, {n: list(m.shape) for n, m in ticket.masks.items()})

    loaded = Ticket.load(path)
    for name, mask in ticket.masks.items():
        assert loaded.masks[name].dtype == torch.bool
        assert loaded.masks[name].shape == mask.shape
        assert torch.equal(loaded.masks[name], mask), name


# 4. from_model ----------------------------------------------------------------------------------


def test_from_model_without_parameters_takes_every_pruned_tensor():
    model = make_model()
    GlobalMagnitude.prune_group([(model[0], "weight"), (model[2], "weight")], 0.5)
    prune.l1_unstructured(model[2], "bias", amount=2)  # torch's own method counts too

    ticket = Ticket.from_model(model)
    masks = model_masks(model)
    assert ticket.masks.keys() == {"0.weight", "2.weight", "2.bias"} == masks.keys()
    for name, mask in masks.items():
        assert ticket.masks[name].dtype == torch.bool
        assert torch.equal(ticket.masks[name], mask), name


def test_from_model_with_parameters_keeps_unpruned_tensors_whole():
    model = make_model()
    GlobalMagnitude.prune_group([(model[0], "weight")], 4)
    ticket = Ticket.from_model(model, [(model[0], "weight"), (model[2], "bias")])

    assert ticket.masks.keys() == {"0.weight", "2.bias"}
    assert torch.equal(ticket.masks["0.weight"], model[0].weight_mask.bool())
    assert ticket.masks["2.bias"].dtype == torch.bool
    assert ticket.masks["2.bias"].shape == model[2].bias.shape
    assert bool(ticket.masks["2.bias"].all())


def test_from_model_is_a_snapshot(pruned):
    model, _ = pruned
    ticket = Ticket.from_model(model, prunable(model))
    copies = {n: m.clone() for n, m in ticket.masks.items()}
    GlobalMagnitude.prune_group(prunable(model), 5)
    assert all(torch.equal(ticket.masks[n], copies[n]) for n in NAMES)


# 5. apply ---------------------------------------------------------------------------------------


def test_apply_to_a_fresh_model_reproduces_the_pruned_model(pruned, ticket):
    model, _ = pruned
    fresh = make_model(seed=1)
    fresh.load_state_dict(make_model().state_dict())  # same θ0, built separately
    ticket.apply(fresh)

    assert prune.is_pruned(fresh)
    for name, mask in model_masks(model).items():
        module_name, _, attr = name.rpartition(".")
        applied = getattr(fresh.get_submodule(module_name), attr + "_mask")
        assert applied.dtype == torch.bool, name
        assert torch.equal(applied, mask), name
    x = torch.randn(4, 5)
    assert torch.equal(fresh(x), model(x))


def test_apply_to_other_weights_gives_the_same_masks(ticket):
    other = make_model(seed=7)
    ticket.apply(other)
    assert model_masks(other).keys() == ticket.masks.keys()
    assert all(torch.equal(model_masks(other)[n], ticket.masks[n]) for n in NAMES)


@pytest.mark.parametrize("method", ["vl_prune", "torch"])
def test_apply_to_a_pruned_model_intersects(ticket, method):
    other = make_model(seed=3)
    if method == "vl_prune":
        GlobalMagnitude.prune_group(prunable(other), 15)
    else:
        for module, name in prunable(other):
            prune.random_unstructured(module, name, amount=0.4)
    existing = model_masks(other)
    ticket.apply(other)

    after = model_masks(other)
    for name in NAMES:
        assert torch.equal(after[name], existing[name] & ticket.masks[name]), name


# 6. Statistics and iou --------------------------------------------------------------------------


def test_counts_match_the_model(pruned, ticket):
    model, _ = pruned
    masks = model_masks(model)
    total = sum(getattr(m, n).numel() for m, n in prunable(model))
    dead = {name: int(mask.numel() - mask.sum()) for name, mask in masks.items()}

    assert ticket.total == total
    assert ticket.pruned == sum(dead.values()) == TO_PRUNE
    assert ticket.sparsity == TO_PRUNE / total
    assert ticket.layer_sparsity() == pytest.approx(
        {name: dead[name] / masks[name].numel() for name in NAMES}
    )


def test_iou_of_identical_tickets_is_one(ticket, tmp_path):
    assert ticket.iou(ticket) == 1.0
    assert ticket.iou(Ticket.load(ticket.save(tmp_path / "t.safetensors"))) == 1.0


def test_iou_counts_weights_over_all_tensors():
    t, f = True, False
    a = Ticket({"x": torch.tensor([t, t, t, t]), "y": torch.tensor([[t, f, f], [t, f, t]])})
    b = Ticket({"x": torch.tensor([t, t, t, t]), "y": torch.tensor([[f, t, f], [t, f, f]])})
    # x: 4 kept by both, 4 by either; y: 1 kept by both ([1, 0]), 4 by either.
    expected = (4 + 1) / (4 + 4)
    assert a.iou(b) == b.iou(a) == expected
    assert Ticket({"z": ~kept(3)}).iou(Ticket({"z": kept(3)})) == 0.0


def test_iou_of_tickets_over_different_tensors_names_one():
    a = Ticket({"x": kept(4), "y": kept(2)})
    b = Ticket({"x": kept(4), "z": kept(2)})
    with pytest.raises(VLPruneError, match=r"'y'|'z'"):
        a.iou(b)


def test_iou_of_tickets_with_different_shapes_names_the_tensor():
    a = Ticket({"x": kept(4), "layer.w": kept(2, 3)})
    b = Ticket({"x": kept(4), "layer.w": kept(3, 2)})
    with pytest.raises(VLPruneError, match=r"layer\.w"):
        a.iou(b)


# 7. Bad input -----------------------------------------------------------------------------------

MASK = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 0, 1]], dtype=torch.bool)


def _truncated(cut):
    def write(path):
        Ticket({"0.weight": MASK}, {"history": [{"round": 1}]}).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: cut(len(data))])

    return write


def _padding_set(path):
    packed = packbits(MASK)
    packed[-1] |= 1  # the last of the 16 bits is padding: 15 weights
    write_bundle(path, {"0.weight": packed}, {"0.weight": [3, 5]})


BAD_FILES = {
    "truncated in half": (_truncated(lambda n: n // 2), None),
    "last byte cut": (_truncated(lambda n: n - 1), None),
    "random bytes": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(300)), None),
    "text file": (lambda p: p.write_text("0.weight: [1, 0, 1]\n" * 20), None),
    "empty file": (lambda p: p.write_bytes(b""), None),
    "missing file": (lambda p: None, None),
    "a directory": (lambda p: p.mkdir(), None),
    "format version 2": (
        lambda p: write_bundle(
            p, {"0.weight": packbits(MASK)}, {"0.weight": [3, 5]}, format="vl_prune.ticket/2"
        ),
        "vl_prune.ticket/2",
    ),
    "model weights, not a ticket": (
        lambda p: save_file({"0.weight": torch.randn(3, 5)}, str(p)),
        None,
    ),
    "shapes not JSON": (
        lambda p: write_bundle(p, {"0.weight": packbits(MASK)}, shapes="{0.weight: [3, 5]"),
        "shapes",
    ),
    "shapes missing": (
        lambda p: write_bundle(p, {"0.weight": packbits(MASK)}, None),
        "shapes",
    ),
    "packed tensor too short": (
        lambda p: write_bundle(p, {"0.weight": packbits(MASK)[:1]}, {"0.weight": [3, 5]}),
        "0.weight",
    ),
    "packed tensor too long": (
        lambda p: write_bundle(
            p, {"0.weight": torch.zeros(3, dtype=torch.uint8)}, {"0.weight": [3, 5]}
        ),
        "0.weight",
    ),
    "float mask": (
        lambda p: write_bundle(p, {"0.weight": MASK.float()}, {"0.weight": [3, 5]}),
        "0.weight",
    ),
    "bool mask of the wrong shape": (
        lambda p: write_bundle(p, {"0.weight": MASK.T.contiguous()}, {"0.weight": [3, 5]}),
        "0.weight",
    ),
    "tensor with no shape": (
        lambda p: write_bundle(
            p, {"0.weight": packbits(MASK), "2.weight": packbits(MASK)}, {"0.weight": [3, 5]}
        ),
        "2.weight",
    ),
    "shape that is not a list": (
        lambda p: write_bundle(p, {"0.weight": packbits(MASK)}, {"0.weight": 15}),
        "0.weight",
    ),
    "shape listed but not stored": (
        lambda p: write_bundle(
            p, {"0.weight": packbits(MASK)}, {"0.weight": [3, 5], "2.bias": [7]}
        ),
        "2.bias",
    ),
    "padding bits set": (_padding_set, "0.weight"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_file_is_an_error_naming_it(case, tmp_path):
    write, names = BAD_FILES[case]
    path = tmp_path / "bad.safetensors"
    write(path)
    with pytest.raises(VLPruneError) as caught:
        Ticket.load(path)
    assert str(path) in str(caught.value)
    if names:
        assert names in str(caught.value)


def test_good_file_written_by_hand_loads(tmp_path):
    """The bad-file cases above differ from this valid bundle in one way each."""
    path = tmp_path / "good.safetensors"
    write_bundle(path, {"0.weight": packbits(MASK)}, {"0.weight": [3, 5]})
    assert torch.equal(Ticket.load(path).masks["0.weight"], MASK)


def _wrong_tensor_name(ticket):
    ticket.masks["1.weight"] = kept(3)  # 1 is the ReLU
    return make_model(), "1.weight"


def _missing_module(ticket):
    ticket.masks["encoder.4.weight"] = kept(3)
    return make_model(), "encoder.4.weight"


def _wrong_shape(ticket):
    return make_model(out=8), "2.weight"  # the last tensor checked, the others fit


def _submodule_not_tensor(ticket):
    # e.g. a projection stored as a raw parameter in one model and as an nn.Linear in the other
    model = make_model()
    del model[2].weight
    model[2].add_module("weight", nn.Linear(3, 7))
    return model, "2.weight"


def _buffer_not_parameter(ticket):
    # e.g. a learned position embedding in one model and a fixed (buffer) one in the other
    model = make_model()
    weight = model[2].weight.detach().clone()
    del model[2].weight
    model[2].register_buffer("weight", weight)
    return model, "2.weight"


@pytest.mark.parametrize(
    "mismatch",
    [
        _wrong_tensor_name,
        _missing_module,
        _wrong_shape,
        _submodule_not_tensor,
        _buffer_not_parameter,
    ],
)
def test_apply_to_a_wrong_architecture_names_the_tensor_and_changes_nothing(ticket, mismatch):
    model, name = mismatch(ticket)
    state = snapshot(model)
    with pytest.raises(VLPruneError, match=name.replace(".", r"\.")):
        ticket.apply(model)
    assert_untouched(model, state)


# 8. Fingerprints --------------------------------------------------------------------------------


def test_fingerprint_is_deterministic_and_sensitive():
    weights = theta(make_model())
    base = fingerprint(weights)
    assert fingerprint(theta(make_model())) == base
    assert fingerprint(dict(reversed(weights.items()))) == base
    assert len(base) == 64 and set(base) <= set("0123456789abcdef")

    changed = {n: w.clone() for n, w in weights.items()}
    changed["2.weight"][4, 1] += 1e-3
    assert fingerprint(changed) != base

    renamed = dict(weights)
    renamed["3.weight"] = renamed.pop("2.weight")
    assert fingerprint(renamed) != base

    # Same bytes, other dtype: a float32 tensor seen as int32.
    retyped = dict(weights, **{"0.bias": weights["0.bias"].view(torch.int32)})
    assert retyped["0.bias"].numpy().tobytes() == weights["0.bias"].numpy().tobytes()
    assert fingerprint(retyped) != base


def test_fingerprint_ignores_the_masks_of_a_pruned_model(pruned):
    model, before = pruned
    assert fingerprint(current_weights(model, NAMES)) == fingerprint(before)


def _fingerprinted(pruned) -> Ticket:
    model, before = pruned
    return Ticket.from_model(model, prunable(model), weights_fingerprint=fingerprint(before))


def test_matching_fingerprint_applies_silently(pruned, tmp_path):
    ticket = Ticket.load(_fingerprinted(pruned).save(tmp_path / "t.safetensors"))
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ticket.apply(model)
        ticket.apply(model)  # already pruned: the unmasked weights still match
    assert all(torch.equal(model_masks(model)[n], ticket.masks[n]) for n in NAMES)


def test_other_weights_warn_and_still_apply(pruned):
    ticket = _fingerprinted(pruned)
    model = make_model(seed=5)
    with pytest.warns(FingerprintMismatch):
        ticket.apply(model)
    assert all(torch.equal(model_masks(model)[n], ticket.masks[n]) for n in NAMES)


def test_other_weights_fail_under_strict_and_change_nothing(pruned):
    ticket = _fingerprinted(pruned)
    model = make_model(seed=5)
    state = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(VLPruneError):
            ticket.apply(model, strict=True)
    assert_untouched(model, state)


# 9. Atomic writes -------------------------------------------------------------------------------


class _HalfWriter:
    """A file whose write stores half the data, then fails as a full disk does."""

    def __init__(self, file):
        self.file = file

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, data):
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.file, name)


def _fail_write(m):
    real = os.fdopen
    m.setattr(os, "fdopen", lambda *a, **k: _HalfWriter(real(*a, **k)))


def _fail(name, exc):
    def patch(m):
        def boom(*args, **kwargs):
            raise exc

        m.setattr(os, name, boom)

    return patch


FAILURES = {
    "write": (_fail_write, OSError),
    "fsync": (_fail("fsync", OSError(errno.EIO, "I/O error")), OSError),
    "rename": (_fail("replace", OSError(errno.EXDEV, "cross-device")), OSError),
    "interrupted": (_fail("fsync", KeyboardInterrupt()), KeyboardInterrupt),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_failed_save_keeps_the_old_ticket(ticket, tmp_path, monkeypatch, failure):
    patch, exc = FAILURES[failure]
    path = ticket.save(tmp_path / "ticket.safetensors")
    old = path.read_bytes()
    newer = Ticket({n: torch.zeros_like(m) for n, m in ticket.masks.items()}, {"round": 9})

    with monkeypatch.context() as m, pytest.raises(exc):
        patch(m)
        newer.save(path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == [path.name]

    newer.save(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert Ticket.load(path).metadata["round"] == 9
    assert Ticket.load(path).sparsity == 1.0


def test_saved_ticket_is_as_readable_as_any_written_file(ticket, tmp_path):
    """A ticket is meant to be shipped: its permissions follow the umask like open()'s."""
    old_umask = os.umask(0o022)
    try:
        ticket.save(tmp_path / "ticket.safetensors")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old_umask)
    mode = stat.S_IMODE((tmp_path / "ticket.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o644


def test_the_version_names_the_commit_from_a_checkout(tmp_path, monkeypatch):
    source = vl_prune.revision._SOURCE
    if not (source / ".git").exists():
        pytest.skip("vl_prune runs from a source tree without git")
    head = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert revision().startswith(f"{vl_prune.__version__}+g{head}")
    # Installed from a release (no .git beside the package): the version alone.
    monkeypatch.setattr(vl_prune.revision, "_SOURCE", tmp_path)
    revision.cache_clear()
    try:
        assert revision() == vl_prune.__version__
    finally:
        revision.cache_clear()
