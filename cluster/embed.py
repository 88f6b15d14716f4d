"""Document embeddings: the `Embedder` interface, the embedders a config names (sentence-transformers:
`cluster.minilm`; tf-idf: `cluster.tfidf`; both: `cluster.hybrid`), and the embed stage (independent,
resumable shards)."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.config import EmbedConfig
from cluster.hybrid import HybridEmbedder
from cluster.minilm import PROGRESS_CHUNK, SentenceTransformerEmbedder
from cluster.tfidf import TfidfEmbedder, fit_tfidf
from ground import interrupt
from ground.arrays import load_npy
from ground.errors import UserInputError
from ground.files import atomic_write_text, read_json
from ground.progress import progress

log = logging.getLogger(__name__)

TFIDF_DIR = "tfidf"  # the fitted tf-idf embedder, inside the embeddings directory
CLAIM = "embedder.json"  # the settings and corpus the shards in the embeddings directory were made with


class Embedder(Protocol):
    """Maps texts to L2-normalised float32 vectors of shape [n, dim]."""

    name: str
    dim: int

    def encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray: ...


def load_embedder(cfg: EmbedConfig, fitted_dir: Path | None = None) -> Embedder:
    """The embedder ``cfg`` describes, ready to encode (routing at inference uses this too).

    ``fitted_dir``: the run's embeddings directory; a tf-idf embedder is read from ``fitted_dir/tfidf``.
    """
    if cfg.kind == "sentence-transformers":
        return SentenceTransformerEmbedder(cfg.model, cfg.device, cfg.batch_size, cfg.max_seq_length)
    if fitted_dir is None:
        raise UserInputError(f"embed.kind={cfg.kind} needs its fitted tf-idf parameters: pass the run's embeddings "
                             "directory (or run the embed stage first)")
    tfidf = TfidfEmbedder.load(Path(fitted_dir) / TFIDF_DIR)
    if cfg.kind == "tfidf":
        return tfidf
    sentence = SentenceTransformerEmbedder(cfg.model, cfg.device, cfg.batch_size, cfg.max_seq_length)
    return HybridEmbedder(sentence, tfidf, cfg.hybrid_weight)


def stage_embedder(cfg: EmbedConfig, corpus_path: Path, out_dir: Path) -> Embedder:
    """The embedder of the embed stage; call it once before the shards.

    Clears shards left by other settings or another corpus (see `claim_embed_dir`), then returns the
    sentence-transformers model, or (tfidf, hybrid) first fits the tf-idf embedder on a training sample of
    ``corpus_path`` and saves it in ``out_dir/tfidf`` (a killed run that resumes reuses that fit).
    """
    claim_embed_dir(cfg, corpus_path, out_dir)
    if cfg.kind == "sentence-transformers":
        return load_embedder(cfg)
    if (Path(out_dir) / TFIDF_DIR / "settings.json").exists():
        log.info("embed: reusing the tf-idf embedder fitted earlier in %s", Path(out_dir) / TFIDF_DIR)
    else:
        fit_tfidf(corpus_path, cfg.tfidf_dim, cfg.tfidf_sample, Path(out_dir) / TFIDF_DIR)
    return load_embedder(cfg, out_dir)


def claim_embed_dir(cfg: EmbedConfig, corpus_path: Path, out_dir: Path) -> None:
    """Record what ``out_dir`` holds (``embedder.json``); if it held shards of other settings or of another
    corpus, delete them and any tf-idf fit first, so that no stale shard is ever resumed."""
    meta = pq.ParquetFile(corpus_path).metadata
    claim = {"kind": cfg.kind, "shard_size": cfg.shard_size,
             "corpus": [meta.num_rows, meta.num_row_groups, meta.serialized_size, Path(corpus_path).stat().st_size],
             **({"model": cfg.model, "max_seq_length": cfg.max_seq_length} if cfg.kind != "tfidf" else {}),
             **({"tfidf_dim": cfg.tfidf_dim, "tfidf_sample": cfg.tfidf_sample} if cfg.kind != "sentence-transformers"
                else {}), **({"hybrid_weight": cfg.hybrid_weight} if cfg.kind == "hybrid" else {})}
    path = Path(out_dir) / CLAIM
    try:
        same = read_json(path) == claim
    except (OSError, ValueError):
        same = False
    if same:
        return
    if Path(out_dir).exists():
        for stale in [*Path(out_dir).glob("shard-*"), Path(out_dir) / "meta.json"]:
            stale.unlink(missing_ok=True)
        shutil.rmtree(Path(out_dir) / TFIDF_DIR, ignore_errors=True)
    atomic_write_text(path, json.dumps(claim, indent=2))


def release_embed_dir(out_dir: Path) -> None:
    """Make the next embed stage into ``out_dir`` start afresh (`cbtm run --force embed`): without its claim,
    `claim_embed_dir` clears the shards and the tf-idf fit when that stage begins, not before."""
    (Path(out_dir) / CLAIM).unlink(missing_ok=True)


def plan_shards(corpus_path: Path, shard_size: int) -> int:
    """Number of shards of ``shard_size`` documents the ingested corpus splits into."""
    return -(-pq.ParquetFile(corpus_path).metadata.num_rows // shard_size)


def shard_paths(out_dir: Path, shard_index: int) -> tuple[Path, Path]:
    """(vectors ``shard-NNNNN.npy``, ids ``shard-NNNNN.ids.json``) of one shard."""
    return Path(out_dir) / f"shard-{shard_index:05d}.npy", Path(out_dir) / f"shard-{shard_index:05d}.ids.json"


def embed_shard(cfg: EmbedConfig, corpus_path: Path, out_dir: Path, shard_index: int, embedder: Embedder,
                on_progress: Callable[[int], object] | None = None) -> Path:
    """Embed documents [i * shard_size, (i + 1) * shard_size) of the corpus into one shard; return its path.

    Writes ``shard-NNNNN.npy`` ([n, dim], ``cfg.dtype``) then ``shard-NNNNN.ids.json`` (list of n str), each
    via a temporary file and a rename. A finished shard of the right shape and dtype is left untouched.
    """
    parquet = pq.ParquetFile(corpus_path)
    n_docs = parquet.metadata.num_rows
    start, stop = shard_index * cfg.shard_size, min(n_docs, (shard_index + 1) * cfg.shard_size)
    if not 0 <= start < n_docs:
        raise ValueError(f"shard {shard_index} is out of range: the corpus has "
                         f"{plan_shards(corpus_path, cfg.shard_size)} shard(s)")
    vec_path, ids_path = shard_paths(out_dir, shard_index)
    vec_path.parent.mkdir(parents=True, exist_ok=True)
    on_progress = on_progress or (lambda n: None)
    if _shard_done(vec_path, ids_path, (stop - start, embedder.dim), np.dtype(cfg.dtype)):
        on_progress(stop - start)  # finished in an earlier, interrupted run
        return vec_path
    rows = _read_rows(parquet, start, stop, ["id", "text"])
    vectors = encode_length_sorted(embedder, rows.column("text").to_pylist(), on_progress).astype(cfg.dtype)
    tmp = vec_path.with_name(f".{vec_path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, vectors)
    os.replace(tmp, vec_path)
    atomic_write_text(ids_path, json.dumps(rows.column("id").to_pylist()))
    return vec_path


def _shard_done(vec_path: Path, ids_path: Path, shape: tuple[int, int], dtype: np.dtype) -> bool:
    if not (vec_path.exists() and ids_path.exists()):
        return False
    try:
        done = load_npy(vec_path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return done.shape == shape and done.dtype == dtype


def _read_rows(parquet, start: int, stop: int, columns: list[str]):
    """Rows [start, stop) of a ParquetFile, reading only the row groups that hold them (a pyarrow Table)."""
    parts, offset = [], 0
    for group in range(parquet.num_row_groups):
        n = parquet.metadata.row_group(group).num_rows
        if offset < stop and offset + n > start:
            lo, hi = max(start - offset, 0), min(stop - offset, n)
            parts.append(parquet.read_row_group(group, columns=columns).slice(lo, hi - lo))
        offset += n
        if offset >= stop:
            break
    return pa.concat_tables(parts)


def encode_length_sorted(embedder: Embedder, texts: list[str],
                         on_progress: Callable[[int], object] | None = None) -> np.ndarray:
    """Encode longest-first (token counts where the embedder gives them, else characters) in chunks of whole
    batches, so every batch pads little; return float32 [n, dim] in input order."""
    if hasattr(embedder, "sort_keys"):
        keys = embedder.sort_keys(texts)
    else:
        keys = np.array([len(t) for t in texts])
    order = np.argsort(-keys, kind="stable")
    chunk = getattr(embedder, "chunk_size", None) or PROGRESS_CHUNK
    out = np.empty((len(texts), embedder.dim), np.float32)
    for lo in range(0, len(texts), chunk):
        idx = order[lo:lo + chunk]
        out[idx] = embedder.encode([texts[i] for i in idx])
        interrupt.check()  # as training does: shards are embedded in a runner's worker threads
        if on_progress:
            on_progress(len(idx))
    return out


def embed_corpus(cfg: EmbedConfig, corpus_path: Path, out_dir: Path, embedder: Embedder | None = None) -> Path:
    """Embed every document of ``corpus_path`` into ``out_dir``: shards of ``cfg.shard_size`` documents.

    Writes ``shard-NNNNN.npy`` ([n, dim], ``cfg.dtype``, float16 by default) and ``shard-NNNNN.ids.json``
    per shard, ``tfidf/`` for the tf-idf embedder, ``embedder.json`` (what the shards were made with), then
    ``meta.json``. Finished shards are never recomputed, so a killed run resumes at the first missing one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if embedder is None:
        embedder = stage_embedder(cfg, corpus_path, out_dir)
    else:
        claim_embed_dir(cfg, corpus_path, out_dir)
    if cfg.kind == "tfidf" and not (out_dir / TFIDF_DIR).exists() and hasattr(embedder, "save"):
        embedder.save(out_dir / TFIDF_DIR)  # inference routes with the same fitted embedder
    if cfg.kind == "hybrid" and not (out_dir / TFIDF_DIR).exists():
        embedder.tfidf.save(out_dir / TFIDF_DIR)
    n_shards = plan_shards(corpus_path, cfg.shard_size)
    bar = progress(total=_num_rows(corpus_path), desc="embed", unit="doc")
    for shard in range(n_shards):
        embed_shard(cfg, corpus_path, out_dir, shard, embedder, bar.update)
    bar.close()
    return write_embeddings_meta(cfg, corpus_path, out_dir, embedder)


def write_embeddings_meta(cfg: EmbedConfig, corpus_path: Path, out_dir: Path, embedder: Embedder) -> Path:
    """Write ``meta.json`` (kind, embedder, dim, n_docs, n_shards, shard_size, dtype, precision) last."""
    n_docs, n_shards = _num_rows(corpus_path), plan_shards(corpus_path, cfg.shard_size)
    names = {"sentence-transformers": cfg.model, "tfidf": "tfidf", "hybrid": f"{cfg.model} + tfidf"}
    meta = {"kind": cfg.kind, "embedder": names[cfg.kind],
            "dim": int(embedder.dim), "n_docs": n_docs, "n_shards": n_shards, "shard_size": cfg.shard_size,
            "dtype": cfg.dtype, "precision": getattr(embedder, "precision", "fp32")}
    atomic_write_text(Path(out_dir) / "meta.json", json.dumps(meta, indent=2))
    log.info("embed: %d documents -> %d shard(s) of dim %d with %s (%s)", n_docs, n_shards, embedder.dim,
             meta["embedder"], cfg.dtype)
    return Path(out_dir)


def _num_rows(corpus_path: Path) -> int:
    return pq.ParquetFile(corpus_path).metadata.num_rows


def load_embeddings(emb_dir: Path) -> tuple[list[str], np.ndarray]:
    """Return (ids, vectors float32 [n, dim]) from the shards in ``emb_dir``, in corpus order."""
    meta = read_json(emb_dir / "meta.json")
    ids: list[str] = []
    parts = []
    for shard in range(meta["n_shards"]):
        ids += read_json(emb_dir / f"shard-{shard:05d}.ids.json")
        parts.append(load_npy(emb_dir / f"shard-{shard:05d}.npy", mmap_mode="r"))
    vectors = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, meta["dim"]), np.float32)
    return ids, vectors
