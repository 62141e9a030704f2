"""What every task checks of UNITER's txt_dbs before training: the examples are stored, their
images are in the folder (or its img_db), and one tokenizer made their texts."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from vl_prune.data.inputs import ImageStore
from vl_prune.data.txt_db import TxtDb
from vl_prune.errors import VLPruneError
from vl_prune.task import Task


def use_txt_dbs(task: Task, dbs: list[TxtDb], store: ImageStore) -> None:
    """Check the txt_dbs a split is read from and record their tokenizer as the task's
    `text_vocabulary` (whose size the backbone's vocabulary must match): every example id is
    stored, every image `txt2img.json` names for it is in the store. An incomplete download
    fails here, not hours into training."""
    check_images(dbs, store)
    record_vocabulary(task, dbs)


def record_vocabulary(task: Task, dbs: list[TxtDb]) -> None:
    """The txt_dbs' tokenizer as the task's `text_vocabulary`; every split must share it (the
    words a task adds to it, `added`, are the task's to say)."""
    for db in dbs:
        known = task.text_vocabulary
        if known is not None and replace(known, added=0) != db.vocabulary:
            raise VLPruneError(f"{db.path}: tokenised unlike the task's other txt_dbs (meta.json)")
        task.text_vocabulary = known or db.vocabulary


def check_images(dbs: list[TxtDb], store: ImageStore) -> None:
    """Every example id is stored, and every image `txt2img.json` names for it is in the
    store."""
    for db in dbs:
        db.check()
        images = db.image_keys()
        for key in db.example_ids():
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
