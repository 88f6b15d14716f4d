"""Corpus ingestion: open any supported source through `datasets`, clean, deduplicate, split, write Parquet.

Sources: JSON Lines (plain or .gz), Parquet, CSV (a file or a directory of one format), a directory of
.txt files (one document each, id = relative path), a directory written by ``Dataset.save_to_disk`` and a
hub dataset ``hf:NAME[:CONFIG]``. Every source is opened as a memory-mapped ``datasets.Dataset``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.cleaning import decodable_copies, txt_to_jsonl
from cluster.config import CorpusConfig
from cluster.splits import files_of_split
from ground.errors import UserInputError
from ground.files import atomic_write_text

log = logging.getLogger(__name__)

# suffix -> datasets builder name
FORMATS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json",
           ".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv"}
RESERVED = ("id", "text", "split")
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # written by save_to_disk
SUPPORTED = ".jsonl(.gz), .parquet, .csv, a directory of them or of .txt files, a save_to_disk directory, hf:NAME"


@dataclass
class OpenedCorpus:
    """An opened source: ``dataset`` (memory-mapped `datasets.Dataset`), its ``format`` (json | csv | parquet |
    txt | disk | hub), ``undecodable`` documents skipped for bytes that are not UTF-8, ``id_field``, the
    column holding the source's own ids (txt: the file's relative path; None: derive ids from content), and
    ``malformed`` JSON lines skipped (not JSON objects)."""

    dataset: Any
    format: str
    undecodable: int = 0
    id_field: str | None = None
    malformed: int = 0


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def resolve_corpus_files(path: Path, split: str = "train") -> tuple[str, list[str]]:
    """Return (builder, files) for a corpus file or a directory of corpus files of one format.

    builder is a `datasets` builder name, or "txt" for a directory of .txt files (searched recursively). A
    directory whose files name splits contributes the files of ``split`` only (`cluster.splits`).
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"corpus {path} does not exist: pass --corpus with one of: {SUPPORTED}")
    if path.is_file() and _suffix(path) == ".txt":
        raise UserInputError(f"corpus {path} is a single .txt file: pass the directory of .txt files "
                             "(one document each), or a JSONL, Parquet or CSV file")
    if path.is_file():
        return _builder(path, [path]), [str(path)]
    files = sorted(p for p in path.iterdir() if p.is_file() and _suffix(p) in FORMATS)
    if not files:
        texts = sorted(p for p in path.rglob("*.txt")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if texts:
            return "txt", [str(f) for f in files_of_split(path, texts, split)]
        raise UserInputError(f"corpus directory {path} holds no .jsonl/.jsonl.gz/.parquet/.csv/.txt files "
                             "and is not a save_to_disk dataset")
    files = files_of_split(path, files, split)
    return _builder(path, files), [str(f) for f in files]


def _builder(path: Path, files: list[Path]) -> str:
    builders = {FORMATS.get(_suffix(f)) for f in files}
    if None in builders:
        raise UserInputError(f"corpus {path}: unknown format {_suffix(files[0])!r}; supported: {SUPPORTED}")
    if len(builders) > 1:
        raise UserInputError(f"corpus directory {path} mixes formats {sorted(builders)}: keep one format per corpus")
    return builders.pop()


def open_corpus(path: str | Path, split: str = "train") -> OpenedCorpus:
    """Open ``path`` (any supported source, see the module docstring) without loading it into RAM; of a
    directory whose files name splits, the files of ``split`` ("train" | "validation" | "test").

    Documents that cannot be read (undecodable bytes in a JSONL line, CSV record or .txt file; a JSON line that
    is not an object) are skipped and counted (`cluster.cleaning`).
    """
    import datasets

    datasets.disable_progress_bars()
    spec = str(path)
    if spec.startswith("hf:"):
        return OpenedCorpus(_load_hub(spec), "hub")
    path = Path(spec)
    if path.is_dir() and any((path / m).exists() for m in SAVED_MARKERS):
        return OpenedCorpus(_load_saved(path), "disk")
    builder, files = resolve_corpus_files(path, split)
    if all(Path(f).stat().st_size == 0 for f in files):
        raise UserInputError(f"corpus {path} is empty: it holds no documents")
    if builder == "parquet":
        _check_parquet(files)
    with tempfile.TemporaryDirectory(prefix="cbtm-decode-") as tmp:
        if builder == "txt":
            readable, dropped = txt_to_jsonl(files, path, Path(tmp) / "docs.jsonl")
        else:
            readable, dropped = decodable_copies(builder, files, Path(tmp))
        _check_not_empty(path, readable, dropped)
        try:
            ds = _load_files("json" if builder == "txt" else builder, readable, path)
        except UserInputError:
            if builder != "json":
                raise
            # Some line is not JSON: read again from copies without the lines that cannot be read.
            (Path(tmp) / "checked").mkdir()
            readable, dropped = decodable_copies(builder, files, Path(tmp) / "checked", check_json=True)
            _check_not_empty(path, readable, dropped)
            ds = _load_files(builder, readable, path)
    if readable != files:
        _drop_cache(ds)
    if dropped.undecodable:
        log.warning("corpus %s: skipped %d document(s) with undecodable (non-UTF-8) bytes", path, dropped.undecodable)
    if dropped.malformed:
        log.warning("corpus %s: skipped %d line(s) that are not JSON objects (first: %s)", path, dropped.malformed,
                    ", ".join(dropped.examples))
    return OpenedCorpus(ds, builder, dropped.undecodable, "path" if builder == "txt" else None, dropped.malformed)


def _check_not_empty(path: Path, readable: list[str], dropped) -> None:
    if all(Path(f).stat().st_size == 0 for f in readable):
        raise UserInputError(f"corpus {path} is empty after cleaning ({dropped.undecodable} documents with "
                             f"undecodable bytes, {dropped.malformed} malformed lines): re-encode it as UTF-8 JSON")


def _check_parquet(files: list[str]) -> None:
    for name in files:
        try:
            pq.read_schema(name)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError... for a file that is not Parquet
            raise UserInputError(f"corpus file {name} is not a readable Parquet file ({_first_line(exc)}): "
                                 "re-export it, or give it the suffix of its real format") from exc


def load_corpus(path: str | Path, split: str = "train"):
    """Open the corpus as a memory-mapped `datasets.Dataset` (not loaded into RAM; see `open_corpus`)."""
    return open_corpus(path, split).dataset


def _load_files(builder: str, files: list[str], where: Path):
    import datasets

    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)  # datasets logs a failed file itself, twice: we say it once
    try:
        return datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        cause = exc.__cause__ or exc.__context__ or exc
        if isinstance(cause, UserInputError):
            raise cause from exc
        raise UserInputError(f"corpus {where} could not be read as {builder}: {_first_line(cause)}") from exc
    finally:
        logger.setLevel(level)


def _drop_cache(ds) -> None:
    """Delete the Arrow cache built from a temporary copy: its source path is never seen again, so it would
    never be reused. The dataset stays readable: its files are already memory-mapped (POSIX keeps them)."""
    for entry in ds.cache_files:
        folder = Path(entry["filename"]).parent
        shutil.rmtree(folder, ignore_errors=True)
        for parent in list(folder.parents)[:2]:  # the builder's now-empty config/version folders
            with contextlib.suppress(OSError):
                parent.rmdir()


def _load_saved(path: Path):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise UserInputError(f"corpus {path} looks like a save_to_disk dataset but could not be loaded: "
                             f"{_first_line(exc)}") from exc
    return _single(loaded, path)


def _load_hub(spec: str):
    import datasets

    name, _, config = spec[3:].partition(":")
    if not name:
        raise UserInputError(f"corpus {spec!r} names no dataset: use hf:NAME or hf:NAME:CONFIG")
    log.info("corpus: loading %s from the Hugging Face hub (or its local cache)", spec)
    try:
        loaded = datasets.load_dataset(name, config or None)
    except Exception as exc:
        raise UserInputError(f"cannot load hub dataset {name!r} ({type(exc).__name__}: {_first_line(exc)}): "
                             "where the network allows, save it with save_to_disk and pass that directory") from exc
    return _single(loaded, spec)


def _single(loaded, where):
    """A DatasetDict contributes its "train" split if it has one, else all its splits concatenated."""
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if "train" in loaded:
        log.info("corpus %s: using its 'train' split of %s", where, sorted(loaded))
        return loaded["train"]
    try:
        return datasets.concatenate_datasets(list(loaded.values()))
    except ValueError as exc:
        raise UserInputError(f"corpus {where}: its splits {sorted(loaded)} have different fields and cannot "
                             "be read as one corpus: save one split with save_to_disk") from exc


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def document_id(text: str) -> str:
    """Stable id derived from content (the same text always gets the same id)."""
    return "doc-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def heldout(doc_id: str, fraction: float) -> bool:
    """A document's split depends only on its id, so it never changes when the corpus grows."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return bucket < fraction


def check_corpus(cfg: CorpusConfig, min_documents: int = 1):
    """Fail fast, before any work starts: the corpus opens, has the fields, and enough rows.

    Returns the opened dataset. Row counts here are before cleaning; `ingest_corpus` checks again after.
    """
    return _check(cfg, min_documents).dataset


_OPENED: dict[tuple, OpenedCorpus] = {}  # the last corpus opened in this process, by path, size and mtime


def _open_once(spec: str) -> OpenedCorpus:
    """`open_corpus`, reused when the same unchanged source was opened last (the CLI's early check and the
    ingest stage then read, clean and warn once)."""
    path = Path(spec)
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    key = (spec, *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())) \
        if not spec.startswith("hf:") else None
    if key is None or key not in _OPENED:
        opened = open_corpus(spec)
        if key is None:
            return opened
        _OPENED.clear()
        _OPENED[key] = opened
    return _OPENED[key]


def _check(cfg: CorpusConfig, min_documents: int = 1) -> OpenedCorpus:
    opened = _open_once(cfg.path)
    ds = opened.dataset
    if len(ds) == 0:
        raise UserInputError(f"corpus {cfg.path} is empty: it holds no documents")
    for kind, name in (("text", cfg.text_field), ("id", cfg.id_field)):
        if name and name not in ds.column_names:
            raise UserInputError(f"corpus {cfg.path} has no {kind} field {name!r}; its fields are "
                                 f"{', '.join(ds.column_names)}: pass --{kind}-field NAME")
    if len(ds) < min_documents:
        raise UserInputError(f"{min_documents} clusters requested but corpus {cfg.path} has only {len(ds)} "
                             "documents: pass a smaller --clusters or a larger corpus")
    return opened


def ingest_corpus(cfg: CorpusConfig, out_path: Path) -> Path:
    """Clean, deduplicate and split the corpus at ``cfg.path`` into ``out_path`` (Parquet).

    Output columns: ``id`` (str), ``text`` (str), ``split`` ("train" | "heldout"), plus every other
    scalar column of the input (for example a label that only evaluation reads). The cleaning counts go
    to ``ingest.json`` beside it. Raises UserInputError for a missing/unknown/empty corpus or a missing
    field; documents with undecodable bytes are skipped and counted, never fatal.
    """
    opened = _check(cfg)
    ds, id_field = opened.dataset, cfg.id_field or opened.id_field
    extras = [c for c in ds.column_names if c not in (cfg.text_field, id_field) and c not in RESERVED
              and str(ds.features[c].dtype) in ("string", "large_string", "int64", "int32", "bool")]
    counts = {"read": opened.undecodable + opened.malformed, "undecodable": opened.undecodable,
              "malformed": opened.malformed, "not_text": 0, "too_short": 0,
              "truncated": 0, "duplicate": 0, "kept": 0, "heldout": 0}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seen: set[bytes] = set()
    batches = (_clean_batch(cfg, id_field, batch, extras, seen, counts) for batch in ds.iter(batch_size=10_000))
    _write_parquet(batches, out_path, lambda: UserInputError(
        f"corpus {cfg.path} is empty after cleaning ({_describe(counts)}): "
        "lower corpus.min_chars or check --text-field"))
    report = {"source": str(cfg.path), "format": opened.format, "id_field": id_field, "counts": counts,
              "summary": _describe(counts)}
    atomic_write_text(out_path.with_name("ingest.json"), json.dumps(report, indent=2) + "\n")
    log.info("ingest: %s", _describe(counts))
    return out_path


def _write_parquet(batches, out_path: Path, empty_error) -> None:
    """Write dicts of columns to ``out_path`` via a temporary sibling; ``empty_error()`` if no row came."""
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    writer = None
    try:
        for rows in batches:
            if not rows["id"]:
                continue
            table = pa.table({k: pa.array(v) for k, v in rows.items()})
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table.cast(writer.schema))
        if writer is None:
            raise empty_error()
        writer.close()
        tmp.replace(out_path)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise


def _clean_batch(cfg: CorpusConfig, id_field: str | None, batch: dict, extras: list[str], seen: set,
                 counts: dict) -> dict:
    rows: dict[str, list] = {"id": [], "text": [], "split": [], **{c: [] for c in extras}}
    texts = batch[cfg.text_field]
    for i, text in enumerate(texts):
        counts["read"] += 1
        if not isinstance(text, str):
            counts["not_text"] += 1
            continue
        text = text.strip()
        if len(text) < max(cfg.min_chars, 1):
            counts["too_short"] += 1
            continue
        if cfg.max_chars is not None and len(text) > cfg.max_chars:
            text = text[: cfg.max_chars]
            counts["truncated"] += 1
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in seen:
            counts["duplicate"] += 1
            continue
        seen.add(digest)
        doc_id = str(batch[id_field][i]) if id_field else document_id(text)
        split = "heldout" if heldout(doc_id, cfg.heldout_fraction) else "train"
        counts["kept"] += 1
        counts["heldout"] += split == "heldout"
        rows["id"].append(doc_id)
        rows["text"].append(text)
        rows["split"].append(split)
        for c in extras:
            rows[c].append(batch[c][i])
    return rows


def _describe(counts: dict) -> str:
    return (f"{counts['read']} read, {counts.get('undecodable', 0)} undecodable, {counts.get('malformed', 0)} "
            f"malformed, {counts['not_text']} not text, "
            f"{counts['too_short']} too short, "
            f"{counts['duplicate']} duplicates, {counts['truncated']} truncated -> {counts['kept']} kept "
            f"({counts['kept'] - counts['heldout']} train / {counts['heldout']} held-out)")


def read_documents(corpus_path: Path, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read the ingested corpus (optionally one split) as a pyarrow Table."""
    filters = [("split", "=", split)] if split else None
    return pq.read_table(corpus_path, columns=columns, filters=filters)
