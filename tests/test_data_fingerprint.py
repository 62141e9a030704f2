"""The data fingerprint (vl_prune.data.fingerprint): it follows a data folder's contents, not its
path or mtimes; small files count byte for byte, big ones by size and samples; temp files, LMDB
locks and symlink cycles do not disturb it."""

from __future__ import annotations

import os
import shutil
import string
from pathlib import Path

import pytest

from vl_prune.data import fingerprint as fp
from vl_prune.data.fingerprint import data_fingerprint
from vl_prune.errors import VLPruneError

BIG = 4096  # bytes of a "big" file once the threshold is patched down


@pytest.fixture
def small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thresholds scaled down so a 4 KiB file takes the sampled path."""
    monkeypatch.setattr(fp, "FULL_HASH_BYTES", 1024)
    monkeypatch.setattr(fp, "EDGE_BYTES", 256)
    monkeypatch.setattr(fp, "BLOCK_BYTES", 64)
    monkeypatch.setattr(fp, "MIDDLE_BLOCKS", 3)


def make_data(root: Path) -> Path:
    """A folder shaped like a UNITER release: annotations, a txt_db and an img_db."""
    (root / "ann").mkdir(parents=True)
    (root / "ann" / "train.json").write_text('[{"id": 1, "sentence": "two dogs"}]')
    (root / "ann" / "val.jsonl").write_text('{"id": 2}\n')
    (root / "txt_db").mkdir()
    (root / "txt_db" / "meta.json").write_text('{"bert": "bert-base-cased"}')
    (root / "txt_db" / "data.mdb").write_bytes(bytes(range(256)) * 4)
    (root / "img_db" / "feat").mkdir(parents=True)
    (root / "img_db" / "feat" / "data.mdb").write_bytes(bytes(range(256)) * 16)
    return root


def flip(file: Path, offset: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


def test_digest_is_short_hex(tmp_path: Path) -> None:
    digest = data_fingerprint(make_data(tmp_path / "d"))
    assert len(digest) == fp.DIGEST_CHARS
    assert set(digest) <= set(string.hexdigits.lower())


def test_copy_and_move_keep_the_fingerprint(tmp_path: Path) -> None:
    data = make_data(tmp_path / "d")
    before = data_fingerprint(data)
    shutil.copytree(data, tmp_path / "copy")
    assert data_fingerprint(tmp_path / "copy") == before
    data.rename(tmp_path / "moved")
    assert data_fingerprint(tmp_path / "moved") == before


def test_mtime_does_not_count(tmp_path: Path) -> None:
    data = make_data(tmp_path / "d")
    before = data_fingerprint(data)
    os.utime(data / "ann" / "train.json", (1_000_000, 1_000_000))
    os.utime(data / "img_db" / "feat" / "data.mdb", (2_000_000, 2_000_000))
    assert data_fingerprint(data) == before


def test_one_byte_of_an_annotation_counts(tmp_path: Path) -> None:
    data = make_data(tmp_path / "d")
    before = data_fingerprint(data)
    file = data / "ann" / "train.json"
    file.write_text(file.read_text().replace("two", "tw0"))  # same size
    assert data_fingerprint(data) != before


def test_file_names_count_and_empty_folders_do_not(tmp_path: Path) -> None:
    data = make_data(tmp_path / "d")
    before = data_fingerprint(data)
    (data / "empty" / "nested").mkdir(parents=True)
    assert data_fingerprint(data) == before
    # The new name sorts where the old one did, so only the name itself can tell them apart.
    (data / "ann" / "val.jsonl").rename(data / "ann" / "valid.jsonl")
    assert data_fingerprint(data) != before


def test_a_lone_file_is_its_contents(tmp_path: Path) -> None:
    (tmp_path / "a.tsv").write_text("img\t1\n")
    (tmp_path / "b.tsv").write_text("img\t1\n")
    (tmp_path / "c.tsv").write_text("img\t2\n")
    assert data_fingerprint(tmp_path / "a.tsv") == data_fingerprint(tmp_path / "b.tsv")
    assert data_fingerprint(tmp_path / "a.tsv") != data_fingerprint(tmp_path / "c.tsv")


def test_appending_to_a_big_file_counts_by_size(tmp_path: Path, small_limits: None) -> None:
    # All zeros: every sample reads the same bytes before and after, so only the size differs.
    big = tmp_path / "features.tsv"
    big.write_bytes(bytes(BIG))
    before = data_fingerprint(tmp_path)
    with big.open("ab") as handle:
        handle.write(b"\0")
    assert data_fingerprint(tmp_path) != before


def test_big_files_count_by_samples(tmp_path: Path, small_limits: None) -> None:
    big = tmp_path / "data.mdb"
    big.write_bytes(bytes(BIG))
    before = data_fingerprint(tmp_path)
    middle_block = (BIG - fp.BLOCK_BYTES) * 2 // (fp.MIDDLE_BLOCKS + 1)
    for offset in (0, BIG - 1, middle_block + fp.BLOCK_BYTES // 2):
        flip(big, offset)
        assert data_fingerprint(tmp_path) != before, offset
        flip(big, offset)
    assert data_fingerprint(tmp_path) == before
    # The documented trade-off: a same-size edit between samples goes unseen. It also shows the
    # file took the sampled path, so the tests above test sampling, not a full hash.
    flip(big, fp.EDGE_BYTES + 10)
    assert data_fingerprint(tmp_path) == before


def test_temp_files_caches_and_lmdb_locks_are_skipped(tmp_path: Path) -> None:
    data = make_data(tmp_path / "d")
    before = data_fingerprint(data)
    (data / "ann" / ".train.json.tmp").write_text("half written")
    (data / ".DS_Store").write_bytes(b"\0\1")
    (data / ".git").mkdir()
    (data / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (data / "__pycache__").mkdir()
    (data / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"pyc")
    (data / "img_db" / "feat" / "lock.mdb").write_bytes(b"reader table")
    assert data_fingerprint(data) == before
    (data / "img_db" / "feat" / "lock.mdb").write_bytes(b"another reader table")
    assert data_fingerprint(data) == before


def test_symlinks_are_followed(tmp_path: Path) -> None:
    real = make_data(tmp_path / "real")
    linked = tmp_path / "linked"
    linked.mkdir()
    shutil.copytree(real / "ann", linked / "ann")
    shutil.copytree(real / "txt_db", linked / "txt_db")
    # A feature store kept elsewhere and linked in, folder and file alike.
    store = tmp_path / "elsewhere"
    shutil.copytree(real / "img_db", store)
    (linked / "img_db").symlink_to(store, target_is_directory=True)
    assert data_fingerprint(linked) == data_fingerprint(real)
    (linked / "txt_db" / "data.mdb").unlink()
    (linked / "txt_db" / "data.mdb").symlink_to(real / "txt_db" / "data.mdb")
    assert data_fingerprint(linked) == data_fingerprint(real)
    # The data folder itself given as a link.
    (tmp_path / "link_to_real").symlink_to(real, target_is_directory=True)
    assert data_fingerprint(tmp_path / "link_to_real") == data_fingerprint(real)
    # What the link points at counts, not the link: changing the store changes the data.
    flip(store / "feat" / "data.mdb", 0)
    assert data_fingerprint(linked) != data_fingerprint(real)


def test_symlink_cycles_end(tmp_path: Path) -> None:
    data = make_data(tmp_path / "d")
    before = data_fingerprint(data)
    (data / "ann" / "up").symlink_to(data, target_is_directory=True)
    (data / "txt_db" / "self").symlink_to(data / "txt_db", target_is_directory=True)
    assert data_fingerprint(data) == before


def test_a_missing_path_is_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_data"
    with pytest.raises(VLPruneError, match="does not exist") as info:
        data_fingerprint(missing)
    assert str(missing) in str(info.value)
    assert "\n" not in str(info.value)
    (tmp_path / "dangling").symlink_to(missing)
    with pytest.raises(VLPruneError, match="dangling"):
        data_fingerprint(tmp_path / "dangling")


def test_per_image_files_count_by_name_and_size(tmp_path: Path) -> None:
    features = tmp_path / "img_db" / "nlvr2_dev"
    features.mkdir(parents=True)
    image = features / "dev-1-img0.npz"
    image.write_bytes(b"\x01" * 100)
    before = data_fingerprint(tmp_path)
    image.write_bytes(b"\x02" * 100)  # same size: read by neither run nor fingerprint
    assert data_fingerprint(tmp_path) == before
    image.write_bytes(b"\x02" * 101)
    grown = data_fingerprint(tmp_path)
    assert grown != before
    image.rename(features / "dev-2-img0.npz")
    assert data_fingerprint(tmp_path) != grown
