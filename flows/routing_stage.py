"""The router stage: fit the prefix router of a run (or of a run derived from it) on its clusters."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from cluster.config import EmbedConfig
from cluster.embed import encode_length_sorted, load_embedder
from ensemble.prefix_router import fit_prefix_router
from experts.tokenizer import open_tokenizer
from ground.arrays import load_npy
from ground.files import atomic_write_bytes
from ground.progress import progress


def train_router(corpus_path: Path, clusters_dir: Path, tokenizer_dir: Path, embed_cfg: EmbedConfig,
                 embeddings_dir: Path, out_dir: Path, cache_dir: Path | None = None) -> dict:
    """`ensemble.prefix_router.fit_prefix_router` with the run's embedder, centroids and shared tokenizer;
    returns its settings (with held-out agreement per prefix length). ``cache_dir``: where the embeddings of the
    sampled prefixes are kept, so that runs derived from one corpus (baselines, other k) embed them once."""
    tokenizer = open_tokenizer(tokenizer_dir)
    embedder = load_embedder(embed_cfg, embeddings_dir)

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def encode_prefixes(texts: list[str]) -> np.ndarray:
        bar = progress(total=len(texts), desc="router: embed prefixes", unit="prefix")
        vectors = encode_length_sorted(embedder, texts, bar.update)
        bar.close()
        return vectors

    def embed(texts: list[str]) -> np.ndarray:
        if cache_dir is None:
            return encode_prefixes(texts)
        key = hashlib.sha256("\0".join([str(embeddings_dir), *texts]).encode()).hexdigest()[:24]
        path = Path(cache_dir) / f"prefixes-{key}.npy"
        if path.exists():
            return load_npy(path)
        vectors = encode_prefixes(texts)
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        atomic_write_bytes(path, buffer.getvalue())
        return vectors

    return fit_prefix_router(corpus_path, Path(clusters_dir) / "assignments.parquet",
                             load_npy(Path(clusters_dir) / "centroids.npy"), embed, encode, tokenizer.decode, out_dir)
