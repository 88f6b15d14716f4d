"""Routing: scores of a context over the experts -> sparse mixture weights. Pure numpy.

Centroid routing (c-BTM) scores an embedded context by its squared distance to each cluster's centroid:
weights are softmax(-d^2 / T) over all clusters, the top_k largest kept and renormalised.
"""
from __future__ import annotations

import math
import numbers

import numpy as np


def top_k_softmax(logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column ids (int64 [n, top_k]) and weights (float64 [n, top_k], rows sum to 1) of the ``top_k`` largest
    ``logits`` [n, k] per row, best first (ties broken by the lower column), renormalised: renormalising the kept
    softmax weights equals a softmax over the kept logits."""
    z = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    _check_top_k(top_k, z.shape[1])
    if not np.isfinite(z).all():
        raise ValueError("routing scores contain NaN or inf")
    order = np.argsort(-z, axis=1, kind="stable")[:, :top_k]
    return order.astype(np.int64), _renormalised(np.take_along_axis(z, order, axis=1))


def _check_top_k(top_k: int, n_experts: int) -> None:
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must be between 1 and the number of experts ({n_experts}), got {top_k}")


def _renormalised(top: np.ndarray) -> np.ndarray:
    """Softmax over each row of the kept logits float64 [n, top_k]."""
    w = np.exp(top - top.max(axis=1, keepdims=True))
    return w / w.sum(axis=1, keepdims=True)


def route_weights(sq_distances: np.ndarray, temperature: float, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """c-BTM routing weights from squared distances float [n, k] of n contexts to k centroids: ids int64
    [n, top_k] and weights float64 [n, top_k], best first."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    d2 = np.atleast_2d(np.asarray(sq_distances, dtype=np.float64))
    _check_top_k(top_k, d2.shape[1])
    if not np.isfinite(d2).all():
        raise ValueError("distances contain NaN or inf")
    # Ranked by the distances themselves: dividing by T can round distinct tiny distances to one logit.
    order = np.argsort(d2, axis=1, kind="stable")[:, :top_k]
    return order.astype(np.int64), _renormalised(-np.take_along_axis(d2, order, axis=1) / temperature)


def prior_weights(sizes: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights from cluster sizes alone (used where there is no context yet): top_k largest, renormalised."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if not 1 <= top_k <= len(sizes):
        raise ValueError(f"top_k must be between 1 and the number of experts ({len(sizes)}), got {top_k}")
    order = np.argsort(-sizes, kind="stable")[:top_k]
    w = np.maximum(sizes[order], 1e-12)
    return order.astype(np.int64)[None, :], (w / w.sum())[None, :]
