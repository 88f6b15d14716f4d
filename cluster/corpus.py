"""Corpus ingestion: read any supported file through `datasets`, clean, deduplicate, split, write Parquet."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.config import CorpusConfig
from ensemble.rundir import UserInputError

log = logging.getLogger(__name__)

# suffix -> datasets builder name
FORMATS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json",
           ".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv"}
RESERVED = ("id", "text", "split")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def resolve_corpus_files(path: Path) -> tuple[str, list[str]]:
    """Return (datasets builder, files) for a corpus file or a directory of corpus files of one format."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"corpus {path} does not exist: pass --corpus with a JSONL, Parquet or CSV file "
                             "or a directory of them")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and _suffix(p) in FORMATS)
    if not files:
        raise UserInputError(f"corpus directory {path} holds no .jsonl/.jsonl.gz/.parquet/.csv files")
    builders = {FORMATS.get(_suffix(f)) for f in files}
    if None in builders:
        raise UserInputError(f"corpus {path}: unknown format {_suffix(files[0])!r}; supported: "
                             + ", ".join(sorted(FORMATS)))
    if len(builders) > 1:
        raise UserInputError(f"corpus directory {path} mixes formats {sorted(builders)}: keep one format per corpus")
    return builders.pop(), [str(f) for f in files]


def load_corpus(path: Path):
    """Open the corpus as a memory-mapped `datasets.Dataset` (not loaded into RAM)."""
    import datasets

    builder, files = resolve_corpus_files(path)
    if all(Path(f).stat().st_size == 0 for f in files):
        raise UserInputError(f"corpus {path} is empty: it holds no documents")
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise UserInputError(f"corpus {path} could not be read as {builder}: {str(exc).splitlines()[0]}") from exc


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
    ds = load_corpus(Path(cfg.path))
    if len(ds) == 0:
        raise UserInputError(f"corpus {cfg.path} is empty: it holds no documents")
    for kind, name in (("text", cfg.text_field), ("id", cfg.id_field)):
        if name and name not in ds.column_names:
            raise UserInputError(f"corpus {cfg.path} has no {kind} field {name!r}; its fields are "
                                 f"{', '.join(ds.column_names)}: pass --{kind}-field NAME")
    if len(ds) < min_documents:
        raise UserInputError(f"{min_documents} clusters requested but corpus {cfg.path} has only {len(ds)} "
                             "documents: pass a smaller --clusters or a larger corpus")
    return ds


def ingest_corpus(cfg: CorpusConfig, out_path: Path) -> Path:
    """Clean, deduplicate and split the corpus at ``cfg.path`` into ``out_path`` (Parquet).

    Output columns: ``id`` (str), ``text`` (str), ``split`` ("train" | "heldout"), plus every other
    scalar column of the input (for example a label that only evaluation reads).
    Raises UserInputError for a missing/unknown/empty corpus or a missing text field.
    """
    ds = check_corpus(cfg)
    extras = [c for c in ds.column_names if c not in (cfg.text_field, cfg.id_field) and c not in RESERVED
              and str(ds.features[c].dtype) in ("string", "large_string", "int64", "int32", "bool")]
    counts = {"read": 0, "not_text": 0, "too_short": 0, "truncated": 0, "duplicate": 0, "kept": 0, "heldout": 0}
    seen: set[bytes] = set()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    writer = None
    try:
        for batch in ds.iter(batch_size=10_000):
            rows = _clean_batch(cfg, batch, extras, seen, counts)
            if not rows["id"]:
                continue
            table = pa.table({k: pa.array(v) for k, v in rows.items()})
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table.cast(writer.schema))
        if writer is None:
            raise UserInputError(f"corpus {cfg.path} is empty after cleaning ({_describe(counts)}): "
                                 "lower corpus.min_chars or check --text-field")
        writer.close()
        tmp.replace(out_path)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    log.info("ingest: %s", _describe(counts))
    return out_path


def _clean_batch(cfg: CorpusConfig, batch: dict, extras: list[str], seen: set, counts: dict) -> dict:
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
        doc_id = str(batch[cfg.id_field][i]) if cfg.id_field else document_id(text)
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
    return (f"{counts['read']} read, {counts['not_text']} not text, {counts['too_short']} too short, "
            f"{counts['duplicate']} duplicates, {counts['truncated']} truncated -> {counts['kept']} kept "
            f"({counts['kept'] - counts['heldout']} train / {counts['heldout']} held-out)")


def read_documents(corpus_path: Path, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read the ingested corpus (optionally one split) as a pyarrow Table."""
    filters = [("split", "=", split)] if split else None
    return pq.read_table(corpus_path, columns=columns, filters=filters)
