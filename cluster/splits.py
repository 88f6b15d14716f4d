"""Which files of a corpus directory hold which split, by the file-naming convention of `datasets`.

``load_dataset("json", data_dir=DIR)`` reads ``DIR/train.jsonl`` and ``DIR/test.jsonl`` as two splits; a
directory that concatenated them would train on the test documents without a word. So a directory whose
file names (or, for .txt corpora, top folder names) name splits contributes only the split asked for:
``train`` for ingestion, ``test`` for `cbtm eval --corpus DIR`. A directory that names no split is read whole.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from ground.errors import UserInputError

log = logging.getLogger(__name__)

# The keywords of `datasets.data_files.SPLIT_KEYWORDS` (tests/cluster/test_splits.py checks they agree).
SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                  "test": ("test", "testing", "eval", "evaluation")}
# A keyword counts as a whole word: at the start of a name or after a separator, and before one or the end,
# the separators of `datasets`' patterns ("train-00000-of-00002.parquet", "20ng_test.jsonl.gz", "dev.csv").
_SEP = r"[-._ 0-9]"
_PATTERNS = {split: re.compile(rf"(?:^|{_SEP})(?:{'|'.join(words)})(?:{_SEP}|$)")
             for split, words in SPLIT_KEYWORDS.items()}


def split_of(relative: Path) -> str | None:
    """The split that a corpus file's path relative to its directory names ("train" | "validation" | "test"),
    or None. Only the top level counts: the file's own name, or its top folder for a .txt corpus
    (``test/pos/1.txt`` -> "test"; ``law/test/1.txt`` -> None: a topic folder deeper down is not a split)."""
    name = relative.parts[0].lower()
    return next((split for split, pattern in _PATTERNS.items() if pattern.search(name)), None)


def files_of_split(directory: Path, files: list[Path], split: str) -> list[Path]:
    """The ``files`` (inside ``directory``) that hold ``split``: all of them when none names a split; those
    that name ``split``; for "train" when none does, those that name no split (``corpus.jsonl`` beside
    ``test.jsonl``). The log names the files left out. Raises UserInputError when none is left."""
    named = {f: split_of(f.relative_to(directory)) for f in files}
    if not any(named.values()):
        return files
    # For "train" with no file naming it, the files that name no split; `named` is looked up, never searched.
    wanted = None if split == "train" and split not in named.values() else split
    chosen = [f for f in files if named[f] == wanted]
    if not chosen:
        found = sorted({s for s in named.values() if s})
        raise UserInputError(f"corpus directory {directory} names its files by split ({', '.join(found)}) but "
                             f"none holds the {split} split: pass the file to read, e.g. --corpus {files[0]}")
    left_out = [f for f in files if named[f] != wanted]
    log.info("corpus %s: reading its %s split (%s), as `datasets` would; left out: %s (pass a file to read "
             "another)", directory, split, _names(chosen, directory), _names(left_out, directory))
    return chosen


def _names(files: list[Path], directory: Path, shown: int = 3) -> str:
    names = ", ".join(str(f.relative_to(directory)) for f in files[:shown])
    return names + (f" and {len(files) - shown} more" if len(files) > shown else "")
