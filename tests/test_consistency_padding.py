"""Adversarial training's consistency term ignores padding: the KL of per-token (per-region)
outputs is averaged over real positions only, as VILLA compares real predictions only.

Hand-built MLM outputs, and a freshly initialised tiny UNITER under the pre-training and the
RefCOCO+ heads on a hand-built batch whose second example is padded.
"""

import math

import pytest
import torch

from vl_prune.adversarial import AdversarialSettings, adversarial_backward
from vl_prune.backbone import VLBatch
from vl_prune.errors import VLPruneError
from vl_prune.task import TaskBatch, VLModel, symmetric_kl
from vl_prune.train import TrainSettings, make_accelerator
from vl_prune_plugins.backbones.uniter import Uniter
from vl_prune_plugins.tasks.pretrain import IGNORE, Pretrain
from vl_prune_plugins.tasks.refcoco import MASKED, RefcocoPlus

VOCAB = 7
#: two captions of 5 and 3 real tokens, padded to 5
TEXT_MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
#: two images of 4 and 2 real regions, padded to 4
REGION_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])


def sym_kl_by_hand(a: list[float], b: list[float]) -> float:
    """KL(p‖q) + KL(q‖p) of the softmaxes of two logit vectors, in plain floats."""

    def softmax(x):
        top = max(x)
        e = [math.exp(v - top) for v in x]
        return [v / sum(e) for v in e]

    p, q = softmax(a), softmax(b)
    return sum(pi * math.log(pi / qi) + qi * math.log(qi / pi) for pi, qi in zip(p, q, strict=True))


def mlm_outputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """What PretrainHead gives for the two captions: MLM logits, ITM logits, the text mask."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "mlm": torch.randn(*TEXT_MASK.shape, VOCAB, generator=generator),
        "itm": torch.randn(len(TEXT_MASK), 2, generator=generator),
        "text_mask": TEXT_MASK.clone(),
    }


def wild_padding(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same outputs with the padded positions' MLM logits replaced by large random ones."""
    moved = {key: value.clone() for key, value in outputs.items()}
    padded = TEXT_MASK == 0
    wild = 40 * torch.randn(*TEXT_MASK.shape, VOCAB, generator=torch.Generator().manual_seed(9))
    moved["mlm"][padded] = wild[padded]
    return moved


def test_padded_tokens_leave_the_pretrain_consistency_at_zero(tmp_path):
    clean = mlm_outputs()
    perturbed = wild_padding(clean)
    # The padding does move: averaged over every position, as before, the KL is large.
    assert symmetric_kl(clean["mlm"], perturbed["mlm"]).item() > 1.0
    assert Pretrain(tmp_path).consistency(clean, perturbed).item() == pytest.approx(0, abs=1e-6)


def test_a_moved_real_token_counts_over_the_real_tokens_only(tmp_path):
    clean = mlm_outputs()
    perturbed = wild_padding(clean)
    perturbed["mlm"][1, 2] = torch.tensor([3.0, -1.0, 0.5, 0.0, 2.0, -2.0, 1.0])
    by_hand = sym_kl_by_hand(clean["mlm"][1, 2].tolist(), perturbed["mlm"][1, 2].tolist())
    real = int(TEXT_MASK.sum())  # 8 of the 10 positions
    got = Pretrain(tmp_path).consistency(clean, perturbed).item()
    assert by_hand > 0.1
    assert got == pytest.approx(by_hand / real, rel=1e-5)
    # ITM's term (one prediction per example, none padded) adds its batch mean.
    perturbed["itm"][0] = torch.tensor([2.0, -2.0])
    itm = sym_kl_by_hand(clean["itm"][0].tolist(), [2.0, -2.0]) / 2
    got = Pretrain(tmp_path).consistency(clean, perturbed).item()
    assert got == pytest.approx(by_hand / real + itm, rel=1e-5)


def test_symmetric_kl_mask_checks_its_shape_and_survives_no_real_position():
    clean, perturbed = torch.randn(2, 5, VOCAB), torch.randn(2, 5, VOCAB)
    ones = torch.ones(2, 5, dtype=torch.long)
    # An all-real mask is the plain mean; without one nothing changed.
    assert symmetric_kl(clean, perturbed, mask=ones).item() == pytest.approx(
        symmetric_kl(clean, perturbed).item(), rel=1e-6
    )
    assert symmetric_kl(clean, perturbed, mask=torch.zeros_like(ones)).item() == 0.0
    with pytest.raises(VLPruneError, match=r"the mask is \(2, 5, 7\)"):
        symmetric_kl(clean, perturbed, mask=torch.ones(2, 5, VOCAB))


@pytest.fixture(scope="module")
def uniter() -> Uniter:
    torch.manual_seed(0)
    return Uniter.build("tiny").eval()


def padded_batch(backbone: Uniter) -> VLBatch:
    torch.manual_seed(1)
    ids = torch.randint(5, backbone.vocab_size, TEXT_MASK.shape) * TEXT_MASK  # pad id 0
    regions = REGION_MASK.shape
    corners = torch.rand(*regions, 2) * 0.5
    sizes = torch.rand(*regions, 2) * 0.4 + 0.1
    boxes = torch.cat([corners, corners + sizes, sizes], dim=-1)
    return VLBatch(
        input_ids=ids,
        attention_mask=TEXT_MASK.clone(),
        region_feats=torch.randn(*regions, backbone.img_dim) * REGION_MASK.unsqueeze(-1),
        region_boxes=boxes,
        region_mask=REGION_MASK.clone(),
    )


def padding_only_deltas(backbone: Uniter, batch: VLBatch) -> list:
    """Large perturbations of the padded words' embeddings and padded regions' features only:
    the backbone's attention ignores padding, so real positions' outputs stay as they were."""
    text_shape, image_shape = backbone.perturbation_shapes(batch)
    text = 30 * torch.randn(text_shape) * (1 - TEXT_MASK).unsqueeze(-1)
    image = 30 * torch.randn(image_shape) * (1 - REGION_MASK).unsqueeze(-1)
    return [(text, image)]


def test_perturbed_padding_leaves_the_pretrain_consistency_at_zero(tmp_path, uniter, one_thread):
    task = Pretrain(tmp_path)
    model = VLModel(uniter, task.head(uniter)).eval()
    batch = padded_batch(uniter)
    targets = {"mlm": torch.full(TEXT_MASK.shape, IGNORE), "itm": torch.tensor([1, 0])}
    with torch.no_grad():
        clean = model(_task_batch(batch, targets))
        perturbed = model(_task_batch(batch, targets), deltas=padding_only_deltas(uniter, batch))
    assert task.consistency(clean, perturbed).item() == pytest.approx(0, abs=1e-6)
    # The padded tokens' predictions did move: averaged over them too, the term is not 0.
    assert symmetric_kl(clean["mlm"], perturbed["mlm"]).item() > 1e-3
    assert torch.equal(clean["text_mask"], TEXT_MASK)


def test_the_text_mask_output_passes_through_loss_predict_and_an_adversarial_step(
    tmp_path, uniter, one_thread
):
    task = Pretrain(tmp_path)
    model = VLModel(uniter, task.head(uniter)).train(False)
    batch = padded_batch(uniter)
    labels = torch.full(TEXT_MASK.shape, IGNORE)
    labels[0, 1], labels[1, 2] = 7, 9
    mrfr_mask = torch.tensor([[True, False, False, False], [False, True, False, False]])
    targets = {
        "mlm": labels,
        "itm": torch.tensor([1, 0]),
        "mrfr": batch.region_feats * mrfr_mask.unsqueeze(-1),
        "mrfr_mask": mrfr_mask,
    }
    # Evaluation gathers what predict gives: the mask is not among it.
    assert set(task.predict(model(_task_batch(batch, targets)))) == {"mlm", "itm"}
    settings = AdversarialSettings(steps=2, lr=0.05)
    step = adversarial_backward(
        model, task, _task_batch(batch, targets), settings, make_accelerator(TrainSettings())
    )
    assert torch.isfinite(step.loss)
    assert all(math.isfinite(loss) for loss in step.perturbed_losses)
    assert model.head.mlm[-1].weight.grad.abs().sum() > 0
    model.zero_grad()


def test_perturbed_padded_regions_leave_the_refcoco_consistency_at_zero(
    tmp_path, uniter, one_thread
):
    task = RefcocoPlus(tmp_path)
    model = VLModel(uniter, task.head(uniter)).eval()
    batch = padded_batch(uniter)
    targets = {"region": torch.tensor([0, 1]), "box": batch.region_boxes[:, 0, :4]}
    with torch.no_grad():
        clean = model(_task_batch(batch, targets))
        perturbed = model(_task_batch(batch, targets), deltas=padding_only_deltas(uniter, batch))
    # Padded regions are scored MASKED in both, so their softmax share is exactly 0; the KL is
    # over the regions of each (real) example, averaged over the examples.
    padded = REGION_MASK == 0
    assert (clean["scores"][padded] == MASKED).all()
    assert (perturbed["scores"][padded] == MASKED).all()
    assert task.consistency(clean, perturbed).item() == pytest.approx(0, abs=1e-6)
    # Without that masking the padded regions' scores would have moved the term.
    scorer = model.head.scorer
    with torch.no_grad():
        states = uniter(batch).image_states
        moved = uniter(batch, *padding_only_deltas(uniter, batch)[0]).image_states
        unmasked = symmetric_kl(scorer(states).squeeze(-1), scorer(moved).squeeze(-1))
    assert unmasked.item() > 1e-3


def _task_batch(batch: VLBatch, targets) -> TaskBatch:
    # A fresh TaskBatch around the same VLBatch: the perturbations are keyed by that object.
    return TaskBatch([batch], targets)
