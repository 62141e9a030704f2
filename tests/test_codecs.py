"""Decoding UNITER's LMDB values (vl_prune.data.codecs): img_db values written with msgpack-numpy
or as npz bytes come back as equal arrays without msgpack-numpy and without unpickling; txt_db
values are lz4 frames of msgpack. Anything else is a BadValue, never a crash or a pickle load."""

from __future__ import annotations

import io
import os
import struct
import sys
import zipfile
from pathlib import Path

import lz4.frame
import msgpack
import msgpack_numpy
import numpy as np
import pytest
import uniter_release as ur

from vl_prune.data.codecs import (
    BadValue,
    decode_arrays,
    decode_msgpack,
    decode_npz,
    decode_text_example,
)


def msgpack_numpy_value(arrays: dict) -> bytes:
    """An img_db value as convert_imgdir.py writes it without --compress."""
    return msgpack_numpy.packb(arrays, use_bin_type=True)


def npz_value(arrays: dict) -> bytes:
    with io.BytesIO() as buffer:
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    with io.BytesIO() as buffer:
        np.save(buffer, array)
        return buffer.getvalue()


def zipped(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytearray:
    with io.BytesIO() as buffer:
        with zipfile.ZipFile(buffer, "w", method) as archive:
            for name, data in members.items():
                archive.writestr(name, data)
        return bytearray(buffer.getvalue())


@pytest.fixture
def no_msgpack_numpy(monkeypatch):
    """The reading side must not need (or quietly use) msgpack-numpy."""
    monkeypatch.setitem(sys.modules, "msgpack_numpy", None)


ARRAYS = {
    "features": np.random.default_rng(0).standard_normal((7, 64)).astype(np.float16),
    "norm_bb": np.random.default_rng(1).uniform(0, 1, (7, 6)).astype(np.float32),
    "conf": np.linspace(0.9, 0.1, 7, dtype=np.float32).reshape(7, 1),
    "big_endian": np.arange(6, dtype=">f4").reshape(2, 3),
    "int64": np.arange(-3, 3, dtype=np.int64),
    "uint8": np.arange(250, 256, dtype=np.uint8),
    "bool": np.array([True, False, True]),
    "complex": np.array([1 + 2j, -3j], dtype=np.complex64),
    "empty": np.zeros((0, 6), np.float32),
    "zero_d": np.array(2.5, np.float64),
    "three_d": np.arange(24, dtype=np.int16).reshape(2, 3, 4),
    "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,
}


def assert_same_arrays(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, array in expected.items():
        assert isinstance(got[name], np.ndarray), name
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_msgpack_numpy_values_decode_to_equal_arrays_without_msgpack_numpy(no_msgpack_numpy):
    value = msgpack_numpy.packb(ARRAYS, use_bin_type=True)
    assert not value.startswith(b"PK")  # really the msgpack form
    assert_same_arrays(decode_arrays(value), ARRAYS)


def test_img_db_value_as_convert_imgdir_writes_it_decodes(no_msgpack_numpy):
    dump = ur.detection("nlvr2_dev-850-0-img0.npz", boxes=12, img_dim=64, above=5)
    saved = {k: v.astype(np.float16) for k, v in dump.items()}
    assert_same_arrays(decode_arrays(msgpack_numpy_value(saved)), saved)


def test_msgpack_numpy_scalars_decode_to_numpy_scalars(no_msgpack_numpy):
    value = msgpack_numpy.packb(
        {"scalar": np.float32(1.5), "n": np.int64(-7), "flag": np.bool_(True)}, use_bin_type=True
    )
    content = decode_msgpack(value)
    assert content["scalar"] == np.float32(1.5) and content["scalar"].dtype == np.float32
    assert content["n"] == -7 and content["n"].dtype == np.int64
    assert bool(content["flag"]) is True


@pytest.mark.parametrize("form", ["npz", "npz-legacy"])
def test_npz_values_decode_in_both_numpy_forms(form):
    value = ur._serialise_img(ARRAYS, form)
    assert value.startswith(b"PK\x03\x04")
    got = decode_arrays(value)
    if form == "npz-legacy":
        # numpy 1.x saved UNITER's allow_pickle=True keyword as a 0-d bool member: a plain array.
        allow = got.pop("allow_pickle")
        assert allow.shape == () and allow.dtype == np.bool_ and bool(allow)
    assert_same_arrays(got, ARRAYS)


class Payload:
    """Unpickling this object creates the marker directory: proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def object_array(marker: Path) -> np.ndarray:
    array = np.empty(2, dtype=object)
    array[0], array[1] = Payload(marker), "text"
    return array


def test_object_array_in_msgpack_is_refused_and_never_unpickled(tmp_path, no_msgpack_numpy):
    marker = tmp_path / "unpickled"
    arrays = {"features": np.ones((2, 4), np.float16), "evil": object_array(marker)}
    value = msgpack_numpy.packb(arrays, use_bin_type=True)
    with pytest.raises(BadValue, match=r"object array \(msgpack-numpy stores it as a pickle\)"):
        decode_arrays(value)
    assert not marker.exists()
    # The payload is live: msgpack-numpy, as UNITER reads it, would have run it.
    msgpack_numpy.unpackb(value, raw=False)
    assert marker.exists()


def test_object_array_in_npz_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    value = npz_value({"features": np.ones((2, 4), np.float16), "evil": object_array(marker)})
    with pytest.raises(BadValue, match=r"object array \(only pickle can read it\)"):
        decode_arrays(value)
    assert not marker.exists()
    # The payload is live: np.load(..., allow_pickle=True), as UNITER reads it, would run it.
    with np.load(io.BytesIO(value), allow_pickle=True) as npz:
        npz["evil"]
    assert marker.exists()


@pytest.mark.parametrize(
    ("field", "message"),
    [
        # A crafted map claiming a plain dtype that is in fact object: never frombuffer'd.
        ({b"type": "|O", b"kind": b""}, "dtype object is not numeric"),
        ({b"type": "<U4", b"kind": b""}, "is not numeric"),
        ({b"kind": b"V", b"type": [["a", "<f4"]]}, "structured array"),
        ({b"shape": [3, 3]}, r"shape \(3, 3\) and dtype float32 has 16 bytes"),
        ({b"shape": [-1]}, "no valid shape"),
        ({b"shape": None}, "no valid shape"),
    ],
)
def test_malformed_msgpack_numpy_arrays_are_bad_values(field, message):
    array = {b"nd": True, b"type": "<f4", b"kind": b"", b"shape": [2, 2], b"data": bytes(16)}
    value = msgpack.packb({"features": array | field}, use_bin_type=True)
    with pytest.raises(BadValue, match=message):
        decode_arrays(value)


def test_truncated_values_are_bad_values():
    arrays = {"features": np.ones((5, 64), np.float16), "norm_bb": np.zeros((5, 6), np.float16)}
    for value in (msgpack_numpy_value(arrays), npz_value(arrays)):
        for cut in (len(value) - 1, len(value) // 2, 5, 1, 0):
            with pytest.raises(BadValue):
                decode_arrays(value[:cut])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"garbage!", "not readable msgpack"),
        (b"\xc1", "not readable msgpack"),
        (b"\x00", "expected a map of arrays, found int"),
        (msgpack.packb([1, 2]), "expected a map of arrays, found list"),
        (msgpack.packb({"features": 3}), "member 'features' is int, not an array"),
        (b"PK\x03\x04 not a zip at all", "not readable npz"),
    ],
)
def test_garbage_values_are_bad_values(value, message):
    with pytest.raises(BadValue, match=message):
        decode_arrays(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param(b"<html>503 Service Unavailable</html>", "not readable npz", id="html-page"),
        pytest.param(npy(np.ones((3, 4), np.float16)), "an .npy file", id="npy-not-npz"),
        pytest.param(b"", r"empty \(0 bytes\)", id="empty"),
    ],
)
def test_feature_file_bytes_that_are_no_npz_are_bad_values_saying_so(value, message):
    """What a per-image feature file holds is read with decode_npz whatever its first bytes: a
    saved error page is not 'an object array', a plain .npy is no npz either, and an empty
    file is said to be empty."""
    with pytest.raises(BadValue, match=message):
        decode_npz(value)


def _npy_with_header(header: bytes, data: bytes) -> bytes:
    header = header + b" " * (63 - len(header) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


def _bad_deflate() -> bytes:
    value = zipped({"features.npy": npy(np.ones((3, 4), np.float16))}, zipfile.ZIP_DEFLATED)
    name_len, extra_len = struct.unpack("<HH", value[26:30])
    start = 30 + name_len + extra_len
    value[start : start + 8] = b"\xff" * 8  # deflate block type 3: reserved, invalid
    return bytes(value)


def _unknown_compression() -> bytes:
    value = zipped({"features.npy": npy(np.ones((3, 4), np.float16))})
    value[8:10] = struct.pack("<H", 99)  # local header's compression method
    central = value.index(b"PK\x01\x02")
    value[central + 10 : central + 12] = struct.pack("<H", 99)
    return bytes(value)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(_bad_deflate(), id="corrupt-deflate-stream"),
        pytest.param(_unknown_compression(), id="unknown-compression-method"),
        pytest.param(
            bytes(
                zipped(
                    {
                        "features.npy": _npy_with_header(
                            b"{'descr': '<f2', 'fortran_order': False, 'shape': (3,", bytes(24)
                        )
                    }
                )
            ),
            id="unparsable-npy-header",
        ),
        pytest.param(
            bytes(
                zipped(
                    {
                        "features.npy": _npy_with_header(
                            b"{'descr': '<f2', 'fortran_order': False, 'shape': (3, 4), }",
                            bytes(10),
                        )
                    }
                )
            ),
            id="short-array-data",
        ),
    ],
)
def test_damaged_npz_values_are_bad_values(value):
    """A damaged img_db entry must be reported (naming the folder and key upstream), not
    escape as zlib.error, NotImplementedError or tokenize.TokenError."""
    with pytest.raises(BadValue, match="not readable npz"):
        decode_arrays(value)


def test_txt_db_values_round_trip():
    example = {
        "identifier": "dev-850-0-0",
        "sentence": "There are two dogs.",
        "input_ids": ur.tokenize("There are two dogs."),
        "img_fname": ("nlvr2_dev-850-0-img0.npz", "nlvr2_dev-850-0-img1.npz"),
        "target": 1,
        "label": None,
        "scores": [0.3, 1.0],
        "nested": {"a": [1, {"b": "c"}]},
        "unicode": "café ☕",
    }
    value = lz4.frame.compress(msgpack_numpy.packb(example, use_bin_type=True))
    decoded = decode_text_example(value)
    assert decoded == example | {"img_fname": list(example["img_fname"])}  # tuples → lists
    assert isinstance(decoded["input_ids"][0], int)


def test_txt_db_values_holding_arrays_decode_them():
    example = {"input_ids": [101, 102], "mask": np.array([1, 0, 1], np.int8)}
    value = lz4.frame.compress(msgpack_numpy.packb(example, use_bin_type=True))
    decoded = decode_text_example(value)
    assert decoded["input_ids"] == [101, 102]
    assert_same_arrays({"mask": decoded["mask"]}, {"mask": example["mask"]})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (msgpack.packb({"input_ids": [1, 2]}), "not an lz4 frame"),
        (b"", "not an lz4 frame"),
        (lz4.frame.compress(b"x" * 100)[:-4], "not an lz4 frame"),
        (lz4.frame.compress(b"\xc1"), "not readable msgpack"),
    ],
)
def test_non_lz4_or_damaged_txt_values_are_bad_values(value, message):
    with pytest.raises(BadValue, match=message):
        decode_text_example(value)
