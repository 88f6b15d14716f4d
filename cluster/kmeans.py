"""Spherical k-means (scikit-learn contract) and the clustering stage."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.base import BaseEstimator, ClusterMixin

from cluster.config import ClusterConfig
from cluster.corpus import read_documents
from cluster.embed import load_embeddings
from ensemble.rundir import UserInputError, atomic_dir

log = logging.getLogger(__name__)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows of a float array [n, d]; raises UserInputError on NaN/inf or all-zero rows."""
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise UserInputError(f"{bad} embedding(s) contain NaN or inf: re-run the embed stage (cbtm run --force embed)")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise UserInputError(f"{int((norms == 0).sum())} embedding(s) are all zeros: check those documents' text")
    return x / norms


def squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances float32 [n, k] between rows of x [n, d] and centroids [k, d]."""
    d2 = (x * x).sum(1, keepdims=True) - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
    return np.maximum(d2, 0.0).astype(np.float32)


class SphericalKMeans(ClusterMixin, BaseEstimator):
    """k-means on the unit sphere: rows and centroids are L2-normalised.

    Fitted on a random sample of at most ``sample_size`` rows; ``cluster_centers_`` float32 [k, d] are unit
    vectors, ``labels_`` int64 [n] the nearest centroid of every fitted row, ``inertia_`` the mean
    squared distance of the sample to its centroid.
    """

    def __init__(self, n_clusters: int = 8, n_init: int = 4, sample_size: int = 100_000, random_state: int = 0):
        self.n_clusters = n_clusters
        self.n_init = n_init
        self.sample_size = sample_size
        self.random_state = random_state

    def fit(self, X: np.ndarray, y=None) -> "SphericalKMeans":
        from sklearn.cluster import KMeans, MiniBatchKMeans

        x = normalize_rows(X)
        if self.n_clusters < 1:
            raise UserInputError(f"the number of clusters must be >= 1, got {self.n_clusters}")
        if self.n_clusters > len(x):
            raise UserInputError(f"{self.n_clusters} clusters requested but only {len(x)} training documents: "
                                 "pass a smaller --clusters or a larger corpus")
        rng = np.random.default_rng(self.random_state)
        sample = x if len(x) <= self.sample_size else x[rng.choice(len(x), self.sample_size, replace=False)]
        klass = KMeans if len(sample) <= 50_000 else MiniBatchKMeans
        km = klass(n_clusters=self.n_clusters, n_init=self.n_init, random_state=self.random_state).fit(sample)
        centers = km.cluster_centers_.astype(np.float32)
        norms = np.linalg.norm(centers, axis=1, keepdims=True)
        self.cluster_centers_ = centers / np.where(norms == 0, 1.0, norms)
        self.labels_ = self.predict(x)
        self.inertia_ = float(squared_distances(sample, self.cluster_centers_).min(1).mean())
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Squared distances float32 [n, k] to every centroid."""
        return squared_distances(normalize_rows(X), self.cluster_centers_)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.transform(X).argmin(axis=1).astype(np.int64)


def cluster_corpus(cfg: ClusterConfig, corpus_path: Path, embeddings_dir: Path, out_dir: Path) -> Path:
    """Fit spherical k-means on the training split's embeddings and assign every document.

    Writes into ``out_dir`` (atomically): ``centroids.npy`` (float32 [k, d]), ``assignments.parquet``
    (id, split, cluster_id int32, distance float32 = squared distance to its centroid) and ``clusters.json``
    (per cluster: sizes, keywords, documents nearest the centroid).
    """
    from cluster.report import describe_clusters

    ids, vectors = load_embeddings(embeddings_dir)
    docs = read_documents(corpus_path, columns=["id", "split", "text"])
    if docs.column("id").to_pylist() != ids:
        raise UserInputError("embeddings do not match the corpus: re-run the embed stage (cbtm run --force embed)")
    split = np.array(docs.column("split").to_pylist())
    train = split == "train"
    model = SphericalKMeans(cfg.n_clusters, cfg.n_init, cfg.sample_size, cfg.seed).fit(vectors[train])
    d2 = model.transform(vectors)
    labels = d2.argmin(1).astype(np.int32)
    distance = d2[np.arange(len(labels)), labels]
    texts = docs.column("text").to_pylist()
    summary = describe_clusters(texts, labels, distance, train, cfg.n_clusters, cfg.n_keywords)
    with atomic_dir(out_dir) as tmp:
        np.save(tmp / "centroids.npy", model.cluster_centers_)
        table = pa.table({"id": ids, "split": split.tolist(), "cluster_id": pa.array(labels, pa.int32()),
                          "distance": pa.array(distance, pa.float32())})
        pq.write_table(table, tmp / "assignments.parquet")
        meta = {"n_clusters": cfg.n_clusters, "inertia": model.inertia_, "clusters": summary}
        (tmp / "clusters.json").write_text(json.dumps(meta, indent=2))
    sizes = ", ".join(f"{c['cluster_id']}:{c['size_train']}" for c in summary)
    log.info("cluster: k=%d, training documents per cluster %s", cfg.n_clusters, sizes)
    return out_dir


def read_clusters(clusters_dir: Path) -> dict:
    """The ``clusters.json`` summary written by `cluster_corpus`."""
    return json.loads((Path(clusters_dir) / "clusters.json").read_text())
