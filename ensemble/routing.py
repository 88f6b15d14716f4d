"""Routers: embed a context with the run's embedder, score it over the experts. The weights themselves come
from `ensemble.router` (pure numpy); which experts may serve is the caller's ``columns``."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from cluster.kmeans import squared_distances
from ensemble.evidence import Evidence
from ensemble.router import top_k_softmax


class CentroidRouter:
    """c-BTM routing: a context's logit for cluster c is minus its squared distance to centroid c."""

    kind = "centroid"
    default_temperature = 0.1
    early_starts: tuple[int, ...] = ()  # an embedding needs a window of context: route from the first window on

    def __init__(self, embed: Callable[[list[str]], np.ndarray], centroids: np.ndarray):
        self.embed, self.centroids = embed, np.asarray(centroids, dtype=np.float32)

    def vectors(self, texts: list[str]) -> np.ndarray:
        """Routing embeddings float32 [n, dim] (shareable between runs with the same embedder)."""
        return self.embed(texts)

    def logits(self, vectors: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Routing logits float [n, len(columns)] before the temperature: -d^2 to each listed centroid."""
        return -squared_distances(vectors, self.centroids[columns])


@dataclass(frozen=True)
class RouteSpec:
    """How one prompt is routed: by ``router``, over cluster ids ``columns``, top ``top_k`` at
    ``route_temperature``; within those, each token reweighted by ``evidence`` (`ensemble.evidence`)."""

    router: object
    columns: tuple[int, ...]
    top_k: int
    route_temperature: float
    evidence: Evidence = Evidence()

    def weights(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cluster ids int64 [n, top_k], weights float64 [n, top_k]) best first, for routing embeddings."""
        columns = np.asarray(self.columns, dtype=np.int64)
        ids, w = top_k_softmax(self.router.logits(vectors, columns) / self.route_temperature, self.top_k)
        return columns[ids], w


def route_texts(texts: list[str], specs: list[RouteSpec]) -> list[dict[int, float]]:
    """The engine's routing callable: one {cluster_id: weight} per text; texts sharing a router are embedded
    in one call."""
    out: list[dict[int, float] | None] = [None] * len(texts)
    by_router: dict[int, list[int]] = {}
    for i, spec in enumerate(specs):
        by_router.setdefault(id(spec.router), []).append(i)
    for idx in by_router.values():
        vectors = specs[idx[0]].router.vectors([texts[i] for i in idx])
        for j, i in enumerate(idx):
            ids, w = specs[i].weights(vectors[j:j + 1])
            out[i] = {int(c): float(x) for c, x in zip(ids[0], w[0])}
    return out


class LockedEmbedder:
    """An embedder loaded on first use and called by one thread at a time (fast tokenizers are not safe to
    share between threads)."""

    def __init__(self, make: Callable[[], object]):
        self._make, self._embedder, self._lock = make, None, threading.Lock()

    def __call__(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            if self._embedder is None:
                self._embedder = self._make()
            return self._embedder.encode(list(texts))
