"""UNITER's img_db (vl_prune.data.img_db): every LMDB layout and value form convert_imgdir.py
writes gives the regions UNITER's DetectFeatLmdb gives, the same image reads the same through a
per-image npz file or an img_db, and damaged or foreign databases are errors naming the folder."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import signal
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import lmdb
import msgpack_numpy
import numpy as np
import pytest
import torch
import uniter_release as ur

from vl_prune.data.img_db import ImgDb, open_img_db
from vl_prune.data.inputs import ImageStore, encode
from vl_prune.data.lmdb_files import environment
from vl_prune.errors import VLPruneError
from vl_prune_plugins.backbones.uniter import Uniter

IMG_DIM = 64
FORMS = ur.IMG_DB_FORMS  # msgpack, npz, npz-legacy


@pytest.fixture(scope="module")
def uniter() -> Uniter:
    return Uniter.build("tiny").eval()


def detections(names: dict[str, int], boxes: int = 100, img_dim: int = IMG_DIM) -> dict:
    """{file name: detector dump with `above` confident boxes} as generate_npz holds them."""
    return {name: ur.detection(name, boxes, img_dim, above=above) for name, above in names.items()}


def uniter_reads(
    split_dir: Path,
    fname: str,
    *,
    conf_th: float = 0.2,
    max_bb: int = 100,
    min_bb: int = 10,
    num_bb: int = 36,
    compress: bool = False,
) -> dict[str, torch.Tensor]:
    """`DetectFeatLmdb(split_dir, conf_th, max_bb, min_bb, num_bb, compress)[fname]` as UNITER's
    data/data.py computes it: the folder and nbb it picks, msgpack-numpy or np.load with
    allow_pickle, the first nbb rows as float32 tensors."""
    if conf_th == -1:
        db_name, name2nbb = f"feat_numbb{num_bb}", defaultdict(lambda: num_bb)
    else:
        db_name = f"feat_th{conf_th}_max{max_bb}_min{min_bb}"
        nbb = split_dir / f"nbb_th{conf_th}_max{max_bb}_min{min_bb}.json"
        name2nbb = json.loads(nbb.read_text()) if nbb.exists() else None
    if compress:
        db_name += "_compressed"
    if name2nbb is None:
        db_name = "all_compressed" if compress else "all"
    env = lmdb.open(str(split_dir / db_name), readonly=True, create=False, lock=False)
    try:
        with env.begin() as txn:
            dump = txn.get(fname.encode("utf-8"))
    finally:
        env.close()
    if compress:
        with np.load(io.BytesIO(dump), allow_pickle=True) as npz:
            img = {key: npz[key] for key in npz.files}
    else:
        img = msgpack_numpy.unpackb(dump, raw=False)
    if name2nbb is None:  # _compute_nbb
        name2nbb = {fname: ur.box_count(img["conf"], conf_th, max_bb, min_bb)}
    n = name2nbb[fname]
    return {
        "features": torch.tensor(img["features"][:n, :]).float(),
        "norm_bb": torch.tensor(img["norm_bb"][:n, :]).float(),
    }


def assert_regions_equal(got: dict[str, np.ndarray], expected: dict[str, torch.Tensor]) -> None:
    assert got["norm_bb"].dtype == np.float32
    assert got["features"].shape == tuple(expected["features"].shape)
    np.testing.assert_array_equal(got["features"].astype(np.float32), expected["features"].numpy())
    np.testing.assert_array_equal(got["norm_bb"], expected["norm_bb"].numpy())


def put(db: Path, key: str, value: bytes) -> None:
    """Overwrite one value of an LMDB folder (a damaged or crafted entry)."""
    env = lmdb.open(str(db), map_size=1 << 28)
    with env.begin(write=True) as txn:
        txn.put(key.encode("utf-8"), value)
    env.close()


def in_child(function: Callable[[], object]) -> tuple:
    """`function()` in a forked process: ("ok", value), ("error", type name, message) or
    ("signal", name) when the child was killed, so that a crash fails one test, not the run."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read_end)
            try:
                result = ("ok", function())
            except BaseException as exc:
                result = ("error", type(exc).__name__, str(exc))
            with os.fdopen(write_end, "wb") as out:
                pickle.dump(result, out)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as source:
        data = source.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return ("signal", signal.Signals(os.WTERMSIG(status)).name)
    assert data, f"the child exited with {os.WEXITSTATUS(status)} and no result"
    return pickle.loads(data)  # written by the child above, from this test's own values


# --- every layout and form gives what DetectFeatLmdb gives ------------------------------------

LAYOUTS = {
    # name: (write_img_db settings, DetectFeatLmdb settings)
    "feat_th0.2_max100_min10": (dict(), dict()),
    "feat_th0.5_max30_min4": (
        dict(conf_th=0.5, max_bb=30, min_bb=4),
        dict(conf_th=0.5, max_bb=30, min_bb=4),
    ),
    "feat_numbb36": (dict(conf_th=-1, num_bb=36), dict(conf_th=-1, num_bb=36)),
    "all": (dict(keep_all=True), dict()),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_and_form_gives_the_regions_detectfeatlmdb_gives(tmp_path, layout, form):
    written, read = LAYOUTS[layout]
    dumps = detections({"nlvr2_dev-1-0-img0.npz": 3, "nlvr2_dev-1-0-img1.npz": 23})
    dumps |= detections({"nlvr2_dev-2-0-img0.npz": 100})
    dumps |= detections({"nlvr2_dev-3-0-img0.npz": 8}, boxes=20)  # fewer than 36 stored
    split = tmp_path / "img_db" / "nlvr2_dev"
    db = ur.write_img_db(split, dumps, form=form, **written)
    expected = {key: uniter_reads(split, key, compress=form != "msgpack", **read) for key in dumps}

    img_db = ImgDb(tmp_path / "img_db")
    assert [d.path for d in img_db.databases] == [db]
    for key, regions in expected.items():
        assert_regions_equal(img_db.regions(key), regions)
    # The cases really differ: the rule, the stored counts or N decide.
    counts = [len(regions["features"]) for regions in expected.values()]
    assert len(set(counts)) > 1, counts


def test_nbb_json_decides_how_many_regions_of_a_feat_th_folder_are_read(tmp_path):
    dumps = detections({"a.npz": 40, "b.npz": 12})
    split = tmp_path / "img_db" / "s"
    ur.write_img_db(split, dumps)
    # DetectFeatLmdb reads name2nbb from the json, not from conf: a smaller count there wins.
    (split / "nbb_th0.2_max100_min10.json").write_text(json.dumps({"a.npz": 7, "b.npz": 12}))
    expected = uniter_reads(split, "a.npz")
    assert len(expected["features"]) == 7
    img_db = ImgDb(tmp_path / "img_db")
    assert_regions_equal(img_db.regions("a.npz"), expected)
    assert len(img_db.regions("b.npz")["features"]) == 12


def test_feat_th_folder_without_nbb_json_counts_by_its_own_rule(tmp_path):
    dumps = detections({"a.npz": 40}, boxes=60)
    split = tmp_path / "img_db" / "s"
    ur.write_img_db(split, dumps, conf_th=0.2, max_bb=30, min_bb=5)
    (split / "nbb_th0.2_max30_min5.json").unlink()
    assert len(ImgDb(tmp_path / "img_db").regions("a.npz")["features"]) == 30  # max_bb 30


# --- the stated requirement: npz file and img_db give identical batches -----------------------


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("keep_all", [False, True], ids=["feat_th", "all"])
def test_same_image_as_npz_file_and_in_img_db_encodes_identically(tmp_path, uniter, form, keep_all):
    """An image read through `features/<name>.npz` (generate_npz's file, 100 boxes) and through
    an img_db (convert_imgdir's entry of that file) gives the same region_feats, region_boxes and
    region_mask for UNITER, bit for bit."""
    names = {"dev-850-0-img0": 3, "dev-850-0-img1": 23, "dev-851-2-img0": 100}
    dumps = {name: ur.detection(name, 100, IMG_DIM, above=above) for name, above in names.items()}
    npz_root, db_root = tmp_path / "npz", tmp_path / "lmdb"
    (npz_root / "features").mkdir(parents=True)
    for name, dump in dumps.items():
        ur.write_npz_file(npz_root / "features" / f"{name}.npz", dump)
    ur.write_img_db(
        db_root / "img_db" / "nlvr2_dev",
        {f"nlvr2_{name}.npz": dump for name, dump in dumps.items()},
        form=form,
        keep_all=keep_all,
    )
    from_npz = ImageStore(npz_root)
    from_db = ImageStore(db_root, keys=lambda name: [f"nlvr2_{name}.npz"])
    assert not (npz_root / "img_db").exists() and not (db_root / "features").exists()

    texts = ["a red circle .", "there are two objects .", "yes"]
    x = encode(texts, list(names), uniter, from_npz)
    y = encode(texts, list(names), uniter, from_db)
    assert x.region_mask.sum(1).tolist() == [10, 23, 100]  # UNITER's rule: min 10, max 100
    assert x.region_feats.dtype == y.region_feats.dtype == torch.float16
    for field in ("region_feats", "region_boxes", "region_mask"):
        assert torch.equal(getattr(x, field), getattr(y, field)), field
    assert torch.equal(x.input_ids, y.input_ids)


# --- which folder of a split, keys across splits -----------------------------------------------


@pytest.mark.parametrize("msgpack_first", [True, False])
def test_msgpack_default_folder_is_read_before_its_compressed_twin(tmp_path, msgpack_first):
    split = tmp_path / "img_db" / "nlvr2_dev"
    # Same key, different contents (same box count, so the shared nbb json fits both).
    plain = {"x.npz": ur.detection("plain", 100, IMG_DIM, above=15)}
    packed = {"x.npz": ur.detection("packed", 100, IMG_DIM, above=15)}
    writes = [(plain, "msgpack"), (packed, "npz-legacy")]
    for dumps, form in writes if msgpack_first else writes[::-1]:
        ur.write_img_db(split, dumps, form=form)
    img_db = ImgDb(tmp_path / "img_db")
    assert [d.path.name for d in img_db.databases] == ["feat_th0.2_max100_min10"]
    expected = plain["x.npz"]["features"][:15].astype(np.float16)
    np.testing.assert_array_equal(img_db.regions("x.npz")["features"], expected)


@pytest.mark.parametrize(
    ("folders", "read"),
    [
        (["all", "feat_th0.2_max100_min10_compressed"], "feat_th0.2_max100_min10_compressed"),
        (["feat_numbb36", "all_compressed"], "all_compressed"),
        (["all", "all_compressed"], "all"),
        (["feat_numbb36_compressed", "feat_numbb36"], "feat_numbb36"),
    ],
)
def test_folder_preference_follows_uniters_defaults(tmp_path, folders, read):
    settings = {
        "all": dict(keep_all=True),
        "feat_numbb36": dict(conf_th=-1, num_bb=36),
        "feat_th0.2_max100_min10": dict(),
    }
    split = tmp_path / "img_db" / "s"
    for folder in folders:
        ur.write_img_db(
            split,
            detections({"x.npz": 12}),
            form="npz" if folder.endswith("_compressed") else "msgpack",
            **settings[folder.removesuffix("_compressed")],
        )
    assert [d.path.name for d in ImgDb(tmp_path / "img_db").databases] == [read]


def test_keys_are_found_across_split_folders(tmp_path):
    root = tmp_path / "img_db"
    dev = detections({"nlvr2_dev-1-0-img0.npz": 12})
    test = detections({"nlvr2_test1-5-1-img1.npz": 30})
    gt = detections({"vcr_gt_val_movie.npz": 4}, boxes=10)
    ur.write_img_db(root / "nlvr2_dev", dev, form="msgpack")
    ur.write_img_db(root / "nlvr2_test1", test, form="npz-legacy")
    ur.write_img_db(root / "vcr_gt_val", gt, conf_th=-1, num_bb=100, form="npz")
    img_db = ImgDb(root)
    assert len(img_db.databases) == 3
    assert len(img_db.regions("nlvr2_dev-1-0-img0.npz")["features"]) == 12
    assert len(img_db.regions("nlvr2_test1-5-1-img1.npz")["features"]) == 30
    assert len(img_db.regions("vcr_gt_val_movie.npz")["features"]) == 10
    assert img_db.find(["nope.npz", "nlvr2_test1-5-1-img1.npz"]) == "nlvr2_test1-5-1-img1.npz"
    assert img_db.find(["__keys__", "nope.npz"]) is None  # UNITER's key list is no image
    # Through an ImageStore, annotation names map to keys in whichever split holds them.
    store = ImageStore(tmp_path, keys=lambda name: [f"nlvr2_{name}.npz"])
    assert store.has("dev-1-0-img0") and store.has("test1-5-1-img1")
    assert len(store.regions("test1-5-1-img1")["features"]) == 30
    assert len(store.regions("vcr_gt_val_movie")["features"]) == 10  # the name + ".npz"


def test_a_split_folder_directly_under_img_db_is_read(tmp_path):
    ur.write_img_db(tmp_path / "img_db", detections({"x.npz": 12}))
    assert len(ImgDb(tmp_path / "img_db").regions("x.npz")["features"]) == 12


# --- errors -------------------------------------------------------------------------------------


def test_img_db_without_any_lmdb_folder_is_an_error(tmp_path):
    (tmp_path / "img_db" / "nlvr2_dev" / "not_a_db").mkdir(parents=True)
    with pytest.raises(VLPruneError, match=r"img_db: no UNITER img_db folder \(feat_th"):
        ImgDb(tmp_path / "img_db")


def test_missing_key_names_the_folder_and_the_key(tmp_path):
    ur.write_img_db(tmp_path / "img_db" / "nlvr2_dev", detections({"nlvr2_a.npz": 12}))
    folder = re.escape(str(tmp_path / "img_db"))
    with pytest.raises(VLPruneError, match=rf"{folder}: no image 'nlvr2_b\.npz' in any split"):
        ImgDb(tmp_path / "img_db").regions("nlvr2_b.npz")
    store = ImageStore(tmp_path, keys=lambda name: [f"nlvr2_{name}.npz"])
    with pytest.raises(VLPruneError, match=r"features/b\.npz: region features of image 'b'"):
        store.regions("b")
    with pytest.raises(
        VLPruneError,
        match=r"dev\.json:3: image b is missing .*img_db entry nlvr2_b\.npz, b, b\.npz",
    ):
        store.require("b", "dev.json:3")


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["half", "empty"])
def test_truncated_lmdb_is_an_error_naming_the_folder(tmp_path, keep):
    """A data.mdb cut short (an interrupted copy or download) must be an error, not a crash of
    the process: the read runs in a forked child so that a SIGBUS fails only this test."""
    db = ur.write_img_db(
        tmp_path / "img_db" / "nlvr2_dev", detections({f"k{i}.npz": 12 for i in range(4)})
    )
    data = db / "data.mdb"
    size = data.stat().st_size
    with open(data, "r+b") as file:
        file.truncate(int(size * keep) if keep else 100)

    def read_all():
        img_db = ImgDb(tmp_path / "img_db")
        return [len(img_db.regions(f"k{i}.npz")["features"]) for i in range(4)]

    result = in_child(read_all)
    assert result[:2] == ("error", "VLPruneError"), result
    assert str(db) in result[2]


@pytest.mark.parametrize("form", FORMS)
def test_object_dtype_value_is_an_error_naming_folder_and_key(tmp_path, form):
    db = ur.write_img_db(tmp_path / "img_db" / "s", detections({"x.npz": 12}), form=form)
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    evil = np.empty(1, dtype=object)
    evil[0] = Payload()
    arrays = {
        "features": np.ones((12, IMG_DIM), np.float16),
        "norm_bb": np.zeros((12, 6), np.float16),
        "conf": evil,
    }
    if form == "msgpack":
        value = msgpack_numpy.packb(arrays, use_bin_type=True)
    else:
        with io.BytesIO() as buffer:
            np.savez_compressed(buffer, **arrays)
            value = buffer.getvalue()
    put(db, "x.npz", value)
    with pytest.raises(VLPruneError, match=rf"{re.escape(str(db))}: key 'x\.npz': .*object array"):
        ImgDb(tmp_path / "img_db").regions("x.npz")
    assert not marker.exists()


def test_value_without_features_or_with_bad_shapes_is_an_error(tmp_path):
    db = ur.write_img_db(tmp_path / "img_db" / "s", detections({"x.npz": 12, "y.npz": 12}))
    put(db, "x.npz", msgpack_numpy.packb({"norm_bb": np.zeros((3, 6))}, use_bin_type=True))
    bad_boxes = {"features": np.zeros((3, IMG_DIM)), "norm_bb": np.zeros((3, 4))}
    put(db, "y.npz", msgpack_numpy.packb(bad_boxes, use_bin_type=True))
    img_db = ImgDb(tmp_path / "img_db")
    with pytest.raises(VLPruneError, match=r"key 'x\.npz': no 'features' array \(found norm_bb\)"):
        img_db.regions("x.npz")
    with pytest.raises(VLPruneError, match=r"key 'y\.npz': 'norm_bb' has shape \(3, 4\)"):
        img_db.regions("y.npz")


def test_value_without_conf_in_a_folder_without_nbb_json_is_an_error(tmp_path):
    split = tmp_path / "img_db" / "s"
    db = ur.write_img_db(split, detections({"x.npz": 12}), keep_all=True)
    no_conf = {"features": np.zeros((3, IMG_DIM)), "norm_bb": np.zeros((3, 6))}
    put(db, "x.npz", msgpack_numpy.packb(no_conf, use_bin_type=True))
    with pytest.raises(VLPruneError, match=r"key 'x\.npz' has no 'conf' and the folder no nbb"):
        ImgDb(tmp_path / "img_db").regions("x.npz")


@pytest.mark.parametrize(
    ("content", "message"), [("{not json", ":1: not valid JSON"), ('{"x.npz": -1}', ": expected")]
)
def test_damaged_nbb_json_is_an_error_naming_it(tmp_path, content, message):
    split = tmp_path / "img_db" / "s"
    ur.write_img_db(split, detections({"x.npz": 12}))
    (split / "nbb_th0.2_max100_min10.json").write_text(content)
    with pytest.raises(VLPruneError, match=rf"nbb_th0\.2_max100_min10\.json{message}"):
        ImgDb(tmp_path / "img_db").regions("x.npz")


def test_features_of_the_wrong_width_are_an_error_from_encode(tmp_path, uniter):
    ur.write_img_db(
        tmp_path / "img_db" / "nlvr2_dev",
        {"nlvr2_dev-0-img0.npz": ur.detection("wide", 20, 2048, above=12)},
    )
    store = ImageStore(tmp_path, keys=lambda name: [f"nlvr2_{name}.npz"])
    with pytest.raises(VLPruneError, match=r"image 'dev-0-img0' are 2048-d; .*reads 64-d"):
        encode(["a star"], ["dev-0-img0"], uniter, store)


@pytest.mark.parametrize("array", ["features", "norm_bb"])
def test_nan_features_or_boxes_are_an_error(tmp_path, uniter, array):
    dump = ur.detection("x", 100, IMG_DIM, above=12)
    dump[array][3, 2] = np.nan if array == "features" else np.inf
    db = ur.write_img_db(tmp_path / "img_db" / "s", {"x.npz": dump})
    with pytest.raises(
        VLPruneError, match=rf"{re.escape(str(db))}: key 'x\.npz': .*NaN or infinite"
    ):
        encode(["a star"], ["x"], uniter, ImageStore(tmp_path))


def test_img_db_without_lmdb_installed_says_what_to_install(tmp_path, monkeypatch):
    ur.write_img_db(tmp_path / "img_db" / "s", detections({"a.npz": 12}))
    monkeypatch.setitem(sys.modules, "lmdb", None)
    with pytest.raises(VLPruneError, match=r"pip install 'vl-prune\[uniter\]'"):
        ImageStore(tmp_path).regions("a")
    with pytest.raises(VLPruneError, match=r"pip install 'vl-prune\[uniter\]'"):
        ImgDb(tmp_path / "img_db").regions("a.npz")


# --- processes ----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_reads_the_img_db_its_parent_opened(tmp_path):
    dumps = detections({"a.npz": 12, "b.npz": 30})
    db = ur.write_img_db(tmp_path / "img_db" / "s", dumps, form="npz-legacy")
    img_db = open_img_db(tmp_path / "img_db")
    in_parent = img_db.regions("a.npz")  # the parent's environment is open
    parent_env = environment(db)

    def child():
        # A DataLoader worker: the same ImgDb object, its own LMDB environment.
        own = environment(db) is not parent_env
        return own, img_db.regions("a.npz"), open_img_db(tmp_path / "img_db").regions("b.npz")

    result = in_child(child)
    assert result[0] == "ok", result
    own_environment, a, b = result[1]
    assert own_environment
    np.testing.assert_array_equal(a["features"], in_parent["features"])
    np.testing.assert_array_equal(b["features"], dumps["b.npz"]["features"][:30].astype(np.float16))
    # And the parent still reads after its child is gone.
    np.testing.assert_array_equal(img_db.regions("b.npz")["norm_bb"], b["norm_bb"])
