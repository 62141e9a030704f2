"""Image stores and batch encoding: npz folders, UNITER img_db (LMDB) folders, PNGs, and the
VLBatch each backbone gets (shapes, padding, masks)."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vl_prune.errors import VLPruneError
from vl_prune_plugins.backbones.lxmert import Lxmert
from vl_prune_plugins.backbones.uniter import Uniter
from vl_prune_plugins.backbones.vilt import Vilt
from vl_prune_plugins.tasks.inputs import ImageStore, _FeatureCache, encode

lmdb = pytest.importorskip("lmdb")

IMG_DIM = 64
UNITER_DB = "feat_th0.2_max100_min10_compressed"
NBB_FILE = "nbb_th0.2_max100_min10.json"


def region_dump(regions: int, seed: int) -> dict[str, np.ndarray]:
    """One image's detector output in UNITER's npz layout."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 0.5, (regions, 2))
    wh = rng.uniform(0.1, 0.5, (regions, 2))
    return {
        "features": rng.standard_normal((regions, IMG_DIM)).astype(np.float16),
        "norm_bb": np.concatenate([xy, xy + wh, wh], 1).astype(np.float32),
        "conf": rng.uniform(0.3, 1.0, regions).astype(np.float32),
    }


def write_npz(root: Path, name: str, dump: dict[str, np.ndarray]) -> None:
    (root / "features").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(root / "features" / f"{name}.npz", **dump)


def write_png(root: Path, name: str, size: tuple[int, int] = (64, 64)) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(root / "images" / f"{name}.png")


def npz_bytes(dump: dict[str, np.ndarray]) -> bytes:
    out = io.BytesIO()
    np.savez_compressed(out, **dump)
    return out.getvalue()


def write_img_db(
    split: Path,
    entries: dict[str, bytes],
    db_name: str = UNITER_DB,
    box_counts: dict[str, int] | None = None,
) -> Path:
    """An LMDB folder as UNITER's convert_imgdir.py writes it: one value per feature file name,
    a `__keys__` entry listing them, and the nbb json beside the folder."""
    split.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(split / db_name), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in entries.items():
            txn.put(key.encode("utf-8"), value)
        txn.put(b"__keys__", json.dumps(list(entries)).encode("utf-8"))
    env.close()
    if box_counts is not None:
        (split / NBB_FILE).write_text(json.dumps(box_counts))
    return split / db_name


def as_uniter_converts(dump: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """convert_imgdir.py stores every float32 array as float16."""
    return {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in dump.items()}


@pytest.fixture(scope="module")
def uniter() -> Uniter:
    return Uniter.build("tiny").eval()


def test_img_db_reads_the_same_regions_as_the_npz_folder(tmp_path, uniter):
    names = ["dev-850-0-img0", "dev-850-0-img1", "dev-850-2-img0"]
    dumps = {name: region_dump(3 + i, seed=i) for i, name in enumerate(names)}
    npz_root, db_root = tmp_path / "npz", tmp_path / "lmdb"
    for name, dump in dumps.items():
        write_npz(npz_root, name, dump)
    # UNITER's keys carry the data set: nlvr2_dev-850-0-img0.npz.
    write_img_db(
        db_root / "img_db" / "nlvr2_dev",
        {f"nlvr2_{n}.npz": npz_bytes(as_uniter_converts(dump)) for n, dump in dumps.items()},
        box_counts={f"nlvr2_{n}.npz": len(dump["conf"]) for n, dump in dumps.items()},
    )
    from_npz, from_db = ImageStore(npz_root), ImageStore(db_root, key_prefix="nlvr2_")
    assert not (db_root / "features").exists()
    for name in names:
        a, b = from_npz.regions(name), from_db.regions(name)
        np.testing.assert_array_equal(a["features"], b["features"])
        np.testing.assert_allclose(a["norm_bb"], b["norm_bb"], atol=1e-3)
        assert b["norm_bb"].dtype == np.float32
    texts = ["a red circle .", "there are two objects ."]
    x = encode(texts, names[1:], uniter, from_npz)
    y = encode(texts, names[1:], uniter, from_db)
    assert torch.equal(x.region_feats, y.region_feats)
    assert torch.equal(x.region_mask, y.region_mask)
    torch.testing.assert_close(x.region_boxes, y.region_boxes, atol=1e-3, rtol=0)


def test_npz_file_wins_over_img_db_and_split_folders_are_optional(tmp_path):
    npz, stored = region_dump(2, seed=1), region_dump(4, seed=2)
    write_npz(tmp_path, "both", npz)
    # No split folder between img_db/ and the LMDB folder; a bare key (no .npz) is found too.
    write_img_db(tmp_path / "img_db", {"both": npz_bytes(stored), "lmdb-only": npz_bytes(stored)})
    store = ImageStore(tmp_path)
    assert len(store.regions("both")["features"]) == 2
    np.testing.assert_array_equal(store.regions("lmdb-only")["features"], stored["features"])
    assert store.has("both") and store.has("lmdb-only") and not store.has("nowhere")


def test_img_db_keeps_the_boxes_uniter_keeps(tmp_path):
    dump = region_dump(12, seed=3)
    dump["conf"] = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.1, 0.1, 0.05, 0.0])
    # nbb stored beside the LMDB: the first nbb regions (detectors sort by confidence).
    write_img_db(
        tmp_path / "a" / "img_db" / "s", {"x.npz": npz_bytes(dump)}, box_counts={"x.npz": 3}
    )
    np.testing.assert_array_equal(
        ImageStore(tmp_path / "a").regions("x")["features"], dump["features"][:3]
    )
    # Without it, UNITER's compute_num_bb from the folder's settings: 8 have conf > 0.2 ...
    write_img_db(
        tmp_path / "b" / "img_db" / "s", {"x.npz": npz_bytes(dump)}, "feat_th0.2_max100_min2"
    )
    assert len(ImageStore(tmp_path / "b").regions("x")["features"]) == 8
    # ... but never fewer than min_bb nor more than max_bb.
    write_img_db(
        tmp_path / "c" / "img_db" / "s", {"x.npz": npz_bytes(dump)}, "feat_th0.2_max100_min10"
    )
    assert len(ImageStore(tmp_path / "c").regions("x")["features"]) == 10
    write_img_db(
        tmp_path / "d" / "img_db" / "s", {"x.npz": npz_bytes(dump)}, "feat_th0.2_max5_min2"
    )
    assert len(ImageStore(tmp_path / "d").regions("x")["features"]) == 5


def test_missing_img_db_key_names_the_image_and_the_folder(tmp_path):
    folder = write_img_db(
        tmp_path / "img_db" / "nlvr2_dev", {"a.npz": npz_bytes(region_dump(2, 0))}
    )
    with pytest.raises(VLPruneError, match=rf"{folder}: image 'dev-1-0-img1' is not in the img_db"):
        ImageStore(tmp_path).regions("dev-1-0-img1")
    with pytest.raises(VLPruneError, match=r"looked up nlvr2_x\.npz, nlvr2_x, x\.npz, x\)"):
        ImageStore(tmp_path, key_prefix="nlvr2_").regions("x")


def test_img_db_without_lmdb_installed_says_what_to_install(tmp_path, monkeypatch):
    write_img_db(tmp_path / "img_db" / "s", {"a.npz": npz_bytes(region_dump(2, 0))})
    monkeypatch.setitem(sys.modules, "lmdb", None)
    with pytest.raises(VLPruneError, match=r"install vl-prune\[lmdb\] to read UNITER img_db"):
        ImageStore(tmp_path).regions("a")


def test_several_img_db_folders_need_a_choice(tmp_path):
    dump = region_dump(4, 0)
    split = tmp_path / "img_db" / "nlvr2_dev"
    write_img_db(split, {"a.npz": npz_bytes(dump)}, "feat_th0.2_max100_min10_compressed")
    write_img_db(split, {"a.npz": npz_bytes(dump)}, "feat_th0.2_max2_min1")
    with pytest.raises(VLPruneError, match=rf"{split}: several img_db folders"):
        ImageStore(tmp_path).regions("a")
    chosen = ImageStore(tmp_path, img_db="feat_th0.2_max2_min1").regions("a")
    assert len(chosen["features"]) == 2


def test_img_db_folder_without_an_lmdb_is_an_error(tmp_path):
    (tmp_path / "img_db" / "nlvr2_dev").mkdir(parents=True)
    with pytest.raises(VLPruneError, match=r"img_db: no feat_th\*_max\*_min\* LMDB folder"):
        ImageStore(tmp_path).regions("a")


def test_msgpack_img_db_values_are_refused_clearly(tmp_path):
    # convert_imgdir.py without --compress stores msgpack maps (first byte 0x8N: fixmap).
    write_img_db(tmp_path / "img_db" / "s", {"a.npz": b"\x83\xa8features\xc0"})
    with pytest.raises(VLPruneError, match=r"entry 'a.npz' is not npz.*--compress"):
        ImageStore(tmp_path).regions("a")


def test_feature_files_are_read_once_then_again_when_rewritten(tmp_path):
    write_npz(tmp_path, "a", region_dump(3, seed=0))
    path = tmp_path / "features" / "a.npz"
    cache = _FeatureCache(limit=1 << 20)
    first = cache.get(path)
    assert cache.get(path) is first  # no second read
    assert not first["features"].flags.writeable  # shared by every later batch
    write_npz(tmp_path, "a", region_dump(5, seed=1))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
    assert len(cache.get(path)["features"]) == 5


def test_feature_cache_keeps_to_its_byte_bound(tmp_path):
    for i in range(4):
        write_npz(tmp_path, f"im{i}", region_dump(8, seed=i))
    paths = [tmp_path / "features" / f"im{i}.npz" for i in range(4)]
    one = sum(a.nbytes for a in _FeatureCache(1 << 20).get(paths[0]).values())
    cache = _FeatureCache(limit=2 * one)
    kept = [cache.get(p) for p in paths[:2]]
    cache.get(paths[0])  # now the most recently used
    cache.get(paths[2])  # drops im1, the least recently used
    assert cache.size <= 2 * one
    assert cache.get(paths[0]) is kept[0]
    assert cache.get(paths[1]) is not kept[1]


def test_missing_feature_file_and_image_are_errors_naming_them(tmp_path):
    store = ImageStore(tmp_path)
    with pytest.raises(VLPruneError, match=r"features/gone\.npz: region features of image 'gone'"):
        store.regions("gone")
    with pytest.raises(VLPruneError, match=r"images/gone\.png: image 'gone' is missing"):
        store.picture("gone")
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(VLPruneError, match=r"bad\.npz: not a region feature file"):
        store.regions("bad")


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


def test_features_of_the_wrong_width_are_a_clear_error(tmp_path):
    (tmp_path / "features").mkdir()
    np.savez(
        tmp_path / "features" / "wide.npz",
        features=np.zeros((3, 2048), np.float16),
        norm_bb=np.zeros((3, 6), np.float32),
    )
    with pytest.raises(VLPruneError, match="'wide' are 2048-d; Uniter tiny reads 64-d"):
        encode(["a star"], ["wide"], Uniter.build("tiny"), ImageStore(tmp_path))
