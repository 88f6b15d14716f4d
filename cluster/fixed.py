"""Clusters from a given training assignment (baselines: one cluster for everything, random clusters).

The output has the same files as `cluster.kmeans.cluster_corpus`, so a run built on it trains and routes with
the same code: each cluster's centroid is the normalised mean embedding of its training documents, and every
document's routing cluster is its nearest centroid.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cluster.embed import load_embeddings
from cluster.kmeans import read_corpus_columns, squared_distances, unit_rows, write_clusters
from cluster.report import describe_clusters
from ground.errors import UserInputError

log = logging.getLogger(__name__)


def random_train_labels(train_labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """The same cluster sizes as ``train_labels`` (int [n_train]) with documents drawn at random."""
    return np.random.default_rng(seed).permutation(np.asarray(train_labels, np.int32))


def fixed_clusters(corpus_path: Path, embeddings_dir: Path, train_labels: np.ndarray, n_clusters: int,
                   out_dir: Path, n_keywords: int = 10) -> Path:
    """Write ``out_dir`` (centroids.npy, assignments.parquet, clusters.json) for a fixed training assignment.

    ``train_labels``: int32 [n_train], the cluster id of every training document in corpus order. Held-out
    documents are assigned to their nearest centroid.
    """
    ids, vectors = load_embeddings(embeddings_dir)
    docs = read_corpus_columns(corpus_path, ["id", "split", "text"], None)
    if docs.column("id").to_pylist() != ids:
        raise UserInputError("embeddings do not match the corpus: re-run the embed stage (cbtm run --force embed)")
    split = np.array(docs.column("split").to_pylist())
    train = split == "train"
    train_labels = np.asarray(train_labels, np.int32)
    if len(train_labels) != train.sum() or train_labels.min(initial=0) < 0 or train_labels.max(initial=0) >= n_clusters:
        raise ValueError(f"train_labels must hold one id in 0..{n_clusters - 1} per training document "
                         f"({int(train.sum())}), got {len(train_labels)}")
    x = vectors[train].astype(np.float32)
    sums = np.zeros((n_clusters, x.shape[1]), np.float64)
    np.add.at(sums, train_labels, x)
    mean = np.repeat(unit_rows(x.mean(0, keepdims=True)), n_clusters, axis=0)  # for a cluster left empty
    centroids = unit_rows(sums.astype(np.float32), fallback=mean)
    d2 = squared_distances(vectors.astype(np.float32), centroids)
    labels = d2.argmin(1).astype(np.int32)
    distance = d2[np.arange(len(d2)), labels].astype(np.float32)
    all_train = labels.copy()
    all_train[train] = train_labels
    summary = describe_clusters(docs.column("text").to_pylist(), all_train, distance, train, n_clusters, n_keywords)
    for c in summary:
        c["size_train_balanced"] = int(((all_train == c["cluster_id"]) & train).sum())
    meta = {"n_clusters": n_clusters, "inertia": None, "balanced": False, "capacity": None, "fixed": True,
            "clusters": summary}
    write_clusters(out_dir, centroids, ids, split, labels, distance, all_train, meta)
    log.info("fixed clusters: k=%d, training documents per cluster %s", n_clusters,
             np.bincount(train_labels, minlength=n_clusters).tolist())
    return out_dir
