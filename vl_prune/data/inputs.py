"""Turning texts and image names into a VLBatch for a backbone: tokens, and region features or
pixels read from a data folder.

A data folder holds pictures as `images/<name>.png` or `.jpg` (or in ViLT's tables:
`ArrowImage`) and region features as `features/<name>.npz` (BUTD's per-image npz, as UNITER's
feature extraction writes them), as a UNITER img_db under `img_db/` (`vl_prune.data.img_db`),
or as LXMERT's `*obj*.tsv` files (`vl_prune.data.tsv`). npz files and img_dbs give an image's
regions by the same rule (`vl_prune.data.regions.RegionRule`), so the same image reads the same
in either layout. Texts are strings (tokenised here) or, from a UNITER txt_db, word-piece ids
already framed by [CLS] and [SEP].
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vl_prune.backbone import Backbone, Inputs, VLBatch
from vl_prune.data.arrow import ArrowImage
from vl_prune.data.img_db import open_img_db
from vl_prune.data.regions import FEATURE_FILES, Regions
from vl_prune.data.tsv import open_tsv_store
from vl_prune.errors import VLPruneError

#: a text as a UNITER txt_db stores it, with [CLS] first and [SEP] last: (101, 1188, 1110, 102)
TokenIds = tuple[int, ...]
#: one image (a name, or a picture in a ViLT table), or several whose regions are read as one
#: (VCR's ground-truth and detected boxes)
ImageName = str | tuple[str, ...] | ArrowImage
PAD_ID = 0  # BERT's [PAD]; UNITER pads its token ids with 0
PICTURES = (".png", ".jpg", ".jpeg")


def _no_keys(name: str) -> list[str]:
    return []


class ImageStore:
    """The images of a data folder, as region features or as pictures.

    Region features of an image come from `features/<name>.npz` when that file exists, else from
    the UNITER img_db under `img_db/`. `keys(name)` gives the img_db keys an annotation's image
    name stands for, as UNITER names them (`nlvr2_dev-850-0-img0.npz` for `dev-850-0-img0`,
    `coco_val2014_000000131089.npz` for `COCO_val2014_000000131089`); the name itself, with and
    without `.npz`, is always tried last (a txt_db names images by their key).
    """

    def __init__(self, root: Path, keys: Callable[[str], list[str]] = _no_keys):
        self.root = Path(root)
        self.keys = keys
        self._found: dict[str, str | None] = {}
        self._present: set[ImageName] = set()

    def regions(self, name: ImageName) -> Regions:
        """`features` (N × D) and `norm_bb` (N × 6) of one image (several joined, in order)."""
        if isinstance(name, tuple):
            parts = [self.regions(part) for part in name]
            return {k: np.concatenate([p[k] for p in parts]) for k in ("features", "norm_bb")}
        if isinstance(name, ArrowImage):
            raise VLPruneError(
                f"{name.path}: ViLT's tables hold pictures, not the region features this "
                "backbone reads"
            )
        path = self.root / "features" / f"{name}.npz"
        if path.is_file():
            return FEATURE_FILES.get(path)
        key = self._key(name)
        if key is not None:
            return open_img_db(self.root / "img_db").regions(key)
        if open_tsv_store(self.root).has(name):
            return open_tsv_store(self.root).regions(name)
        raise VLPruneError(f"{path}: region features of image {name!r} are missing")

    def picture(self, name: ImageName) -> Image.Image:
        if isinstance(name, ArrowImage):
            return name.picture()
        path = self._picture_file(name) if isinstance(name, str) else None
        if path is None:
            raise VLPruneError(
                f"{self.root / 'images' / str(name)}.png: image {name!r} is missing (nor .jpg)"
            )
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise VLPruneError(f"{path}: not a readable image ({exc})") from exc

    def has(self, name: ImageName) -> bool:
        """Whether the folder holds the image in any form (npz, img_db entry or PNG): what a
        reader checks before accepting an annotation line."""
        if isinstance(name, tuple):
            return all(self.has(part) for part in name)
        if isinstance(name, ArrowImage):
            return True
        if (self.root / "features" / f"{name}.npz").is_file():
            return True
        if self._picture_file(name) is not None:
            return True
        if self._key(name) is not None:
            return True
        return open_tsv_store(self.root).has(name)

    def require(self, name: ImageName, where: str) -> None:
        """A clear error at `where` when the image is missing; each name is looked up once, as
        annotation files ask many questions of one image."""
        if name in self._present:
            return
        if not self.has(name):
            missing = next(part for part in _parts(name) if not self.has(part))
            if missing.endswith(".npz"):  # an img_db key, as a txt_db names its images
                raise VLPruneError(f"{where}: image {missing} is not in {self.root / 'img_db'}")
            keys = ", ".join(self._candidates(missing))
            raise VLPruneError(
                f"{where}: image {missing} is missing (no features/{missing}.npz, "
                f"images/{missing}.png or .jpg, img_db entry {keys} or line of an *obj*.tsv)"
            )
        self._present.add(name)

    def resolve(self, name: str, where: str) -> str:
        """The name the image is read under: its own (a features/ or images/ file) or its img_db
        key, so that readers whose keys depend on more than the name (the split) can hand the
        collation a plain name."""
        self.require(name, where)
        own = (self.root / "features" / f"{name}.npz").is_file() or self._picture_file(name)
        return name if own else self._key(name)

    def _picture_file(self, name: str) -> Path | None:
        """`images/<name>.png` (or `.jpg`, `.jpeg`: COCO's and Flickr's pictures as released)."""
        paths = (self.root / "images" / f"{name}{suffix}" for suffix in PICTURES)
        return next((path for path in paths if path.is_file()), None)

    def _candidates(self, name: str) -> list[str]:
        """The img_db keys an image may be stored under: a key stands for itself."""
        if name.endswith(".npz"):
            return [name]
        return list(dict.fromkeys([*self.keys(name), name, f"{name}.npz"]))

    def _key(self, name: str) -> str | None:
        """The img_db key of an image, looked up once."""
        if name not in self._found:
            db = self.root / "img_db"
            found = open_img_db(db).find(self._candidates(name)) if db.is_dir() else None
            self._found[name] = found
        return self._found[name]


def _parts(name: ImageName) -> tuple:
    return name if isinstance(name, tuple) else (name,)


def encode(
    texts: Sequence[str] | Sequence[TokenIds],
    images: Sequence[ImageName],
    backbone: Backbone | Inputs,
    store: ImageStore,
    image_type: int = 1,
    pairs: Sequence[str] | Sequence[TokenIds] | None = None,
    max_length: int = 60,
    new_words: int = 0,
) -> VLBatch:
    """One VLBatch: `texts` (with `pairs` as second segments, e.g. VCR answers) and the named
    images, as the backbone's image input wants them. Texts longer than `max_length` tokens (or
    than the backbone has positions) are cut, keeping their last [SEP]. Token ids must be words
    of the backbone, or of the `new_words` a task's head adds to it."""
    # A model reads no text longer than its position embeddings (ViLT's are 40).
    max_length = min(max_length, getattr(backbone, "max_positions", None) or max_length)
    if texts and not isinstance(texts[0], str):
        vocab_size = getattr(backbone, "vocab_size", None)
        if vocab_size is not None:
            vocab_size += new_words
        batch = _token_ids(texts, pairs, max_length, vocab_size)
    else:
        tokenizer = backbone.tokenizer
        max_length = min(max_length, tokenizer.model_max_length)
        batch = _tokenized(tokenizer, texts, pairs, max_length)
        _check_ids(batch.input_ids, getattr(backbone, "vocab_size", None), "the tokenizer's")
    batch.image_type = image_type
    if backbone.image_input == "regions":
        regions = [store.regions(name) for name in images]
        for name, r in zip(images, regions, strict=True):
            if r["features"].shape[1] != backbone.img_dim:
                raise VLPruneError(
                    f"region features of image {name!r} are {r['features'].shape[1]}-d; "
                    f"{backbone.label} reads {backbone.img_dim}-d"
                )
        width = max(len(r["features"]) for r in regions)
        feats = torch.zeros(len(images), width, backbone.img_dim, dtype=torch.float16)
        boxes = torch.zeros(len(images), width, 6)
        mask = torch.zeros(len(images), width, dtype=torch.long)
        for i, r in enumerate(regions):
            n = len(r["features"])
            feats[i, :n] = torch.from_numpy(r["features"].astype(np.float16))
            boxes[i, :n] = torch.from_numpy(r["norm_bb"].astype(np.float32))
            mask[i, :n] = 1
        batch.region_feats, batch.region_boxes, batch.region_mask = feats, boxes, mask
    else:
        pixels = backbone.image_processor(
            [store.picture(name) for name in images], return_tensors="pt"
        )
        batch.pixel_values, batch.pixel_mask = pixels["pixel_values"], pixels["pixel_mask"]
    return batch


#: each tokenizer's tokens of the texts it was given: every epoch tokenises the same texts again
#: (and, with no loader workers, the CPU default, every round of a lottery): the tokenizer's own
#: batch calls cost 4% of a world training run (uniter-tiny, NLVR2, 450 steps, one thread)
_TOKENS: weakref.WeakKeyDictionary[Any, dict[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()
#: texts kept a tokenizer, the first kept dropped beyond it: each is one small tensor of its ids
#: (and token types), a few hundred bytes, so some tens of MB a process at most
TOKENS_KEPT = 1 << 16


def _tokenized(
    tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int
) -> VLBatch:
    """What `tokenizer(texts, pairs, padding=True, truncation=True, max_length=…)` gives, each
    distinct text tokenised once: the rows it pads are the tokens it gives each text alone."""
    from transformers import PreTrainedTokenizerBase

    side = getattr(tokenizer, "padding_side", None)
    if not (isinstance(tokenizer, PreTrainedTokenizerBase) and tokenizer.pad_token_id is not None):
        side = None
    if side not in ("left", "right"):
        # A plugin's own tokenizer, or one that cannot pad (its call says why): as it is called.
        tokens = tokenizer(
            list(texts),
            list(pairs) if pairs is not None else None,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return VLBatch(tokens["input_ids"], tokens["attention_mask"], tokens.get("token_type_ids"))
    kept = _TOKENS.setdefault(tokenizer, {})
    # Added words and the truncation side change a text's tokens, as the length does.
    state = (max_length, tokenizer.truncation_side, len(tokenizer))
    keys = [(text, pair, state) for text, pair in _zip(texts, pairs)]
    rows = {key: kept[key] for key in keys if key in kept}
    if new := [key for key in dict.fromkeys(keys) if key not in rows]:
        given = tokenizer(
            [text for text, _, _ in new],
            [pair for _, pair, _ in new] if pairs is not None else None,
            truncation=True,
            max_length=max_length,
        )
        names = [name for name in ("input_ids", "token_type_ids") if name in given]
        for i, key in enumerate(new):
            rows[key] = kept[key] = torch.tensor([given[name][i] for name in names])
        while len(kept) > TOKENS_KEPT:
            del kept[next(iter(kept))]
    width = max((rows[key].shape[1] for key in keys), default=0)
    ids = torch.full((len(keys), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(keys), width), dtype=torch.long)
    types = None
    if keys and rows[keys[0]].shape[0] == 2:  # ids, then token types
        types = torch.full((len(keys), width), tokenizer.pad_token_type_id, dtype=torch.long)
    for i, key in enumerate(keys):
        row = rows[key]
        n = row.shape[1]
        span = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, span] = row[0]
        mask[i, span] = 1
        if types is not None:
            types[i, span] = row[1]
    return VLBatch(input_ids=ids, attention_mask=mask, token_type_ids=types)


def _token_ids(
    texts: Sequence[TokenIds],
    pairs: Sequence[TokenIds] | None,
    max_length: int,
    vocab_size: int | None,
) -> VLBatch:
    """Token ids padded with [PAD] into a batch; a pair's second segment follows the first
    (it carries its own closing [SEP]). Every token is of type 0, as in UNITER."""
    rows = [tuple(t) + (tuple(p) if pairs is not None else ()) for t, p in _zip(texts, pairs)]
    rows = [row if len(row) <= max_length else row[: max_length - 1] + row[-1:] for row in rows]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    _check_ids(ids, vocab_size, "the txt_db's")
    return VLBatch(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))


def _check_ids(ids: torch.Tensor, vocab_size: int | None, whose: str) -> None:
    """Token ids must be rows of the backbone's word embedding."""
    if vocab_size is not None and ids.numel() and int(ids.max()) >= vocab_size:
        raise VLPruneError(
            f"token id {int(ids.max())} of {whose} texts is outside the backbone's vocabulary of "
            f"{vocab_size} words: they were tokenised for another model"
        )


def _zip(texts: Sequence, pairs: Sequence | None):
    return zip(texts, pairs if pairs is not None else [None] * len(texts), strict=True)
