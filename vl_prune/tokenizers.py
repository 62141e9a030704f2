"""Tokenizers from local files, for machines that reach no model hub: a folder holding a
tokenizer (`tokenizer.json` or `vocab.txt` with its config) or a BERT `vocab.txt` alone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vl_prune.checkpoint import reason
from vl_prune.errors import VLPruneError

#: files that make a folder a tokenizer folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def local_tokenizer(path: str | os.PathLike, lowercase: bool) -> Any:
    """A fast tokenizer from `path`. A folder is read with its own settings; a bare
    `vocab.txt` as BERT's WordPiece vocabulary, lowercased if `lowercase` (bert-base-uncased;
    UNITER's bert-base-cased is not)."""
    from transformers import AutoTokenizer, BertTokenizerFast

    path = Path(path).expanduser()
    try:
        if path.is_file():
            tokenizer = BertTokenizerFast(vocab=str(path), do_lower_case=lowercase)
        elif not path.is_dir():
            raise VLPruneError(f"--tokenizer {path}: no such file or folder")
        elif not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise VLPruneError(f"--tokenizer {path}: no {', '.join(TOKENIZER_FILES)} in the folder")
        elif not (path / "tokenizer_config.json").is_file() and (path / "vocab.txt").is_file():
            tokenizer = BertTokenizerFast(vocab=str(path / "vocab.txt"), do_lower_case=lowercase)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except VLPruneError:
        raise
    except Exception as exc:  # transformers raises many kinds for a bad tokenizer file
        raise VLPruneError(f"--tokenizer {path}: not a readable tokenizer ({reason(exc)})") from exc
    if len(tokenizer) <= len(tokenizer.all_special_ids):
        raise VLPruneError(f"--tokenizer {path}: holds no words besides the special tokens")
    return tokenizer


def beside(checkpoint: str | os.PathLike) -> Path | None:
    """A tokenizer kept with a weights file: its folder, if that holds tokenizer files."""
    folder = Path(checkpoint).expanduser()
    folder = folder.parent if folder.is_file() else folder
    if folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES):
        return folder
    return None
