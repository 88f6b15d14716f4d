"""The router stage: fit the prefix router of a run (or of a run derived from it) on its clusters."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cluster.config import EmbedConfig
from cluster.embed import load_embedder
from ensemble.prefix_router import fit_prefix_router
from experts.tokenizer import open_tokenizer


def train_router(corpus_path: Path, clusters_dir: Path, tokenizer_dir: Path, embed_cfg: EmbedConfig,
                 embeddings_dir: Path, out_dir: Path) -> dict:
    """`ensemble.prefix_router.fit_prefix_router` with the run's embedder, centroids and shared tokenizer;
    returns its settings (with held-out agreement per prefix length)."""
    tokenizer = open_tokenizer(tokenizer_dir)
    embedder = load_embedder(embed_cfg, embeddings_dir)

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    return fit_prefix_router(corpus_path, Path(clusters_dir) / "assignments.parquet",
                             np.load(Path(clusters_dir) / "centroids.npy"), embedder.encode, encode,
                             tokenizer.decode, out_dir)
