"""Clusters from a fixed training assignment: the files of k-means, centroids as mean directions."""
import json

import numpy as np
import pyarrow.parquet as pq

from cluster.config import CorpusConfig, EmbedConfig
from cluster.corpus import ingest_corpus
from cluster.embed import embed_corpus, load_embeddings
from cluster.fixed import fixed_clusters, random_train_labels
from tests.conftest import demo_records, write_jsonl


def test_random_labels_keep_the_sizes_and_are_seeded():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    a, b = random_train_labels(labels, 0), random_train_labels(labels, 0)
    assert np.bincount(a).tolist() == [5, 3, 2] and (a == b).all() and (a != labels).any()


def test_fixed_clusters_write_the_kmeans_files_with_mean_direction_centroids(tmp_path):
    records = demo_records(10, ("cooking", "astronomy"))
    corpus = ingest_corpus(CorpusConfig(path=str(write_jsonl(tmp_path / "c.jsonl", records)), heldout_fraction=0.2),
                           tmp_path / "docs.parquet")
    emb = embed_corpus(EmbedConfig(kind="tfidf", tfidf_dim=8), corpus, tmp_path / "emb")
    ids, vectors = load_embeddings(emb)
    split = np.array(pq.read_table(corpus, columns=["split"]).column("split").to_pylist())
    n_train = int((split == "train").sum())
    labels = np.arange(n_train) % 2
    out = fixed_clusters(corpus, emb, labels, 2, tmp_path / "clusters")
    assert sorted(p.name for p in out.iterdir()) == ["assignments.parquet", "centroids.npy", "clusters.json"]
    table = pq.read_table(out / "assignments.parquet")
    train_ids = np.array(table.column("train_cluster_id").to_numpy())[split == "train"]
    assert (train_ids == labels).all() and table.column("id").to_pylist() == ids
    centroids = np.load(out / "centroids.npy")
    x = vectors[split == "train"].astype(np.float32)
    expected = x[labels == 1].sum(0) / np.linalg.norm(x[labels == 1].sum(0))
    np.testing.assert_allclose(centroids[1], expected, atol=1e-5)
    meta = json.loads((out / "clusters.json").read_text())
    assert [c["size_train"] for c in meta["clusters"]] == np.bincount(labels).tolist() and meta["fixed"]
