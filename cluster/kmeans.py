"""Spherical k-means (scikit-learn contract) and the clustering stage.

The model is fitted on a seeded random sample of the rows (scikit-learn ``KMeans``, or ``MiniBatchKMeans`` for
large samples, followed by a few exact spherical Lloyd steps on the sample) and every row is then assigned in
streaming batches, so memory stays bounded by the sample and one batch of ``batch_size`` rows.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.base import BaseEstimator, ClusterMixin

from cluster.balance import balanced_assignment
from cluster.config import N_INIT, ClusterConfig
from cluster.corpus import read_documents
from cluster.embed import load_embeddings
from cluster.report import describe_clusters, label_summary
from ground.errors import UserInputError
from ground.files import atomic_dir, read_json

log = logging.getLogger(__name__)

BATCH_ROWS = 65_536  # rows per streaming batch: 65,536 x 384 float32 = 96 MiB
FULL_KMEANS_MAX = 20_000  # samples up to this size use KMeans (Lloyd, n_init restarts), larger MiniBatchKMeans


def _row_batches(n: int, batch_size: int):
    for start in range(0, n, max(1, batch_size)):
        yield slice(start, min(n, start + batch_size))


def check_rows(x: np.ndarray, batch_size: int = BATCH_ROWS) -> None:
    """Raise UserInputError (one line) if any row of x [n, d] holds NaN/inf or is all zeros; streams batches."""
    n_bad = n_zero = 0
    first_bad = first_zero = None
    for rows in _row_batches(len(x), batch_size):
        part = np.asarray(x[rows], dtype=np.float32)
        bad = ~np.isfinite(part).all(axis=1)
        zero = ~bad & ~part.any(axis=1)
        if bad.any() and first_bad is None:
            first_bad = rows.start + int(np.argmax(bad))
        if zero.any() and first_zero is None:
            first_zero = rows.start + int(np.argmax(zero))
        n_bad += int(bad.sum())
        n_zero += int(zero.sum())
    if n_bad:
        raise UserInputError(f"{n_bad} embedding(s) contain NaN or inf (first: row {first_bad}): "
                             "re-run the embed stage (cbtm run --force embed)")
    if n_zero:
        raise UserInputError(f"{n_zero} embedding(s) are all zeros (first: row {first_zero}): "
                             "check those documents' text, then re-run the embed stage")


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalised float32 copy of x [n, d]; raises UserInputError on NaN/inf or all-zero rows."""
    check_rows(x)
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances float32 [n, k] between rows of x [n, d] and centroids [k, d]."""
    x = np.asarray(x, dtype=np.float32)
    centroids = np.asarray(centroids, dtype=np.float32)
    d2 = (x * x).sum(1, keepdims=True) - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
    return np.maximum(d2, 0.0).astype(np.float32, copy=False)


def unit_rows(c: np.ndarray, fallback: np.ndarray | None = None) -> np.ndarray:
    """Rows of c scaled to unit norm; a zero row takes the matching row of ``fallback`` (if given)."""
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    out = c / np.where(norms == 0, 1.0, norms)
    if fallback is not None:
        out[norms[:, 0] == 0] = fallback[norms[:, 0] == 0]
    return out.astype(np.float32)


def spherical_lloyd(x: np.ndarray, centers: np.ndarray, max_iter: int = 10, tol: float = 1e-3) -> np.ndarray:
    """Exact spherical k-means steps: assign x [n, d] (unit rows) by cosine, centroid = unit mean.

    Returns float32 [k, d] unit centroids; stops when fewer than ``tol`` of the rows change cluster.
    A centroid that loses all its rows keeps its previous position.
    """
    labels = None
    for _ in range(max_iter):
        new = np.argmax(x @ centers.T, axis=1)
        changed = len(x) if labels is None else int((new != labels).sum())
        labels = new
        sums = np.zeros_like(centers)
        _scatter_sum(sums, labels, x)
        centers = unit_rows(sums, fallback=centers)
        if changed <= tol * len(x):
            break
    return centers


def _scatter_sum(out: np.ndarray, labels: np.ndarray, x: np.ndarray) -> None:
    """out[c] += sum of rows of x with label c (via a sparse one-hot product, much faster than np.add.at)."""
    from scipy.sparse import csr_matrix

    onehot = csr_matrix((np.ones(len(x), np.float32), (labels, np.arange(len(x)))), shape=(len(out), len(x)))
    out += np.asarray(onehot @ x, dtype=np.float32)


class SphericalKMeans(ClusterMixin, BaseEstimator):
    """k-means on the unit sphere: rows and centroids are L2-normalised.

    Fitted on a seeded random sample of at most ``sample_size`` rows (KMeans up to 20,000 sampled rows,
    MiniBatchKMeans above, then up to ``refine_iter`` exact spherical Lloyd steps on the sample).
    Learned: ``cluster_centers_`` float32 [k, d] unit vectors, ``labels_`` int64 [n] nearest centroid of every
    fitted row (assigned in batches of ``batch_size``; skipped when ``compute_labels`` is False, as in
    scikit-learn's MiniBatchKMeans), ``inertia_`` mean squared distance of the sample to its
    nearest centroid, ``sample_indices_`` int64 [m] the rows the centroids were fitted on.
    The same inputs and ``random_state`` give the same centroids.
    """

    def __init__(self, n_clusters: int = 8, n_init: int = N_INIT, sample_size: int = 100_000, random_state: int = 0,
                 batch_size: int = BATCH_ROWS, refine_iter: int = 10, compute_labels: bool = True):
        self.n_clusters = n_clusters
        self.n_init = n_init
        self.sample_size = sample_size
        self.random_state = random_state
        self.batch_size = batch_size
        self.refine_iter = refine_iter
        self.compute_labels = compute_labels

    def _validate(self, n: int) -> None:
        k = self.n_clusters
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise UserInputError(f"the number of clusters must be an integer >= 1, got {k}: pass --clusters K")
        if k > n:
            raise UserInputError(f"{k} clusters requested but only {n} training documents: "
                                 "pass a smaller --clusters or a larger corpus")
        if self.sample_size < k:
            raise UserInputError(f"cluster sample size {self.sample_size} is smaller than the number of clusters "
                                 f"{k}: raise cluster.sample_size or lower --clusters")

    def fit(self, X: np.ndarray, y=None) -> "SphericalKMeans":
        """Fit on X [n, d] (float16/32, any norm, may be a memory map); returns self."""
        from sklearn.cluster import KMeans, MiniBatchKMeans

        self._validate(len(X))
        check_rows(X, self.batch_size)
        rng = np.random.default_rng(self.random_state)
        idx = np.arange(len(X)) if len(X) <= self.sample_size else np.sort(
            rng.choice(len(X), self.sample_size, replace=False))
        sample = normalize_rows(X[idx])
        if len(sample) <= FULL_KMEANS_MAX:
            km = KMeans(n_clusters=self.n_clusters, n_init=self.n_init, random_state=self.random_state)
        else:
            km = MiniBatchKMeans(n_clusters=self.n_clusters, n_init=self.n_init, random_state=self.random_state,
                                 batch_size=4096)
        centers = unit_rows(km.fit(sample).cluster_centers_.astype(np.float32))
        if self.refine_iter > 0:
            centers = spherical_lloyd(sample, centers, self.refine_iter)
        self.cluster_centers_ = centers
        self.sample_indices_ = idx.astype(np.int64)
        self.n_features_in_ = X.shape[1]
        self.inertia_ = float(squared_distances(sample, centers).min(1).mean())
        if self.compute_labels:
            self.labels_ = self.assign(X)[0].astype(np.int64)
        log.debug("spherical k-means: k=%d on %d sampled rows, inertia %.4f", self.n_clusters, len(idx),
                  self.inertia_)
        return self

    def assign(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid of every row of X [n, d] in streaming batches.

        Returns (labels int32 [n], squared distance float32 [n] to that centroid).
        """
        labels = np.empty(len(X), np.int32)
        dist = np.empty(len(X), np.float32)
        for rows in _row_batches(len(X), self.batch_size):
            d2 = self.transform(X[rows])
            labels[rows] = d2.argmin(1)
            dist[rows] = d2[np.arange(len(d2)), labels[rows]]
        return labels, dist

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Squared distances float32 [n, k] from the L2-normalised rows of X [n, d] to every centroid."""
        out = np.empty((len(X), len(self.cluster_centers_)), np.float32)
        for rows in _row_batches(len(X), self.batch_size):
            out[rows] = squared_distances(normalize_rows(X[rows]), self.cluster_centers_)
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Nearest centroid int64 [n] of every row of X [n, d]."""
        return self.assign(X)[0].astype(np.int64)


def balance_capacity(n: int, k: int, slack: float) -> int:
    """Per-cluster cap ceil((1 + slack) * n / k), never below ceil(n / k) so that every row fits."""
    return max(math.ceil(n / k), math.ceil(round((1.0 + slack) * n / k, 9)))


def cluster_corpus(cfg: ClusterConfig, corpus_path: Path, embeddings_dir: Path, out_dir: Path,
                   label_field: str | None = None) -> Path:
    """Fit spherical k-means on the training split's embeddings and assign every document.

    Writes into ``out_dir`` (atomically): ``centroids.npy`` (float32 [k, d]); ``assignments.parquet`` (id,
    split, cluster_id int32 = nearest centroid (routing), distance float32 = squared distance to it,
    train_cluster_id int32 = the capacity-balanced assignment for training documents when ``cfg.balanced``,
    else cluster_id); ``clusters.json`` (n_clusters, inertia, balanced, capacity, per cluster: sizes
    (size_train, size_train_balanced, size_heldout), keywords, nearest documents; ``label_quality`` when
    ``label_field`` names a corpus column).
    """
    ids, vectors = load_embeddings(embeddings_dir)
    columns = ["id", "split", "text"] + ([label_field] if label_field else [])
    docs = read_corpus_columns(corpus_path, columns, label_field)
    if docs.column("id").to_pylist() != ids:
        raise UserInputError("embeddings do not match the corpus: re-run the embed stage (cbtm run --force embed)")
    split = np.array(docs.column("split").to_pylist())
    train = split == "train"
    train_vectors = vectors if train.all() else vectors[train]
    model = SphericalKMeans(cfg.n_clusters, cfg.n_init, cfg.sample_size, cfg.seed, compute_labels=False)
    model.fit(train_vectors)
    capacity = balance_capacity(int(train.sum()), cfg.n_clusters, cfg.balance_slack) if cfg.balanced else None
    labels, distance, train_labels = _assign_all(model, vectors, train, capacity)
    texts = docs.column("text").to_pylist()
    summary = describe_clusters(texts, labels, distance, train, cfg.n_clusters, cfg.n_keywords)
    for c in summary:
        c["size_train_balanced"] = int(((train_labels == c["cluster_id"]) & train).sum())
    meta = {"n_clusters": cfg.n_clusters, "inertia": model.inertia_, "balanced": capacity is not None,
            "capacity": capacity, "clusters": summary}
    if label_field:
        meta["label_quality"] = label_summary(docs.column(label_field).to_pylist(), labels, train_labels, train,
                                              summary, label_field)
    write_clusters(out_dir, model.cluster_centers_, ids, split, labels, distance, train_labels, meta)
    sizes = ", ".join(f"{c['cluster_id']}:{c['size_train']}/{c['size_train_balanced']}" for c in summary)
    log.info("cluster: k=%d, training documents per cluster (nearest/balanced) %s", cfg.n_clusters, sizes)
    return out_dir


def _assign_all(model: SphericalKMeans, vectors: np.ndarray, train: np.ndarray, capacity: int | None):
    """One pass over the embeddings: (nearest centroid int32 [n], its squared distance float32 [n], training
    assignment int32 [n] = balanced under ``capacity`` for training rows, else the nearest centroid)."""
    if capacity is None:
        labels, distance = model.assign(vectors)
        return labels, distance, labels.copy()
    d2 = model.transform(vectors if train.all() else vectors[train])  # float32 [n_train, k]
    labels = np.empty(len(vectors), np.int32)
    distance = np.empty(len(vectors), np.float32)
    labels[train] = d2.argmin(1)
    distance[train] = d2[np.arange(len(d2)), labels[train]]
    if not train.all():
        labels[~train], distance[~train] = model.assign(vectors[~train])
    train_labels = labels.copy()
    train_labels[train] = balanced_assignment(d2, capacity)
    return labels, distance, train_labels


def read_corpus_columns(corpus_path: Path, columns: list[str], label_field: str | None) -> pa.Table:
    if label_field:
        names = pq.ParquetFile(corpus_path).schema_arrow.names
        if label_field not in names:
            raise UserInputError(f"the corpus has no label field {label_field!r}; its fields are "
                                 f"{', '.join(names)}: pass an existing field or none")
    return read_documents(corpus_path, columns=columns)


def write_clusters(out_dir: Path, centroids: np.ndarray, ids: list[str], split: np.ndarray, labels: np.ndarray,
                    distance: np.ndarray, train_labels: np.ndarray, meta: dict) -> None:
    with atomic_dir(out_dir) as tmp:
        np.save(tmp / "centroids.npy", centroids.astype(np.float32))
        table = pa.table({"id": ids, "split": split.tolist(), "cluster_id": pa.array(labels, pa.int32()),
                          "distance": pa.array(distance, pa.float32()),
                          "train_cluster_id": pa.array(train_labels, pa.int32())})
        pq.write_table(table, tmp / "assignments.parquet")
        (tmp / "clusters.json").write_text(json.dumps(meta, indent=2))


def read_clusters(clusters_dir: Path) -> dict:
    """The ``clusters.json`` summary written by `cluster_corpus`."""
    return read_json(Path(clusters_dir) / "clusters.json")
