"""Image stores and batch encoding: npz folders, UNITER img_db folders, PNGs, and the VLBatch each
backbone gets from texts or txt_db token ids (shapes, padding, masks, truncation)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import uniter_release as ur
from PIL import Image

import vl_prune.data.inputs as inputs_module
from vl_prune.backbone import Inputs
from vl_prune.data.inputs import ImageStore, encode
from vl_prune.data.regions import FeatureCache
from vl_prune.errors import VLPruneError
from vl_prune.tokenizers import local_tokenizer
from vl_prune_plugins.backbones.lxmert import Lxmert
from vl_prune_plugins.backbones.uniter import Uniter
from vl_prune_plugins.backbones.vilt import Vilt

IMG_DIM = 64


def region_dump(regions: int, seed: int) -> dict[str, np.ndarray]:
    """One image's detector output in UNITER's npz layout, every region confident."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 0.5, (regions, 2))
    wh = rng.uniform(0.1, 0.5, (regions, 2))
    return {
        "features": rng.standard_normal((regions, IMG_DIM)).astype(np.float16),
        "norm_bb": np.concatenate([xy, xy + wh, wh], 1).astype(np.float32),
        "conf": rng.uniform(0.3, 1.0, regions).astype(np.float32),
    }


def write_npz(root: Path, name: str, dump: dict[str, np.ndarray]) -> Path:
    (root / "features").mkdir(parents=True, exist_ok=True)
    path = root / "features" / f"{name}.npz"
    np.savez_compressed(path, **dump)
    return path


def write_png(root: Path, name: str, size: tuple[int, int] = (64, 64)) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(root / "images" / f"{name}.png")


@pytest.fixture(scope="module")
def uniter() -> Uniter:
    return Uniter.build("tiny").eval()


# --- where an image's regions come from -------------------------------------------------------


def test_npz_file_wins_over_img_db_and_split_folders_are_optional(tmp_path):
    npz = region_dump(2, seed=1)
    write_npz(tmp_path, "both", npz)
    stored = {
        "both.npz": ur.detection("stored", 100, IMG_DIM, above=15),
        "lmdb-only.npz": ur.detection("lmdb-only", 100, IMG_DIM, above=15),
    }
    # No split folder between img_db/ and the LMDB folder.
    ur.write_img_db(tmp_path / "img_db", stored)
    store = ImageStore(tmp_path)
    np.testing.assert_array_equal(store.regions("both")["features"], npz["features"])
    np.testing.assert_array_equal(
        store.regions("lmdb-only")["features"],
        stored["lmdb-only.npz"]["features"][:15].astype(np.float16),
    )
    assert store.has("both") and store.has("lmdb-only") and not store.has("nowhere")


def test_feature_file_is_cut_by_uniters_rule_and_without_conf_keeps_every_region(tmp_path):
    (tmp_path / "features").mkdir()
    detected = ur.detection("detected", 100, IMG_DIM, above=30)
    ur.write_npz_file(tmp_path / "features" / "detected.npz", detected)
    assert len(ImageStore(tmp_path).regions("detected")["features"]) == 30
    few = ur.detection("few", 100, IMG_DIM, above=2)
    ur.write_npz_file(tmp_path / "features" / "few.npz", few)
    regions = ImageStore(tmp_path).regions("few")
    assert len(regions["features"]) == 10  # min_bb
    np.testing.assert_array_equal(regions["features"], few["features"][:10].astype(np.float16))
    no_conf = region_dump(120, 3)
    del no_conf["conf"]
    write_npz(tmp_path, "gt", no_conf)
    assert len(ImageStore(tmp_path).regions("gt")["features"]) == 120


def test_feature_files_are_read_once_then_again_when_rewritten(tmp_path):
    path = write_npz(tmp_path, "a", region_dump(3, seed=0))
    cache = FeatureCache(limit=1 << 20)
    first = cache.get(path)
    assert cache.get(path) is first  # no second read
    assert not first["features"].flags.writeable  # shared by every later batch
    write_npz(tmp_path, "a", region_dump(5, seed=1))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
    assert len(cache.get(path)["features"]) == 5


def test_feature_cache_keeps_to_its_byte_bound(tmp_path):
    paths = [write_npz(tmp_path, f"im{i}", region_dump(8, seed=i)) for i in range(4)]
    one = sum(a.nbytes for a in FeatureCache(1 << 20).get(paths[0]).values())
    cache = FeatureCache(limit=2 * one)
    kept = [cache.get(p) for p in paths[:2]]
    cache.get(paths[0])  # now the most recently used
    cache.get(paths[2])  # drops im1, the least recently used
    assert cache.size <= 2 * one
    assert cache.get(paths[0]) is kept[0]
    assert cache.get(paths[1]) is not kept[1]


def test_missing_or_unreadable_files_are_errors_naming_them(tmp_path):
    store = ImageStore(tmp_path)
    with pytest.raises(VLPruneError, match=r"features/gone\.npz: region features of image 'gone'"):
        store.regions("gone")
    with pytest.raises(VLPruneError, match=r"images/gone\.png: image 'gone' is missing"):
        store.picture("gone")
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(VLPruneError, match=r"features/bad\.npz: not readable npz"):
        store.regions("bad")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(VLPruneError, match=r"images/bad\.png: not a readable image"):
        store.picture("bad")
    with pytest.raises(VLPruneError, match=r"train\.json:4: image gone is missing"):
        store.require("gone", "train.json:4")


def test_a_tuple_of_names_reads_their_regions_in_order(tmp_path, uniter):
    gt = region_dump(3, seed=5)
    write_npz(tmp_path, "vcr_gt_val_movie", gt)
    ur.write_img_db(
        tmp_path / "img_db" / "vcr_val",
        {"vcr_val_movie.npz": ur.detection("vcr_val_movie", 100, IMG_DIM, above=12)},
        form="npz-legacy",
    )
    store = ImageStore(tmp_path)
    name = ("vcr_gt_val_movie", "vcr_val_movie")
    regions = store.regions(name)
    alone = store.regions("vcr_val_movie")
    np.testing.assert_array_equal(
        regions["features"], np.concatenate([gt["features"], alone["features"]])
    )
    np.testing.assert_array_equal(
        regions["norm_bb"], np.concatenate([gt["norm_bb"], alone["norm_bb"]])
    )
    assert len(regions["features"]) == 3 + 12
    assert store.has(name) and not store.has(("vcr_gt_val_movie", "gone"))
    store.require(name, "val.jsonl:1")
    batch = encode(["a person ."], [name], uniter, store)
    assert batch.region_mask.tolist() == [[1] * 15]
    assert torch.equal(batch.region_feats[0], torch.from_numpy(regions["features"]))


def test_resolve_gives_the_name_an_image_is_read_under(tmp_path):
    write_npz(tmp_path, "own", region_dump(2, 0))
    write_png(tmp_path, "picture")
    ur.write_img_db(
        tmp_path / "img_db" / "nlvr2_dev",
        {
            "nlvr2_dev-1-img0.npz": ur.detection("prefixed", 20, IMG_DIM, above=12),
            "dev-1-img0.npz": ur.detection("bare", 20, IMG_DIM, above=12),
            "plain.npz": ur.detection("plain", 20, IMG_DIM, above=12),
        },
    )
    store = ImageStore(tmp_path, keys=lambda name: [f"nlvr2_{name}.npz"])
    assert store.resolve("own", "x") == "own"
    assert store.resolve("picture", "x") == "picture"
    # The task's keys come first; the name itself (with .npz) is tried last.
    assert store.resolve("dev-1-img0", "x") == "nlvr2_dev-1-img0.npz"
    assert store.resolve("plain", "x") == "plain.npz"
    assert store.resolve("plain.npz", "x") == "plain.npz"
    np.testing.assert_array_equal(
        store.regions(store.resolve("dev-1-img0", "x"))["features"],
        store.regions("dev-1-img0")["features"],
    )
    with pytest.raises(
        VLPruneError,
        match=re.escape("dev.json:7: image gone is missing (no features/gone.npz, ")
        + r".*img_db entry nlvr2_gone\.npz, gone, gone\.npz or line of an \*obj\*\.tsv\)",
    ):
        store.resolve("gone", "dev.json:7")


# --- batches --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", [Uniter, Lxmert])
def test_region_batches_are_padded_and_masked(tmp_path, backbone):
    model = backbone.build("tiny")
    model.ensure_image_types(2)
    lengths = [5, 2, 7]
    for i, n in enumerate(lengths):
        write_npz(tmp_path, f"img{i}", region_dump(n, seed=i))
    texts = ["a red circle .", "there are exactly two blue squares in the left image .", "yes"]
    batch = encode(texts, ["img0", "img1", "img2"], model, ImageStore(tmp_path), image_type=2)

    assert batch.image_type == 2
    assert batch.region_feats.shape == (3, 7, IMG_DIM)
    assert batch.region_feats.dtype == torch.float16
    assert batch.region_boxes.shape == (3, 7, 6)
    assert batch.region_mask.tolist() == [[1] * n + [0] * (7 - n) for n in lengths]
    assert not batch.region_feats[1, 2:].any() and not batch.region_boxes[1, 2:].any()
    stored = region_dump(5, seed=0)
    assert torch.equal(batch.region_feats[0, :5], torch.from_numpy(stored["features"]))
    assert torch.equal(batch.region_boxes[0, :5], torch.from_numpy(stored["norm_bb"]))
    # Texts are padded to the longest; padding is masked out and uses the [PAD] id.
    ids, attention = batch.input_ids, batch.attention_mask
    assert ids.shape == attention.shape == (3, attention.sum(1).max())
    assert attention.sum(1).tolist() == [len(t.split()) + 2 for t in texts]
    assert (ids[attention == 0] == model.tokenizer.pad_token_id).all()
    assert model(batch).pooled.shape == (3, model.hidden_size)


def test_pixel_batches_for_vilt(tmp_path):
    model = Vilt.build("tiny")
    write_png(tmp_path, "small", (64, 64))
    write_png(tmp_path, "wide", (96, 64))
    batch = encode(["a red circle .", "a star ."], ["small", "wide"], model, ImageStore(tmp_path))
    assert batch.region_feats is None
    # The shorter side is scaled to 64; the wider image sets the width, the other is padded.
    assert batch.pixel_values.shape == (2, 3, 64, 96)
    assert batch.pixel_mask.shape == (2, 64, 96)
    assert batch.pixel_mask[0, :, :64].all() and not batch.pixel_mask[0, :, 64:].any()
    assert batch.pixel_mask[1].all()
    assert model(batch).pooled.shape == (2, model.hidden_size)


def test_features_of_the_wrong_width_are_a_clear_error(tmp_path, uniter):
    (tmp_path / "features").mkdir()
    np.savez(
        tmp_path / "features" / "wide.npz",
        features=np.zeros((3, 2048), np.float16),
        norm_bb=np.zeros((3, 6), np.float32),
    )
    with pytest.raises(VLPruneError, match=r"'wide' are 2048-d; .*tiny reads 64-d"):
        encode(["a star"], ["wide"], uniter, ImageStore(tmp_path))


# --- texts through the backbone's tokenizer -------------------------------------------------------

WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cube", "is", "left", "##s"]


@pytest.mark.parametrize("tokenizer", ["world", "wordpiece", "wordpiece, padded left"])
def test_texts_are_tokenised_as_the_tokenizers_own_batch_call_gives(tmp_path, uniter, tokenizer):
    # Each distinct text is tokenised once and kept; the batch must still be, bit for bit, what
    # the tokenizer's own padded batch call gives: ids, mask and token types.
    if tokenizer == "world":
        texts, pairs = ["a red cube", "the small blue sphere is left of it", "a red cube"], None
        known = uniter.tokenizer
    else:
        (tmp_path / "vocab.txt").write_text("\n".join(WORDPIECE) + "\n")
        known = local_tokenizer(tmp_path / "vocab.txt", lowercase=True)
        known.padding_side = "left" if "left" in tokenizer else "right"
        texts = ["a red cube", "cubes is left", "a red cube", "red " * 30]
        pairs = ["is left", "a", "is left", "cube"]
    write_npz(tmp_path, "img", region_dump(4, seed=0))
    inputs = Inputs(uniter.label, "regions", lambda: known, img_dim=IMG_DIM)
    settings = [(60, "right"), (6, "right")]
    if tokenizer != "world":  # the world's tokenizer is the module's: left as it is
        settings.append((6, "left"))
    for max_length, cut_side in settings:
        known.truncation_side = cut_side
        expected = known(
            texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        for _ in range(2):  # tokenised, then from what was kept
            batch = encode(
                texts,
                ["img"] * len(texts),
                inputs,
                ImageStore(tmp_path),
                pairs=pairs,
                max_length=max_length,
            )
            assert torch.equal(batch.input_ids, expected["input_ids"])
            assert torch.equal(batch.attention_mask, expected["attention_mask"])
            if "token_type_ids" in expected:
                assert torch.equal(batch.token_type_ids, expected["token_type_ids"])
            else:
                assert batch.token_type_ids is None


def test_kept_tokens_keep_to_their_bound_and_every_batch_gets_all_its_texts(
    tmp_path, uniter, monkeypatch
):
    monkeypatch.setattr(inputs_module, "TOKENS_KEPT", 2)
    write_npz(tmp_path, "img", region_dump(4, seed=0))
    known = uniter.tokenizer
    for texts in (["a red cube", "a blue cube"], ["a red cube", "the red sphere", "a cube"]):
        # the second batch has a kept text, and more new ones than the bound leaves room for
        batch = encode(texts, ["img"] * len(texts), uniter, ImageStore(tmp_path))
        expected = known(texts, padding=True, truncation=True, max_length=60, return_tensors="pt")
        assert torch.equal(batch.input_ids, expected["input_ids"])
        assert torch.equal(batch.attention_mask, expected["attention_mask"])
        assert len(inputs_module._TOKENS[known]) <= 2


# --- token ids from a txt_db ----------------------------------------------------------------------

CLS, SEP = 2, 3  # the tiny tokenizer's


@pytest.fixture
def one_image(tmp_path) -> ImageStore:
    write_npz(tmp_path, "img", region_dump(4, seed=0))
    return ImageStore(tmp_path)


def test_token_ids_are_padded_with_zero_and_masked(one_image, uniter):
    texts = [(CLS, 10, 11, 12, SEP), (CLS, 20, SEP)]
    batch = encode(texts, ["img", "img"], uniter, one_image)
    assert batch.input_ids.tolist() == [[CLS, 10, 11, 12, SEP], [CLS, 20, SEP, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch.token_type_ids.tolist() == [[0] * 5] * 2  # UNITER: every token is type 0
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.long
    assert batch.region_mask.tolist() == [[1] * 4] * 2
    assert uniter(batch).pooled.shape == (2, uniter.hidden_size)


def test_token_id_pairs_follow_the_first_segment(one_image, uniter):
    texts = [(CLS, 10, SEP), (CLS, 20, 21, SEP)]
    pairs = [(30, 31, SEP), (40, SEP)]
    batch = encode(texts, ["img", "img"], uniter, one_image, pairs=pairs)
    assert batch.input_ids.tolist() == [
        [CLS, 10, SEP, 30, 31, SEP],
        [CLS, 20, 21, SEP, 40, SEP],
    ]
    assert batch.attention_mask.tolist() == [[1] * 6] * 2


def test_token_ids_are_cut_to_max_length_keeping_the_final_sep(one_image, uniter):
    texts = [(CLS, *range(10, 30), SEP), (CLS, 10, SEP)]
    batch = encode(texts, ["img", "img"], uniter, one_image, max_length=6)
    assert batch.input_ids.tolist() == [[CLS, 10, 11, 12, 13, SEP], [CLS, 10, SEP, 0, 0, 0]]
    assert batch.attention_mask.sum(1).tolist() == [6, 3]
    paired = encode(
        [(CLS, 10, 11, SEP)], ["img"], uniter, one_image, pairs=[(20, 21, 22, SEP)], max_length=5
    )
    assert paired.input_ids.tolist() == [[CLS, 10, 11, SEP, SEP]]


def test_token_ids_outside_the_vocabulary_are_refused(one_image, uniter):
    size = uniter.vocab_size
    with pytest.raises(
        VLPruneError,
        match=rf"token id {size} of the txt_db's texts is outside the backbone's vocabulary "
        rf"of {size}",
    ):
        encode([(CLS, size, SEP)], ["img"], uniter, one_image)
    with pytest.raises(
        VLPruneError, match=rf"token id {size + 3} of the txt_db's texts is outside"
    ):
        encode([(CLS, 5, SEP)], ["img"], uniter, one_image, pairs=[(size + 3, SEP)])
    # A task head that adds words (VCR's person tags) raises the bound by their number.
    batch = encode([(CLS, size, size + 1, SEP)], ["img"], uniter, one_image, new_words=2)
    assert batch.input_ids.tolist() == [[CLS, size, size + 1, SEP]]
    with pytest.raises(VLPruneError, match=rf"token id {size + 2} of .* of {size + 2} words"):
        encode([(CLS, size + 2, SEP)], ["img"], uniter, one_image, new_words=2)
