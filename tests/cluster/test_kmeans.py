import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.config import ClusterConfig
from cluster.kmeans import SphericalKMeans, balance_capacity, cluster_corpus, read_clusters, squared_distances
from cluster.report import distinctive_words
from ground.errors import UserInputError
from tests.conftest import SLICE_DOMAINS, demo_records


def blobs(n_per=50, k=4, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    x = np.concatenate([c + 0.1 * rng.normal(size=(n_per, d)) for c in centers])
    return x.astype(np.float32), np.repeat(np.arange(k), n_per)


def clustered_inputs(root, per_domain=24, d=16, seed=0):
    """A small ingested corpus (demo texts, 3 domains, a `domain` label, every 6th document held out) and
    matching synthetic embeddings (one blob per domain). Returns (corpus parquet path, embeddings dir)."""
    rng = np.random.default_rng(seed)
    records = demo_records(per_domain)
    centers = {name: rng.normal(size=d) for name in SLICE_DOMAINS}
    vectors = np.stack([centers[r["domain"]] + 0.3 * rng.normal(size=d) for r in records]).astype(np.float16)
    ids = [r["id"] for r in records]
    split = ["heldout" if i % 6 == 5 else "train" for i in range(len(records))]
    corpus = root / "corpus" / "docs.parquet"
    corpus.parent.mkdir(parents=True)
    pq.write_table(pa.table({"id": ids, "text": [r["text"] for r in records], "split": split,
                             "domain": [r["domain"] for r in records]}), corpus)
    emb = root / "embeddings"
    emb.mkdir()
    np.save(emb / "shard-00000.npy", vectors)
    (emb / "shard-00000.ids.json").write_text(json.dumps(ids))
    (emb / "meta.json").write_text(json.dumps({"n_shards": 1, "dim": d, "n_docs": len(ids)}))
    return corpus, emb


def test_follows_the_sklearn_contract_and_recovers_blobs():
    x, y = blobs()
    model = SphericalKMeans(n_clusters=4, random_state=0)
    assert model.fit(x) is model
    assert model.cluster_centers_.shape == (4, 16) and model.cluster_centers_.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(model.cluster_centers_, axis=1), 1.0, atol=1e-5)
    assert len(model.labels_) == len(x)
    for label in range(4):  # every true blob lands in exactly one cluster
        assert len(set(model.labels_[y == label])) == 1
    assert model.transform(x).shape == (len(x), 4)
    np.testing.assert_array_equal(model.predict(x), model.labels_)
    assert model.get_params()["n_clusters"] == 4
    # used bare (bench/clusters.py does), the estimator restarts as often as the pipeline's cluster stage
    assert model.get_params()["n_init"] == ClusterConfig().n_init == 10


def test_same_inputs_and_seed_give_the_same_centroids():
    x, _ = blobs(seed=1)
    a = SphericalKMeans(4, random_state=3).fit(x).cluster_centers_
    b = SphericalKMeans(4, random_state=3).fit(x).cluster_centers_
    np.testing.assert_array_equal(a, b)


def test_fits_a_seeded_sample_and_assigns_every_row_in_batches():
    x, y = blobs(n_per=3000, k=5, d=8, seed=2)  # 15,000 rows, sample 2,000, batches of 1,000
    a = SphericalKMeans(5, n_init=1, sample_size=2000, random_state=7, batch_size=1000).fit(x.astype(np.float16))
    b = SphericalKMeans(5, n_init=1, sample_size=2000, random_state=7, batch_size=1000).fit(x.astype(np.float16))
    assert len(a.sample_indices_) == 2000 and len(np.unique(a.sample_indices_)) == 2000
    np.testing.assert_array_equal(a.sample_indices_, b.sample_indices_)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    labels, dist = a.assign(x)
    assert labels.dtype == np.int32 and dist.dtype == np.float32 and len(labels) == len(x)
    full = squared_distances(x / np.linalg.norm(x, axis=1, keepdims=True), a.cluster_centers_)
    np.testing.assert_array_equal(labels, full.argmin(1))
    np.testing.assert_allclose(dist, full.min(1), atol=1e-5)
    assert {len(set(labels[y == c])) for c in range(5)} == {1}


def test_squared_distances_match_numpy():
    x, _ = blobs(n_per=3)
    c = x[:2]
    expected = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    np.testing.assert_allclose(squared_distances(x, c), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad, message", [("nan", "NaN or inf"), ("zero", "all zeros"),
                                          ("too_many", "clusters requested but only"), ("zero_k", ">= 1"),
                                          ("negative_k", ">= 1"), ("small_sample", "sample size 3")])
def test_bad_input_is_one_clear_line(bad, message):
    x, _ = blobs(n_per=3)
    k, sample = 4, 100
    if bad == "nan":
        x[5, 0] = np.nan
    elif bad == "zero":
        x[1] = 0
    elif bad == "too_many":
        k = len(x) + 1
    elif bad == "zero_k":
        k = 0
    elif bad == "negative_k":
        k = -2
    else:
        sample = 3
    with pytest.raises(UserInputError, match=message) as info:
        SphericalKMeans(k, sample_size=sample).fit(x)
    assert "\n" not in str(info.value)


def test_balance_capacity_is_the_rounded_up_cap():
    assert balance_capacity(100, 10, 0.1) == 11  # not 12 from 1.1 * 10 = 11.000000000000002
    assert balance_capacity(101, 10, 0.0) == 11
    assert balance_capacity(7, 1, 0.1) == 8


def test_cluster_corpus_writes_both_assignments_sizes_and_label_quality(tmp_path):
    corpus, emb = clustered_inputs(tmp_path)
    cfg = ClusterConfig(n_clusters=3, balance_slack=0.0)
    out = cluster_corpus(cfg, corpus, emb, tmp_path / "clusters", label_field="domain")
    table = pq.read_table(out / "assignments.parquet")
    assert table.column_names == ["id", "split", "cluster_id", "distance", "train_cluster_id"]
    assert table.schema.field("train_cluster_id").type == pa.int32()
    split = np.array(table.column("split").to_pylist())
    nearest = table.column("cluster_id").to_numpy()
    balanced = table.column("train_cluster_id").to_numpy()
    np.testing.assert_array_equal(balanced[split == "heldout"], nearest[split == "heldout"])
    meta = read_clusters(out)
    cap = balance_capacity(int((split == "train").sum()), 3, 0.0)
    assert meta["capacity"] == cap and meta["balanced"] is True
    assert max(c["size_train_balanced"] for c in meta["clusters"]) <= cap
    assert sum(c["size_train_balanced"] for c in meta["clusters"]) == sum(c["size_train"] for c in meta["clusters"])
    assert all(len(c["keywords"]) == 10 and len(c["nearest"]) == 3 for c in meta["clusters"])
    quality = meta["label_quality"]
    assert quality["field"] == "domain" and quality["n_labels"] == 3
    assert quality["nmi"] == pytest.approx(1.0) and quality["purity"] == pytest.approx(1.0)
    assert {c["top_labels"][0][0] for c in meta["clusters"]} == set(SLICE_DOMAINS)
    assert np.load(out / "centroids.npy").shape == (3, 16)


def test_balancing_moves_training_documents_out_of_an_over_full_cluster(tmp_path):
    corpus, emb = clustered_inputs(tmp_path)  # 3 domains in 2 clusters: one holds two domains
    out = cluster_corpus(ClusterConfig(n_clusters=2, balance_slack=0.0), corpus, emb, tmp_path / "clusters")
    meta = read_clusters(out)
    assert max(c["size_train"] for c in meta["clusters"]) > meta["capacity"] == 30
    assert [c["size_train_balanced"] for c in meta["clusters"]] == [30, 30]
    table = pq.read_table(out / "assignments.parquet").to_pandas()
    moved = table[table.cluster_id != table.train_cluster_id]
    assert len(moved) == max(c["size_train"] for c in meta["clusters"]) - 30 and set(moved.split) == {"train"}


def test_unbalanced_run_trains_on_the_nearest_centroid(tmp_path):
    corpus, emb = clustered_inputs(tmp_path)
    out = cluster_corpus(ClusterConfig(n_clusters=5, balanced=False), corpus, emb, tmp_path / "clusters")
    table = pq.read_table(out / "assignments.parquet")
    assert table.column("train_cluster_id").to_pylist() == table.column("cluster_id").to_pylist()
    meta = read_clusters(out)
    assert meta["balanced"] is False and "label_quality" not in meta
    assert all(c["size_train_balanced"] == c["size_train"] for c in meta["clusters"])


def test_an_unknown_label_field_is_a_clear_error(tmp_path):
    corpus, emb = clustered_inputs(tmp_path)
    with pytest.raises(UserInputError, match="no label field 'topic'"):
        cluster_corpus(ClusterConfig(n_clusters=3), corpus, emb, tmp_path / "clusters", label_field="topic")


def test_distinctive_words_name_each_cluster():
    texts = ["bread dough yeast flour oven"] * 3 + ["stars galaxy telescope orbit"] * 3
    words = distinctive_words(texts, np.array([0, 0, 0, 1, 1, 1]), 2, n_words=3)
    assert set(words[0]) <= {"bread", "dough", "yeast", "flour", "oven"} and len(words[0]) == 3
    assert set(words[1]) <= {"stars", "galaxy", "telescope", "orbit"}
    assert Counter(w for ws in words for w in ws).most_common(1)[0][1] == 1
