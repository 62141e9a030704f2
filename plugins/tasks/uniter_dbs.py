"""What every task checks of UNITER's txt_dbs before training: the examples are stored and
their images are in the folder (or its img_db)."""

from __future__ import annotations

from typing import Any

from vl_prune.data.txt_db import TxtDb
from vl_prune.errors import VLPruneError
from vl_prune_plugins.tasks.inputs import ImageStore


def check_images(dbs: list[TxtDb], store: ImageStore) -> None:
    """Every example id is stored, and every image `txt2img.json` names for it is in the
    store: an incomplete download fails here, not hours into training."""
    for db in dbs:
        db.check()
        images = db.image_keys()
        for key in db.lengths:
            where = f"{db.path / 'txt2img.json'}: id {key!r}"
            if key not in images:
                raise VLPruneError(f"{where}: no image given")
            names = images[key]
            for name in [names] if isinstance(names, str) else names:
                store.require(name, where)


def image_names(record: dict[str, Any], count: int, where: str) -> list[str]:
    """An example's `img_fname`: one img_db key, or a list (or tuple) of `count`."""
    names = record.get("img_fname")
    if count == 1 and isinstance(names, str):
        return [names]
    if (
        not isinstance(names, (list, tuple))
        or len(names) != count
        or not all(isinstance(n, str) for n in names)
    ):
        raise VLPruneError(f"{where}: 'img_fname' should name {count} image(s), got {names!r}")
    return list(names)
