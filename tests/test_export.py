"""`vl_prune.export` and `vlprune export`: plain, compressed and shrunk files read back to the
pruned model's outputs, transformers folders that plain transformers loads, and the command end
to end with `vlprune evaluate --save` weights.

Backbones are the tiny presets, freshly initialised (no pre-training to wait for); the command
runs on a tiny UNITER checkpoint and a small NLVR2 world split.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import ViltModel

from vl_prune.backbone import Backbone, VLBatch
from vl_prune.errors import VLPruneError
from vl_prune.export import export, export_transformers, load
from vl_prune.pruning import GlobalMagnitude, prune_to
from vl_prune.pruning.layout import pruned_parameters
from vl_prune.pruning.structured import NEURONS, StructuredMagnitude, UnitMask
from vl_prune.ticket import FingerprintMismatch, Ticket, current_weights, fingerprint
from vl_prune_cli.main import cli
from vl_prune_plugins.backbones.lxmert import Lxmert
from vl_prune_plugins.backbones.uniter import Uniter
from vl_prune_plugins.backbones.vilt import IMAGE_TYPES, Vilt

SENTENCES = ["two red circles left of a star .", "is there a blue square ?"]
REGIONS = 7
KINDS = pytest.mark.parametrize("cls", [Uniter, Lxmert, Vilt], ids=["uniter", "lxmert", "vilt"])
PRUNINGS = pytest.mark.parametrize("pruning", ["unstructured", "structured"])


def registry_name(cls: type[Backbone]) -> str:
    return cls.__name__.lower()


def pruned(cls: type[Backbone], pruning: str, seed: int = 0) -> Backbone:
    """A fresh tiny backbone in eval mode, 70% of its prunable weights pruned by magnitude
    (unstructured) or half of them as whole heads and neurons (structured)."""
    torch.manual_seed(seed)
    model = cls.build("tiny").eval()
    if pruning == "unstructured":
        GlobalMagnitude.prune_group(model.prunable(), amount=0.7)
    else:
        total = sum(module.weight.numel() for module, _ in model.prunable())
        prune_to(model.prunable(), StructuredMagnitude, total // 2, structure=model.structure())
    return model


def make_batch(model: Backbone) -> VLBatch:
    """Two sentences of unequal length, with regions (one padded) or two images of unequal
    size (one padded)."""
    text = model.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    generator = torch.Generator().manual_seed(1)
    batch = VLBatch(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
    if model.image_input == "regions":
        batch.region_feats = torch.randn(2, REGIONS, model.img_dim, generator=generator)
        batch.region_boxes = torch.rand(2, REGIONS, 6, generator=generator)
        batch.region_mask = torch.tensor([[1] * REGIONS, [1] * (REGIONS - 2) + [0, 0]])
    else:
        rng = np.random.default_rng(1)
        images = [
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for h, w in [(50, 80), (64, 64)]
        ]
        pixels = model.image_processor(images, return_tensors="pt")
        batch.pixel_values, batch.pixel_mask = pixels["pixel_values"], pixels["pixel_mask"]
    return batch


def encode(model: Backbone, batch: VLBatch) -> tuple[torch.Tensor, ...]:
    # ViLT samples its patch order at random on every call.
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(batch)
    return out.text_states, out.image_states, out.pooled


def max_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def rounded(model: Backbone, dtype: str) -> Backbone:
    """`model` with every floating-point tensor rounded through `dtype` in place: what a file
    of that dtype should read back as, computed without the exporter."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(getattr(torch, dtype)).to(tensor.dtype))
    return model


def head_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return {
        "classifier.0.weight": torch.randn(8, 4, generator=generator),
        "classifier.0.bias": torch.randn(8, generator=generator),
    }


def weight_orig(model: Backbone, name: str) -> torch.Tensor:
    """The stored values of a pruned tensor, pruned entries included."""
    return current_weights(model, [name])[name]


LAYOUTS = pytest.mark.parametrize(
    ("layout", "dtype"),
    [
        ("plain", "float32"),
        ("compressed", "float32"),
        ("compressed", "float16"),
        ("compressed", "bfloat16"),
        ("shrunk", "float32"),
    ],
)


@KINDS
@PRUNINGS
@LAYOUTS
def test_export_loads_back_to_the_pruned_outputs(cls, pruning, layout, dtype, tmp_path):
    model = pruned(cls, pruning)
    batch = make_batch(model)
    head = head_tensors()
    ticket = Ticket.from_model(model, task="nlvr2", method="imp", score=0.5)
    path = tmp_path / "x.safetensors"
    if (pruning, layout) == ("unstructured", "shrunk"):
        # Scattered weights leave no whole head or neuron to remove: refused, not a no-op.
        with pytest.raises(VLPruneError, match="nothing to shrink"):
            export(model, registry_name(cls), path, layout, dtype, head, ticket)
        assert not path.exists()
        return
    loaded = load(export(model, registry_name(cls), path, layout, dtype, head, ticket))

    meta = loaded.metadata
    assert (meta["layout"], meta["dtype"], meta["backbone"]) == (layout, dtype, registry_name(cls))
    assert meta["task"] == "nlvr2" and json.loads(meta["sparsity"]) == ticket.sparsity
    assert loaded.head.keys() == head.keys()
    for key, value in head.items():
        assert torch.equal(loaded.head[key], value.to(getattr(torch, dtype))), key

    got = encode(loaded.backbone.eval(), batch)
    # The same model with its weights rounded as the file stores them: exact but for the
    # order of sums a shrunk model's narrower matrices take.
    reference = model if dtype == "float32" else rounded(pruned(cls, pruning), dtype)
    assert max_diff(got, encode(reference, batch)) <= (1e-5 if layout == "shrunk" else 1e-6)
    if dtype != "float32":
        # Each weight moves by at most half an ulp (eps/2 relative); a LayerNorm after every
        # sublayer keeps the states O(1), so the outputs move by a few eps of the dtype, where
        # a wrong or misplaced tensor moves them by O(1). Nonzero: the values were really cast.
        eps = torch.finfo(getattr(torch, dtype)).eps
        assert 0 < max_diff(got, encode(model, batch)) <= 8 * eps


@KINDS
@PRUNINGS
def test_compressed_load_has_the_ticket_masks_in_torch_prune_layout(cls, pruning, tmp_path):
    model = pruned(cls, pruning)
    ticket = Ticket.from_model(model)
    path = export(model, registry_name(cls), tmp_path / "c.safetensors", "compressed")
    loaded = load(path).backbone
    assert Ticket.from_model(loaded).masks.keys() == ticket.masks.keys()
    for name, mask in ticket.masks.items():
        module = loaded.get_submodule(name.rpartition(".")[0])
        assert "weight_orig" in module._parameters and "weight" not in module._parameters
        assert module.weight_mask.dtype == torch.bool, name
        assert torch.equal(module.weight_mask, mask), name


@KINDS
def test_compressed_is_smaller_than_plain_and_float16_smaller_than_float32(cls, tmp_path):
    model = pruned(cls, "unstructured")
    size = {}
    for layout in ("plain", "compressed"):
        for dtype in ("float32", "float16"):
            path = export(model, registry_name(cls), tmp_path / f"{layout}-{dtype}", layout, dtype)
            size[layout, dtype] = path.stat().st_size
    assert size["compressed", "float32"] < size["plain", "float32"]
    assert size["compressed", "float16"] < size["compressed", "float32"]
    assert size["plain", "float16"] < size["plain", "float32"]


@KINDS
def test_plain_file_is_an_ordinary_state_dict_with_pruned_entries_zero(cls, tmp_path):
    model = pruned(cls, "unstructured")
    ticket = Ticket.from_model(model)
    state = load_file(export(model, registry_name(cls), tmp_path / "p.safetensors"))
    own = {k.removesuffix("_orig") for k in model.state_dict() if not k.endswith("_mask")}
    assert state.keys() == own
    for name, mask in ticket.masks.items():
        assert not state[name][~mask].any(), name
        assert torch.equal(state[name][mask], weight_orig(model, name)[mask]), name
    # Anyone's unpruned model of the architecture takes it as it is and computes the ticket.
    torch.manual_seed(1)
    fresh = cls.build("tiny").eval()
    fresh.load_state_dict(state)
    batch = make_batch(model)
    assert max_diff(encode(fresh, batch), encode(model, batch)) <= 1e-6


@KINDS
def test_shrunk_structured_ticket_is_a_smaller_dense_model(cls, tmp_path):
    model = pruned(cls, "structured")
    plain = export(model, registry_name(cls), tmp_path / "p.safetensors")
    shrunk = export(model, registry_name(cls), tmp_path / "s.safetensors", "shrunk")
    assert shrunk.stat().st_size < plain.stat().st_size
    loaded = load(shrunk).backbone
    assert pruned_parameters(loaded) == []  # nothing left to mask: the cut units are gone
    dense = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in loaded.parameters()) < dense


@KINDS
def test_shrunk_ticket_that_cuts_a_whole_feed_forward_block_loads_back(cls, tmp_path):
    model = pruned(cls, "structured")
    # Structured tickets at high sparsity cut some layers' feed-forward blocks whole.
    block = next(b for b in model.structure() if b.kind == NEURONS)
    for linear, dim in block.parts:
        UnitMask.apply(linear, "weight", keep=torch.zeros(block.units, dtype=torch.bool), dim=dim)
    path = export(model, registry_name(cls), tmp_path / "s.safetensors", "shrunk")
    try:
        loaded, refused = load(path).backbone.eval(), None
    except VLPruneError as exc:
        loaded, refused = None, str(exc)
    assert refused is None, (
        "BUG (vl_prune/pruning/shrink.py, fit_to): export writes a shrunk file whose "
        "feed-forward block has 0 neurons, which shrink() makes and runs exactly, but "
        f"load() refuses it ({refused}): fit_to requires 0 < units for neurons too"
    )
    batch = make_batch(model)
    assert max_diff(encode(loaded, batch), encode(model, batch)) <= 1e-5


@pytest.mark.parametrize("layout", ["plain", "compressed"])
@pytest.mark.parametrize("cls", [Uniter, Vilt], ids=["uniter", "vilt"])
def test_load_grows_embeddings_to_the_exported_ones(cls, layout, tmp_path):
    model = pruned(cls, "unstructured")
    batch = make_batch(model)
    born = model.vocab_size
    if cls is Uniter:
        model.ensure_vocabulary(born + 5)  # words a task's data adds (VCR's person words)
        batch.input_ids[0, 1:3] = torch.tensor([born, born + 4])
    # A second image type for UNITER (born with one), a third for ViLT (born with two).
    image_type = 2 if cls is Uniter else 3
    model.ensure_image_types(image_type)
    batch.image_type = image_type
    path = export(model, registry_name(cls), tmp_path / "g.safetensors", layout)
    loaded = load(path).backbone.eval()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            assert loaded.get_submodule(name).weight.shape == module.weight.shape, name
    assert max_diff(encode(loaded, batch), encode(model, batch)) <= 1e-6


# --- transformers folders, loaded by a process that never imports vl_prune ---------------------

CHILD = r"""
import importlib.abc, json, sys


class NoVlPrune(importlib.abc.MetaPathFinder):
    # Any import of vl_prune fails loudly: the folder must not need it.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("vl_prune", "vl_prune_plugins", "vl_prune_cli"):
            raise ImportError(f"the folder made transformers import {name}")


sys.meta_path.insert(0, NoVlPrune())
import torch
import transformers
from safetensors.torch import load_file, save_file

spec = json.loads(sys.argv[1])
inputs = load_file(spec["inputs"])
outputs = {}
for case, (class_name, folder, extra) in spec["cases"].items():
    model = getattr(transformers, class_name).from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    kwargs = {k.removeprefix(case + "/"): v for k, v in inputs.items() if k.startswith(case + "/")}
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(**kwargs, **extra)
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            outputs[f"{case}/{key}"] = value.contiguous()
    ids = tokenizer(spec["sentences"], padding=True, return_tensors="pt")["input_ids"]
    outputs[f"{case}/tokenized"] = ids
assert "vl_prune" not in sys.modules
save_file(outputs, spec["outputs"])
print(json.dumps(sorted(m for m in sys.modules if m.startswith("vl_prune"))))
"""

# name: backbone, pruning, image type (the ViLT grown from text + 2 image types to text + 3)
TRANSFORMERS = {
    "lxmert": (Lxmert, "unstructured", 1),
    "vilt": (Vilt, "structured", 1),
    "vilt-grown": (Vilt, "unstructured", 3),
}


def transformers_inputs(model: Backbone, image_type: int) -> tuple[dict, dict]:
    """Keyword arguments of the transformers model for a fixed batch: tensors, and the rest."""
    batch = make_batch(model)
    common = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if isinstance(model, Lxmert):
        regions = {
            "visual_feats": batch.region_feats,
            "visual_pos": batch.region_boxes[..., :4].contiguous(),
            "visual_attention_mask": batch.region_mask,
        }
        return {**common, **regions}, {}
    pixels = {"pixel_values": batch.pixel_values, "pixel_mask": batch.pixel_mask}
    return {**common, **pixels}, {"image_token_type_idx": image_type}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each case's pruned backbone, its exported folder, our outputs and the subprocess's."""
    root = tmp_path_factory.mktemp("transformers")
    cases, inputs, ours, spec = {}, {}, {}, {}
    for case, (cls, pruning, image_type) in TRANSFORMERS.items():
        model = pruned(cls, pruning)
        model.ensure_image_types(image_type)
        ticket = Ticket.from_model(model)
        folder = export_transformers(model, root / case)
        tensors, extra = transformers_inputs(model, image_type)
        inputs.update({f"{case}/{k}": v for k, v in tensors.items()})
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.transformers_model()(**tensors, **extra)
        ours[case] = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        spec[case] = [type(model.transformers_model()).__name__, str(folder), extra]
        cases[case] = (model, ticket, folder)
    save_file(inputs, root / "inputs.safetensors")
    request = {
        "inputs": str(root / "inputs.safetensors"),
        "outputs": str(root / "outputs.safetensors"),
        "sentences": SENTENCES,
        "cases": spec,
    }
    child = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(request)],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert child.returncode == 0, child.stderr[-3000:]
    imported = json.loads(child.stdout.strip().splitlines()[-1])
    theirs = load_file(root / "outputs.safetensors")
    return cases, ours, theirs, imported


@pytest.mark.parametrize("case", TRANSFORMERS)
def test_transformers_folder_loads_without_vl_prune_to_the_same_outputs(folders, case):
    cases, ours, theirs, imported = folders
    model, _, _ = cases[case]
    assert imported == []
    theirs = {k.removeprefix(case + "/"): v for k, v in theirs.items() if k.startswith(case + "/")}
    tokenized = theirs.pop("tokenized")
    assert theirs.keys() == ours[case].keys()
    for key, value in ours[case].items():
        assert float((theirs[key] - value).abs().max()) <= 1e-6, key
    mine = model.tokenizer(SENTENCES, padding=True, return_tensors="pt")["input_ids"]
    assert torch.equal(tokenized, mine)


@pytest.mark.parametrize("case", TRANSFORMERS)
def test_transformers_folder_holds_zeros_where_the_ticket_prunes(folders, case):
    cases, *_ = folders
    model, ticket, folder = cases[case]
    state = load_file(folder / "model.safetensors")
    prefix = registry_name(type(model)) + "."  # the wrapper's attribute: lxmert., vilt.
    for name, mask in ticket.masks.items():
        saved = state[name.removeprefix(prefix)]
        assert not saved[~mask].any(), name
        assert torch.equal(saved[mask], weight_orig(model, name)[mask]), name
    # The pruned model in memory keeps its masks: exporting bakes a copy.
    kept = Ticket.from_model(model).masks
    assert kept.keys() == ticket.masks.keys()
    assert all(torch.equal(kept[name], mask) for name, mask in ticket.masks.items())


def test_transformers_config_fits_grown_image_types(folders):
    cases, *_ = folders
    model, _, folder = cases["vilt-grown"]
    config = json.loads((folder / "config.json").read_text())
    rows = model.vilt.embeddings.token_type_embeddings.num_embeddings
    assert rows == IMAGE_TYPES["tiny"] + 1
    assert config["modality_type_vocab_size"] == rows


# --- the command ----------------------------------------------------------------------------


def uniter_checkpoint(path: Path, seed: int) -> Path:
    """A freshly initialised tiny UNITER as a bare state dict."""
    torch.manual_seed(seed)
    save_file(Uniter.build("tiny").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ticket(theta0, tmp_path_factory) -> Path:
    """70% of θ0 pruned by magnitude, saved with the metadata `vlprune find` writes."""
    model = Uniter.build("tiny", theta0)
    weights = current_weights(model, model.prunable_names())
    GlobalMagnitude.prune_group(model.prunable(), amount=0.7)
    found = Ticket.from_model(
        model,
        model.prunable(),
        backbone="uniter",
        preset="tiny",
        task="nlvr2",
        method="imp",
        weights_fingerprint=fingerprint(weights),
    )
    return found.save(tmp_path_factory.mktemp("ticket") / "ticket.safetensors")


@pytest.fixture(scope="module")
def structured_ticket(theta0, tmp_path_factory) -> Path:
    """Half of θ0's prunable weights cut as whole heads and neurons."""
    model = Uniter.build("tiny", theta0)
    weights = current_weights(model, model.prunable_names())
    total = sum(w.numel() for w in weights.values())
    prune_to(model.prunable(), StructuredMagnitude, total // 2, structure=model.structure())
    meta = {"backbone": "uniter", "preset": "tiny", "weights_fingerprint": fingerprint(weights)}
    found = Ticket.from_model(model, model.prunable(), method="structured", **meta)
    return found.save(tmp_path_factory.mktemp("structured") / "ticket.safetensors")


def theta0_pruned(checkpoint: Path, ticket: Path) -> Backbone:
    model = Uniter.build("tiny", checkpoint).eval()
    Ticket.load(ticket).apply(model)
    return model


def vlprune(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_refused(result, *words: str) -> None:
    """One line on stderr, exit code 2, no traceback, naming `words`."""
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("vlprune: error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.stderr, (word, result.stderr)


@pytest.mark.parametrize(
    ("flags", "layout", "dtype"),
    [
        ([], "plain", "float32"),
        (["--format", "compressed"], "compressed", "float32"),
        (["--format", "compressed", "--dtype", "float16"], "compressed", "float16"),
    ],
)
def test_cli_exports_the_ticket_on_theta0(ticket, theta0, tmp_path, flags, layout, dtype):
    out = tmp_path / "x.safetensors"
    result = vlprune("export", ticket, "--checkpoint", theta0, "--out", out, *flags, "--json")
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert written["path"] == str(out) and written["format"] == layout
    assert written["bytes"] == out.stat().st_size
    assert written["sparsity"] == Ticket.load(ticket).sparsity
    loaded = load(out)
    expected = Ticket.load(ticket).metadata["weights_fingerprint"]
    assert loaded.metadata["weights_fingerprint"] == expected
    # The file's values as the ticket on θ0 gives them, rounded to the dtype stored.
    reference = rounded(theta0_pruned(theta0, ticket), dtype)
    batch = make_batch(reference)
    assert max_diff(encode(loaded.backbone.eval(), batch), encode(reference, batch)) <= 1e-5


def test_cli_exports_finetuned_vilt_as_a_transformers_folder_without_its_head(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "vilt-tiny.safetensors"
    save_file(Vilt.build("tiny").state_dict(), checkpoint)
    model = Vilt.build("tiny", checkpoint).eval()
    weights = fingerprint(current_weights(model, model.prunable_names()))
    GlobalMagnitude.prune_group(model.prunable(), amount=0.7)
    meta = {"backbone": "vilt", "preset": "tiny", "weights_fingerprint": weights}
    ticket = Ticket.from_model(model, model.prunable(), **meta).save(tmp_path / "t.safetensors")
    # Fine-tuned weights: other backbone values than θ0's, and a task head beside them.
    torch.manual_seed(1)
    tuned = Vilt.build("tiny").state_dict()
    finetuned = tmp_path / "w.safetensors"
    head = {f"head.{k}": v for k, v in head_tensors().items()}
    save_file({**{f"backbone.{k}": v for k, v in tuned.items()}, **head}, finetuned)
    save_file({k: v.clone() for k, v in tuned.items()}, tmp_path / "tuned.safetensors")

    out = tmp_path / "folder"
    args = ("--checkpoint", checkpoint, "--finetuned", finetuned, "--out", out)
    result = vlprune("export", ticket, *args, "--format", "transformers", "--json")
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert (written["path"], written["format"]) == (str(out), "transformers")
    assert written["bytes"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    # The folder holds the backbone only: the user is told where the head went.
    assert "the head's 2 tensors are not part of a transformers folder" in result.stderr

    expected = Vilt.build("tiny", tmp_path / "tuned.safetensors").eval()
    with pytest.warns(FingerprintMismatch):
        Ticket.load(ticket).apply(expected)
    tensors, extra = transformers_inputs(expected, 1)
    outputs = []
    for hf in (ViltModel.from_pretrained(out).eval(), expected.transformers_model()):
        torch.manual_seed(0)
        with torch.no_grad():
            outputs.append(hf(**tensors, **extra).last_hidden_state)
    assert float((outputs[0] - outputs[1]).abs().max()) <= 1e-6


def test_cli_shrinks_a_structured_ticket_to_a_smaller_file_with_its_outputs(
    structured_ticket, theta0, tmp_path
):
    sizes = {}
    for layout, flags in [("plain", []), ("shrunk", ["--shrink"])]:
        out = tmp_path / f"{layout}.safetensors"
        args = ("--checkpoint", theta0, "--out", out, *flags, "--json")
        result = vlprune("export", structured_ticket, *args)
        assert result.exit_code == 0, result.output
        sizes[layout] = json.loads(result.stdout)["bytes"]
    assert sizes["shrunk"] < sizes["plain"]
    model = theta0_pruned(theta0, structured_ticket)
    batch = make_batch(model)
    loaded = load(tmp_path / "shrunk.safetensors").backbone.eval()
    assert max_diff(encode(loaded, batch), encode(model, batch)) <= 1e-5


def test_cli_shrink_refuses_a_ticket_without_whole_units(ticket, theta0, tmp_path):
    out = tmp_path / "x.safetensors"
    result = vlprune("export", ticket, "--checkpoint", theta0, "--out", out, "--shrink")
    assert_refused(result, "nothing to shrink", "--method structured")
    assert not out.exists()


def test_cli_transformers_format_on_uniter_is_a_one_line_error(ticket, theta0, tmp_path):
    out = tmp_path / "folder"
    result = vlprune(
        "export", ticket, "--checkpoint", theta0, "--out", out, "--format", "transformers"
    )
    assert_refused(result, "uniter-tiny is not a transformers model", "--format plain")
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--format", "transformers", "--shrink"], "--shrink"),
        (["--format", "compressed", "--shrink"], "--shrink"),
        (["--format", "transformers", "--dtype", "float16"], "--dtype"),
    ],
)
def test_cli_refuses_flags_the_format_cannot_hold(ticket, theta0, tmp_path, flags, named):
    out = tmp_path / "x"
    result = vlprune("export", ticket, "--checkpoint", theta0, "--out", out, *flags)
    assert_refused(result, named)
    assert not out.exists()


def test_cli_refuses_an_existing_transformers_folder(ticket, theta0, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    result = vlprune(
        "export", ticket, "--checkpoint", theta0, "--out", out, "--format", "transformers"
    )
    assert_refused(result, str(out), "exists")
    # The library refuses too: a folder someone else filled is never merged into.
    with pytest.raises(VLPruneError, match="not empty"):
        export_transformers(pruned(Lxmert, "unstructured"), out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_cli_refuses_other_weights_unless_forced(ticket, tmp_path):
    other = uniter_checkpoint(tmp_path / "other.safetensors", seed=1)
    out = tmp_path / "x.safetensors"
    refused = vlprune("export", ticket, "--checkpoint", other, "--out", out)
    assert_refused(refused, "--force")
    assert not out.exists()
    forced = vlprune("export", ticket, "--checkpoint", other, "--out", out, "--force")
    assert forced.exit_code == 0, forced.output
    with pytest.warns(FingerprintMismatch):
        model = theta0_pruned(other, ticket)
    batch = make_batch(model)
    assert max_diff(encode(load(out).backbone.eval(), batch), encode(model, batch)) <= 1e-6


def test_cli_refuses_finetuned_weights_with_a_stray_key(ticket, theta0, tmp_path):
    weights = {f"backbone.{k}": v for k, v in load_file(theta0).items()}
    weights["head.classifier.weight"] = torch.zeros(2, 4)
    weights["stray.weight"] = torch.zeros(3)
    finetuned = tmp_path / "w.safetensors"
    save_file(weights, finetuned)
    out = tmp_path / "x.safetensors"
    args = ("--checkpoint", theta0, "--finetuned", finetuned, "--out", out)
    result = vlprune("export", ticket, *args)
    assert_refused(result, str(finetuned), "'stray.weight'")
    assert not out.exists()


def test_evaluate_refuses_save_with_several_seeds(ticket, theta0, world, tmp_path):
    save = tmp_path / "w.safetensors"
    result = vlprune(
        *("evaluate", "--ticket", ticket, "--task", "nlvr2", "--checkpoint", theta0),
        *("--data", world, "--steps", "2", "--batch-size", "8", "--seeds", "2"),
        *("--save", save, "--quiet"),
    )
    assert_refused(result, "--save", "--seeds")
    assert not save.exists()


def test_evaluate_save_then_export_finetuned_keeps_weights_and_score(
    structured_ticket, theta0, world, tmp_path, one_thread
):
    ticket = structured_ticket  # so that every export, --shrink too, has something to do
    common = ("--task", "nlvr2", "--checkpoint", theta0, "--data", world, "--batch-size", "8")
    saved = tmp_path / "w.safetensors"
    train = ("--ticket", ticket, "--steps", "2", "--save", saved)
    trained = vlprune("evaluate", *common, *train, "--quiet", "--json")
    assert trained.exit_code == 0, trained.output
    assert json.loads(trained.stdout)["saved"] == str(saved)
    weights = load_file(saved)
    assert all(k.startswith(("backbone.", "head.")) for k in weights)
    masks = Ticket.load(ticket).masks
    for name, mask in masks.items():
        assert not weights[f"backbone.{name}"][~mask].any(), name

    exports = {}
    layouts = [("plain", []), ("compressed", ["--format", "compressed"]), ("shrunk", ["--shrink"])]
    for layout, flags in layouts:
        exports[layout] = tmp_path / f"{layout}.safetensors"
        args = ("--checkpoint", theta0, "--finetuned", saved, "--out", exports[layout], *flags)
        exported = vlprune("export", ticket, *args)
        assert exported.exit_code == 0, exported.output

    # The plain export is the saved weights, tensor for tensor: trained head, backbone and all.
    plain = load_file(exports["plain"])
    assert plain.keys() == weights.keys()
    for key, value in plain.items():
        assert torch.equal(value, weights[key]), key
    # The compressed one reads back to the same trained weights, masks applied.
    bundle = load(exports["compressed"])
    head = {k.removeprefix("head."): v for k, v in weights.items() if k.startswith("head.")}
    assert bundle.head.keys() == head.keys()
    assert all(torch.equal(bundle.head[k], v) for k, v in head.items())
    assert Ticket.from_model(bundle.backbone).masks.keys() == masks.keys()
    for key, value in bundle.backbone.state_dict().items():
        if not key.endswith("_mask"):
            assert torch.equal(value, weights[f"backbone.{key.removesuffix('_orig')}"]), key

    # An export is fine-tuned weights too: the compressed one exports again to the plain one.
    again = tmp_path / "again.safetensors"
    args = ("--checkpoint", theta0, "--finetuned", exports["compressed"], "--out", again)
    assert vlprune("export", ticket, *args).exit_code == 0
    assert all(torch.equal(v, plain[k]) for k, v in load_file(again).items())
    shrunk_again = ("--checkpoint", theta0, "--finetuned", exports["shrunk"], "--out", again)
    assert_refused(vlprune("export", ticket, *shrunk_again), str(exports["shrunk"]), "shrunk")

    # Every file scores as the trained model did; an export needs no ticket beside it.
    scored = {}
    for what, flags in [
        ("saved", ["--ticket", ticket, "--finetuned", saved]),
        ("plain", ["--finetuned", exports["plain"]]),
        ("compressed", ["--finetuned", exports["compressed"]]),
        ("shrunk", ["--finetuned", exports["shrunk"]]),
    ]:
        result = vlprune("evaluate", *common, "--model", "uniter", *flags, "--quiet", "--json")
        assert result.exit_code == 0, (what, result.output)
        scored[what] = json.loads(result.stdout)
    assert {r["score"] for r in scored.values()} == {json.loads(trained.stdout)["score"]}
    assert {r["sparsity"] for r in scored.values()} == {Ticket.load(ticket).sparsity}
    # A shrunk model's tensors have no room for the ticket's masks.
    both = ("--ticket", ticket, "--finetuned", exports["shrunk"])
    assert_refused(vlprune("evaluate", *common, *both, "--quiet"), str(exports["shrunk"]), "shrunk")


def _damage(path: Path, kind: str) -> None:
    """Rewrite a compressed uniter export with one kind of damage."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as bundle:
        meta = dict(bundle.metadata())
        tensors = {k: bundle.get_tensor(k) for k in bundle.keys()}  # noqa: SIM118
    name = next(k.removesuffix(":kept") for k in tensors if k.endswith(":kept"))
    if kind == "shapes-not-json":
        meta["shapes"] = "{not json"
    elif kind == "shapes-a-list":
        meta["shapes"] = "[1, 2]"
    elif kind == "shape-a-string":
        meta["shapes"] = json.dumps({**json.loads(meta["shapes"]), name: "big"})
    elif kind == "no-backbone":
        del meta["backbone"]
    elif kind == "unknown-layout":
        meta["layout"] = "zipped"
    elif kind == "kept-too-short":
        tensors[name + ":kept"] = tensors[name + ":kept"][:-1]
    elif kind == "kept-integers":
        tensors[name + ":kept"] = tensors[name + ":kept"].to(torch.int32)
    elif kind == "kept-without-mask":
        del tensors[name + ":mask"]
    elif kind == "stray-tensor":
        tensors["encoder.layer.9.extra.weight"] = torch.zeros(2, 2)
    save_file(tensors, path, metadata=meta)


DAMAGES = [
    ("shapes-not-json", "'shapes' is not valid JSON"),
    ("shapes-a-list", "'shapes' is not a JSON object"),
    ("shape-a-string", "bad shape"),
    ("no-backbone", "'backbone' is missing"),
    ("unknown-layout", "unknown layout"),
    ("kept-too-short", "should hold one float"),
    ("kept-integers", "should hold one float"),
    ("kept-without-mask", "lacks its shape, mask or kept values"),
    ("stray-tensor", "is not part of uniter-tiny"),
]


@pytest.mark.parametrize(("kind", "message"), DAMAGES, ids=[d[0] for d in DAMAGES])
def test_a_damaged_export_is_one_error_naming_the_file(kind, message, tmp_path):
    path = export(
        pruned(Uniter, "unstructured"), "uniter", tmp_path / "x.safetensors", "compressed"
    )
    _damage(path, kind)
    with pytest.raises(VLPruneError, match=message) as raised:
        load(path)
    assert str(raised.value).startswith(f"{path}: ")


def test_evaluate_refuses_a_damaged_or_headless_export_in_one_line(theta0, world, tmp_path):
    common = ("--task", "nlvr2", "--checkpoint", theta0, "--data", world, "--quiet")
    headless = export(pruned(Uniter, "unstructured"), "uniter", tmp_path / "h.safetensors")
    assert_refused(vlprune("evaluate", *common, "--finetuned", headless), str(headless), "head")
    damaged = export(
        pruned(Uniter, "unstructured"),
        "uniter",
        tmp_path / "d.safetensors",
        "compressed",
        head=head_tensors(),
    )
    _damage(damaged, "kept-too-short")
    assert_refused(vlprune("evaluate", *common, "--finetuned", damaged), str(damaged))


def test_export_finetuned_refuses_an_export_of_other_masks(ticket, theta0, tmp_path):
    model = Uniter.build("tiny", theta0)
    GlobalMagnitude.prune_group(model.prunable(), amount=0.3)  # not the ticket's 70%
    other = export(model, "uniter", tmp_path / "other.safetensors", "compressed")
    args = ("--checkpoint", theta0, "--finetuned", other, "--out", tmp_path / "x.safetensors")
    assert_refused(vlprune("export", ticket, *args), str(other), "not the ticket's")


def test_load_gives_a_model_to_run(tmp_path):
    path = export(pruned(Uniter, "structured"), "uniter", tmp_path / "x.safetensors", "shrunk")
    # Eval mode, as transformers' from_pretrained: dropout off, the same outputs every call.
    assert not load(path).backbone.training
