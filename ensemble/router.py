"""Routing: squared distances to the centroids -> sparse mixture weights. Pure numpy."""
from __future__ import annotations

import numpy as np


def route_weights(sq_distances: np.ndarray, temperature: float, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """c-BTM routing weights.

    ``sq_distances``: float [n, k] squared distances of n embedded contexts to the k centroids.
    Weights are softmax(-d^2 / temperature) over all k clusters; the ``top_k`` largest are kept and
    renormalised to sum to 1. Returns (cluster ids int64 [n, top_k], weights float64 [n, top_k]), best first
    (ties broken by the lower cluster id).
    """
    d2 = np.atleast_2d(np.asarray(sq_distances, dtype=np.float64))
    n_clusters = d2.shape[1]
    if not 1 <= top_k <= n_clusters:
        raise ValueError(f"top_k must be between 1 and the number of experts ({n_clusters}), got {top_k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not np.isfinite(d2).all():
        raise ValueError("distances contain NaN or inf")
    logits = -d2 / temperature
    order = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    top = np.take_along_axis(logits, order, axis=1)
    # Renormalising the kept softmax weights equals a softmax over the kept logits.
    w = np.exp(top - top.max(axis=1, keepdims=True))
    return order.astype(np.int64), w / w.sum(axis=1, keepdims=True)


def prior_weights(sizes: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights from cluster sizes alone (used where there is no context yet): top_k largest, renormalised."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if not 1 <= top_k <= len(sizes):
        raise ValueError(f"top_k must be between 1 and the number of experts ({len(sizes)}), got {top_k}")
    order = np.argsort(-sizes, kind="stable")[:top_k]
    w = np.maximum(sizes[order], 1e-12)
    return order.astype(np.int64)[None, :], (w / w.sum())[None, :]
