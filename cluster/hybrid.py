"""The hybrid embedder: a sentence embedding and the tf-idf -> SVD embedding side by side.

Each block is L2-normalised and scaled so that the whole vector has unit norm: for documents u and v the squared
distance is ``w * |a(u) - a(v)|^2 + (1 - w) * |b(u) - b(v)|^2``, with a the sentence embedding, b the tf-idf one
and ``w`` = ``embed.hybrid_weight``. Neither single embedder wins on every corpus (sentences capture topic on
short texts, tf-idf the vocabulary of long ones); together they cluster better than either (bench/clusters.py).
The tf-idf part is fitted on the run's training split and saved with the run (embeddings/tfidf), so prompts
are routed with exactly the embedding the clusters were found with.
"""
from __future__ import annotations

import numpy as np


class HybridEmbedder:
    """``sentence`` ⊕ ``tfidf`` embedders (anything with ``encode(texts) -> float32 [n, d]`` unit rows)."""

    name = "hybrid"

    def __init__(self, sentence, tfidf, weight: float):
        if not 0.0 < weight < 1.0:
            raise ValueError(f"the hybrid weight must be in (0, 1), got {weight}")
        self.sentence, self.tfidf, self.weight = sentence, tfidf, float(weight)
        self.dim = int(sentence.dim + tfidf.dim)
        self.precision = getattr(sentence, "precision", "fp32")
        self.chunk_size = getattr(sentence, "chunk_size", None)

    def encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        """float32 [len(texts), dim] with unit rows: [sqrt(w) * sentence, sqrt(1 - w) * tfidf]."""
        a = _unit(self.sentence.encode(texts))
        b = _unit(self.tfidf.encode(texts))
        return np.concatenate([np.sqrt(self.weight) * a, np.sqrt(1.0 - self.weight) * b], axis=1).astype(np.float32)

    def sort_keys(self, texts: list[str]) -> np.ndarray:
        """Length keys int [n] of the sentence embedder (the costly part), for `encode_length_sorted`."""
        if hasattr(self.sentence, "sort_keys"):
            return self.sentence.sort_keys(texts)
        return np.array([len(t) for t in texts])


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
