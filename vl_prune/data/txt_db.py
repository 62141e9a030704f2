"""UNITER's txt_db: one data set split's texts, already tokenised, in LMDB.

A `<name>.db/` folder as UNITER's `prepro.py` writes it: an LMDB whose values are lz4-compressed
msgpack examples (the annotation record plus `input_ids`, word-piece ids without [CLS]/[SEP],
`img_fname`, the image's img_db key(s), and the task's `target`), `meta.json` (the tokenizer and
its [CLS], [SEP], [MASK], [UNK] ids, `v_range` of ordinary words) and `id2len.json` (example id →
number of ids), with `txt2img.json` and, for some tasks, `refs.json`, `images.json`, … beside.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from vl_prune.data.codecs import BadValue, decode_text_example
from vl_prune.data.lazy import LazySequence
from vl_prune.data.lmdb_files import read, stored_keys
from vl_prune.data.text import read_json
from vl_prune.errors import VLPruneError

META_IDS = ("CLS", "SEP", "MASK", "UNK")


@dataclass(frozen=True)
class Vocabulary:
    """What a txt_db's meta.json says of its tokenizer: the special ids, the range of ordinary
    word ids (MLM draws random words from it) and the tokenizer's name."""

    cls: int
    sep: int
    mask: int
    unk: int
    words: tuple[int, int]
    tokenizer: str
    #: words the texts use past the tokenizer's own (UNITER's VCR person words)
    added: int = 0

    @property
    def size(self) -> int:
        """The number of word ids the tokenizer has (the end of `v_range`)."""
        return self.words[1]


class TxtDb:
    """One txt_db folder, read as UNITER's `TxtTokLmdb` reads it."""

    def __init__(self, path: Path, lengths: str = "id2len.json"):
        self.path = Path(path)
        if not (self.path / "data.mdb").is_file():
            raise VLPruneError(f"{self.path}: not a UNITER txt_db (no data.mdb)")
        self.lengths_file = lengths

    @cached_property
    def vocabulary(self) -> Vocabulary:
        meta = self.json("meta.json")
        where = self.path / "meta.json"
        if not isinstance(meta, dict):
            raise VLPruneError(f"{where}: expected a JSON object")
        for name in (*META_IDS, "v_range"):
            if name not in meta:
                raise VLPruneError(f"{where}: {name!r} is missing")
        ids = [meta[name] for name in META_IDS]
        words = meta["v_range"]
        if (
            not isinstance(words, list)
            or len(words) != 2
            or not all(isinstance(i, int) and i >= 0 for i in [*ids, *words])
        ):
            raise VLPruneError(f"{where}: CLS, SEP, MASK, UNK and v_range must be token ids")
        tokenizer = str(meta.get("tokenizer") or meta.get("toker") or meta.get("bert") or "")
        return Vocabulary(*ids, words=(words[0], words[1]), tokenizer=tokenizer)

    @cached_property
    def ids(self) -> np.ndarray:
        """The ids of the split's examples, in the order of its lengths file (`id2len.json`:
        id → number of word ids), as one array of UTF-8 bytes: millions of Python strings would
        be copied into every DataLoader worker as their reference counts change."""
        lengths = self.json(self.lengths_file)
        if not isinstance(lengths, dict) or not all(isinstance(n, int) for n in lengths.values()):
            raise VLPruneError(f"{self.path / self.lengths_file}: expected {{id: length}}")
        return np.array([key.encode("utf-8") for key in lengths], dtype=np.bytes_)

    def example_ids(self) -> Iterator[str]:
        """The ids of the split's examples, in order."""
        return (key.decode("utf-8") for key in self.ids)

    def json(self, name: str) -> Any:
        """A JSON file of the folder (meta.json, txt2img.json, refs.json, …)."""
        path = self.path / name
        if not path.is_file():
            raise VLPruneError(f"{path}: missing from the txt_db")
        return read_json(path)

    def __getitem__(self, key: str) -> dict[str, Any]:
        """The example stored under `key`, which must be a map holding `input_ids`."""
        where = f"{self.path}: key {key!r}"
        raw = read(self.path, key)
        if raw is None:
            raise VLPruneError(f"{where}: listed in {self.lengths_file} but not stored")
        try:
            example = decode_text_example(raw)
        except BadValue as exc:
            raise VLPruneError(f"{where}: {exc}") from exc
        if not isinstance(example, dict):
            raise VLPruneError(f"{where}: expected an example map, found {type(example).__name__}")
        ids = example.get("input_ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise VLPruneError(f"{where}: 'input_ids' is not a list of token ids")
        return example

    def examples(self) -> list[tuple[str, dict[str, Any]]]:
        """(id, example) for every id of the split, in the order of its lengths file."""
        return [(key, self[key]) for key in self.example_ids()]

    def with_specials(self, ids: list[int]) -> tuple[int, ...]:
        """[CLS] ids [SEP], as UNITER's `combine_inputs` builds a single text."""
        return (self.vocabulary.cls, *ids, self.vocabulary.sep)

    def check(self) -> None:
        """Every id of the lengths file is stored: one pass over the database's keys, no
        values read, so a truncated or mismatched database fails before training."""
        stored = set(stored_keys(self.path))
        missing = [key for key in self.example_ids() if key not in stored]
        if missing:
            listed = ", ".join(repr(key) for key in missing[:5])
            raise VLPruneError(
                f"{self.path}: {len(missing)} of the {len(self.ids)} ids of "
                f"{self.lengths_file} are not stored ({listed}{', …' if len(missing) > 5 else ''})"
            )

    def image_keys(self) -> dict[str, str | list[str]]:
        """txt2img.json: example id → the img_db key(s) of its image(s)."""
        keys = self.json("txt2img.json")
        if not isinstance(keys, dict):
            raise VLPruneError(f"{self.path / 'txt2img.json'}: expected {{id: image key(s)}}")
        return keys


class TxtDbExamples(LazySequence):
    """The examples of one split's txt_dbs in order, each decoded when asked for (in a
    DataLoader worker, during training) and made a task's example by `parse(db, key, record)`:
    UNITER's pre-training texts are millions, too many to hold decoded."""

    def __init__(self, dbs: list[TxtDb], parse: Callable[[TxtDb, str, dict[str, Any]], Any]):
        self.dbs, self.parse = dbs, parse
        self.starts = list(itertools.accumulate((len(db.ids) for db in dbs), initial=0))

    def __len__(self) -> int:
        return self.starts[-1]

    def item(self, index: int) -> Any:
        which = bisect.bisect_right(self.starts, index) - 1
        db = self.dbs[which]
        key = db.ids[index - self.starts[which]].decode("utf-8")
        return self.parse(db, key, db[key])

    def __iter__(self) -> Iterator[Any]:
        for db in self.dbs:
            for key in db.example_ids():
                yield self.parse(db, key, db[key])


def split_dbs(
    data: Path, prefix: str, split: str, lengths: str = "id2len.json"
) -> list[TxtDb] | None:
    """The txt_dbs of `split` in a folder laid out as UNITER's download scripts leave it:
    `txt_db/<prefix>_<part>.db` for each '+'-joined part of `split` (UNITER trains VQA on
    `train+trainval`), also found in a folder under `txt_db/` (RefCOCO's `re/`) or in the folder
    itself; their examples are the ids of `lengths`. None when the folder has no txt_db of the
    task at all."""
    if not has_dbs(data, prefix):
        return None
    found = []
    for part in split.split("+"):
        path = locate(data, f"{prefix}_{part}.db")
        if path is None:
            known = ", ".join(sorted(p.name for p in _candidates(data, f"{prefix}_*.db")))
            raise VLPruneError(
                f"{data}: split {split!r} needs txt_db {prefix}_{part}.db, which is not there "
                f"(found {known})"
            )
        found.append(TxtDb(path, lengths))
    return found


def has_dbs(data: Path, prefix: str) -> bool:
    """Whether the folder holds txt_dbs named `<prefix>_*.db`."""
    return any(_candidates(data, f"{prefix}_*.db"))


def _folders(data: Path) -> list[Path]:
    txt_db = data / "txt_db"
    under = sorted(p for p in txt_db.iterdir() if p.is_dir()) if txt_db.is_dir() else []
    return [txt_db, *under, data]


def _candidates(data: Path, pattern: str) -> Iterator[Path]:
    for folder in _folders(data):
        if folder.is_dir():
            yield from (p for p in folder.glob(pattern) if p.is_dir())


def locate(data: Path, name: str) -> Path | None:
    """The folder `name` (a txt_db, `vqa_train.db`) where UNITER's layout would keep it."""
    return next((f / name for f in _folders(data) if (f / name).is_dir()), None)
