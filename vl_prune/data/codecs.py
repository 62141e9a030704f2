"""Decoding the values stored in UNITER's LMDB databases without running code.

img_db values are msgpack maps of arrays (msgpack-numpy's encoding) or npz bytes; txt_db values
are lz4-compressed msgpack. msgpack-numpy itself unpickles object arrays, and `np.load` does with
`allow_pickle=True` (which UNITER passes): both would run whatever a crafted database holds.
Here arrays are rebuilt from their dtype, shape and bytes only, and anything else is refused.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

ZIP_MAGIC = b"PK\x03\x04"
NPY_MAGIC = b"\x93NUMPY"
# The plain numeric dtypes: bool, signed and unsigned integers, floats, complex.
NUMERIC_KINDS = "biufc"


class BadValue(ValueError):
    """A stored value that is not what the format allows; the caller names the file and key."""


def decode_arrays(value: bytes) -> dict[str, np.ndarray]:
    """The arrays of one img_db value, in either of the forms UNITER writes: npz bytes
    (`--compress`) or msgpack-numpy (the default)."""
    if not value:
        raise BadValue("empty (0 bytes)")
    if value.startswith(ZIP_MAGIC):
        return decode_npz(value)
    content = decode_msgpack(value)
    if not isinstance(content, dict):
        raise BadValue(f"expected a map of arrays, found {type(content).__name__}")
    arrays = {}
    for name, array in content.items():
        if not isinstance(array, np.ndarray):
            raise BadValue(f"member {name!r} is {type(array).__name__}, not an array")
        arrays[str(name)] = array
    return arrays


def decode_npz(value: bytes) -> dict[str, np.ndarray]:
    """Every member of npz bytes, read with `allow_pickle=False`. numpy 1.x stored the
    `allow_pickle=True` keyword UNITER passes as one more member, a 0-d bool array: it is a
    plain array and comes back like the others."""
    if not value:
        raise BadValue("empty (0 bytes)")
    if value.startswith(NPY_MAGIC):
        raise BadValue("an .npy file (one array), not an .npz archive of named arrays")
    if not value.startswith(ZIP_MAGIC):
        raise BadValue("not readable npz (not a zip archive)")
    try:
        with np.load(io.BytesIO(value), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise BadValue("holds an object array (only pickle can read it)") from exc
        raise BadValue(f"not readable npz ({exc})") from exc
    except Exception as exc:  # a damaged archive fails in zlib, zipfile or numpy's header parser
        raise BadValue(f"not readable npz ({type(exc).__name__}: {exc})") from exc


def decode_msgpack(value: bytes) -> Any:
    """A msgpack value, with msgpack-numpy's array and scalar maps turned into numpy values."""
    import msgpack

    try:
        return msgpack.unpackb(value, raw=False, object_hook=_numpy, strict_map_key=False)
    except BadValue:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise BadValue(f"not readable msgpack ({exc})") from exc


def decode_text_example(value: bytes) -> Any:
    """One txt_db example: lz4 frame, then msgpack."""
    import lz4.frame

    try:
        raw = lz4.frame.decompress(value)
    except RuntimeError as exc:
        raise BadValue(f"not an lz4 frame ({exc})") from exc
    return decode_msgpack(raw)


def _numpy(obj: dict) -> Any:
    """msgpack-numpy's encoding of an array ({nd: True, type, kind, shape, data}) or of a
    scalar ({nd: False, type, data}); every other map is returned as it is."""
    if b"nd" not in obj:
        return obj
    kind = obj.get(b"kind", b"")
    if kind in (b"O", "O"):
        raise BadValue("holds an object array (msgpack-numpy stores it as a pickle)")
    if kind in (b"V", "V"):
        raise BadValue("holds a structured array, which region features never are")
    try:
        dtype = np.dtype(_text(obj[b"type"]))
        data = obj[b"data"]
    except (KeyError, TypeError) as exc:
        raise BadValue(f"malformed msgpack-numpy array ({exc})") from exc
    if dtype.kind not in NUMERIC_KINDS or not isinstance(data, bytes):
        raise BadValue(f"array of dtype {dtype} is not numeric")
    if obj[b"nd"] is not True:
        if len(data) != dtype.itemsize:
            raise BadValue(f"scalar of dtype {dtype} has {len(data)} bytes")
        return np.frombuffer(data, dtype=dtype)[0]
    shape = obj.get(b"shape")
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(n, int) and n >= 0 for n in shape
    ):
        raise BadValue(f"array has no valid shape ({shape!r})")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise BadValue(f"array of shape {tuple(shape)} and dtype {dtype} has {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _text(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else value
