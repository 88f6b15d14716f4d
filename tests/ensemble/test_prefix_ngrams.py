"""The prefix router's n-gram evidence, its gate with centroid routing and its trivial one-cluster form: pure
numpy/scipy, no models."""
import json

import numpy as np
import pytest

from ensemble.prefix_ngrams import FOLDS, MODEL_HASHED, N_HASHED, NgramCounts, NgramModel, hashed_ngrams, ngram_keys
from ensemble.prefix_router import (
    GATE_GRID,
    PREFIX_LENGTHS,
    PrefixRouter,
    fit_gate,
    fit_prefix_router,
    gate_logits,
    prefix_features,
    router_is_current,
)
from ground.errors import IncompatibleRunError


def test_keys_are_in_range_and_bigrams_depend_on_order():
    keys = ngram_keys([5, 9, 70000])
    assert keys.min() >= 0 and keys.max() < N_HASHED and len(keys) == 5
    assert set(ngram_keys([1, 2])) != set(ngram_keys([2, 1]))
    assert len(ngram_keys([])) == 0 and len(ngram_keys([3])) == 1
    # a version-2 router's saved log-probabilities are indexed by these unigram + bigram keys: they must not move
    assert ngram_keys([1, 2]).tolist() == [1, 2, (1 * 1_000_003 + 2 + 7) % N_HASHED]
    wide = ngram_keys([5, 9, 70000, 5], order=3, n_hashed=MODEL_HASHED)
    assert len(wide) == 4 + 3 + 2 and wide.max() < MODEL_HASHED
    assert wide[:7].tolist() == ngram_keys([5, 9, 70000, 5], n_hashed=MODEL_HASHED).tolist()


def test_hashed_rows_are_unit_length():
    x = hashed_ngrams([[1, 2, 3, 1, 2], [7], []])
    norms = np.sqrt(np.asarray(x.multiply(x).sum(1))).ravel()
    assert np.allclose(norms[:2], 1.0) and norms[2] == 0


def _two_topics(n_docs: int, rng):
    """Documents of cluster 0 draw tokens from 0-49, of cluster 1 from 50-99."""
    labels = np.arange(n_docs) % 2
    return [list(rng.integers(50 * c, 50 * c + 50, size=40)) for c in labels], labels


def test_posteriors_find_the_cluster_of_a_short_prefix():
    rng = np.random.default_rng(0)
    docs, labels = _two_topics(200, rng)
    model = NgramModel(docs, labels, 2)
    probe, probe_labels = _two_topics(50, rng)
    post = model.full().log_posteriors([d[:4] for d in probe])
    assert post.shape == (50, 2) and post.dtype == np.float32
    assert np.allclose(np.exp(post).sum(1), 1.0, atol=1e-5)  # log-normalised rows
    assert (post.argmax(1) == probe_labels).mean() >= 0.95


def test_cross_fitting_hides_a_documents_own_counts():
    """A token only one document has is evidence for its cluster under all counts, none without its fold."""
    rng = np.random.default_rng(1)
    docs, labels = _two_topics(20, rng)
    docs[3] = docs[3] + [777]  # document 3 (cluster 1) alone has token 777
    model = NgramModel(docs, labels, 2)
    full = model.full().log_posteriors([[777]])
    crossed = model.cross_fitted([[777]], np.array([3 % FOLDS]))
    uncounted = model.cross_fitted([[777]], np.array([-1]))
    assert full[0, 1] > full[0, 0] + 1.0
    assert abs(crossed[0, 1] - crossed[0, 0]) < 0.1  # no evidence left: only the clusters' totals differ
    assert np.allclose(uncounted, full)


def test_the_model_tells_apart_tokens_that_share_a_narrow_hash():
    """Tokens 5 and 5 + 2^16 were one key of the version-2 model (2^16 keys); the version-3 model keeps them apart."""
    docs = [[5, 5, 5] if c == 0 else [5 + N_HASHED] * 3 for c in range(2) for _ in range(10)]
    labels = np.repeat([0, 1], 10)
    post = NgramModel(docs, labels, 2).full().log_posteriors([[5], [5 + N_HASHED]])
    assert post.argmax(1).tolist() == [0, 1] and (post.max(1) > np.log(0.99)).all()


def test_counts_round_trip_through_open_files(tmp_path):
    rng = np.random.default_rng(3)
    docs, labels = _two_topics(60, rng)
    counts = NgramModel(docs, labels, 2).full()
    settings = json.loads(json.dumps(counts.save(tmp_path)))
    loaded = NgramCounts.load(tmp_path, settings, 2)
    probe = [d[:6] for d in _two_topics(10, rng)[0]]
    assert np.allclose(loaded.log_posteriors(probe), counts.log_posteriors(probe))
    assert np.load(tmp_path / "ngram_indices.npy").dtype == np.int32  # no pickles: plain .npy arrays
    with pytest.raises(ValueError):
        NgramCounts.load(tmp_path, settings, 3)  # counts of 2 clusters read as 3


def test_features_keep_version_1_layout_without_an_ngram_model():
    rng = np.random.default_rng(2)
    vectors, centroids = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(4, 5)).astype(np.float32)
    ids = [[1, 2], [3] * 20, list(range(300))]
    v1 = prefix_features(vectors, centroids, ids)
    v2 = prefix_features(vectors, centroids, ids, np.zeros((3, 4), np.float32))
    assert v1.shape == (3, 5 + 7 * 4 + N_HASHED) and v2.shape == (3, 5 + 14 * 4 + N_HASHED)


def test_one_cluster_gets_a_trivial_router_that_embeds_nothing(tmp_path):
    def never(texts):
        raise AssertionError("a one-cluster router must not embed")

    info = fit_prefix_router(tmp_path / "no-corpus.parquet", tmp_path / "no-assignments.parquet",
                             np.zeros((1, 8), np.float32), never, never, never, tmp_path / "router")
    assert info["trivial"] and json.loads((tmp_path / "router" / "settings.json").read_text())["n_features"] == 0
    router = PrefixRouter(tmp_path / "router", np.zeros((1, 8), np.float32), never, never, never)
    logits = router.logits(router.vectors(["a text", "another"]), np.array([0]))
    assert logits.shape == (2, 1) and np.all(np.isfinite(logits))


def test_a_router_that_does_not_fit_the_clusters_is_refused(tmp_path):
    fit_prefix_router(tmp_path / "c", tmp_path / "a", np.zeros((1, 8), np.float32), None, None, None, tmp_path / "r")
    with pytest.raises(IncompatibleRunError, match="does not fit"):
        PrefixRouter(tmp_path / "r", np.zeros((3, 8), np.float32), None, None, None)


def test_a_version_1_router_is_still_read_and_routes(tmp_path):
    """A router an older cbtm wrote (no n-gram model) keeps working until `cbtm run` refits it."""
    k, dim = 3, 4
    centroids = np.eye(k, dim, dtype=np.float32)
    coef = np.zeros((k, dim + 7 * k + N_HASHED), np.float32)
    coef[:, dim:dim + k] = np.eye(k) * 10  # plain centroid routing
    (tmp_path / "r").mkdir()
    np.save(tmp_path / "r" / "coef.npy", coef)
    np.save(tmp_path / "r" / "intercept.npy", np.zeros(k, np.float32))
    (tmp_path / "r" / "settings.json").write_text(json.dumps(
        {"format": "cbtm-prefix-router", "version": 1, "n_features": coef.shape[1], "n_clusters": k,
         "temperature": 1.0}))
    assert not router_is_current(tmp_path / "r")
    router = PrefixRouter(tmp_path / "r", centroids, lambda texts: centroids[[len(t) % k for t in texts]],
                          lambda t: [ord(c) for c in t], lambda ids: "".join(map(chr, ids)))
    logits = router.logits(router.vectors(["abc", "a", "ab"]), np.arange(k))
    assert logits.argmax(1).tolist() == [0, 1, 2]


def test_a_version_2_router_is_still_read_and_routes_by_its_dense_ngram_model(tmp_path):
    """A router with version 2's dense unigram + bigram log-probabilities keeps routing until it is refitted."""
    k, dim = 2, 4
    log_probs = np.full((k, N_HASHED), np.log(1e-6), np.float32)
    log_probs[0, 5], log_probs[1, 6] = np.log(0.5), np.log(0.5)  # cluster 0 writes token 5, cluster 1 token 6
    coef = np.zeros((k, dim + 14 * k + N_HASHED), np.float32)
    coef[:, dim + 7 * k:dim + 8 * k] = np.eye(k)  # route by the n-gram posteriors alone
    (tmp_path / "r").mkdir()
    np.save(tmp_path / "r" / "coef.npy", coef)
    np.save(tmp_path / "r" / "intercept.npy", np.zeros(k, np.float32))
    np.save(tmp_path / "r" / "ngram_log_probs.npy", log_probs)
    (tmp_path / "r" / "settings.json").write_text(json.dumps(
        {"format": "cbtm-prefix-router", "version": 2, "n_features": coef.shape[1], "n_clusters": k,
         "temperature": 1.0}))
    assert not router_is_current(tmp_path / "r")
    router = PrefixRouter(tmp_path / "r", np.eye(k, dim, dtype=np.float32), lambda texts: np.ones((len(texts), dim)),
                          lambda t: [5 if c == "a" else 6 for c in t], lambda ids: "x" * len(ids))
    logits = router.logits(router.vectors(["aaa", "bb", "ab a"]), np.arange(k))
    assert logits.argmax(1).tolist() == [0, 1, 0]
    np.save(tmp_path / "r" / "ngram_log_probs.npy", log_probs[:, :100])
    with pytest.raises(IncompatibleRunError, match="damaged"):
        PrefixRouter(tmp_path / "r", np.eye(k, dim, dtype=np.float32), None, None, None)


def test_the_gate_falls_back_to_centroids_only_where_the_router_is_worse_on_held_out_prefixes():
    """Short prefixes: the router knows the label, the centroids guess. Long ones: the reverse. The gate keeps the
    router for the first, gives the centroids the second, and leaves a bucket without held-out prefixes at 0."""
    rng = np.random.default_rng(0)
    n, k = 600, 4
    labels = rng.integers(0, k, n)
    buckets = np.repeat([0, 5], n // 2)  # 8 and 256 tokens; buckets 1-4 have no held-out prefixes
    truth, noise = np.eye(k)[labels] * 4.0, rng.normal(size=(n, k)) * 2.0
    router = np.where(buckets[:, None] == 0, truth, noise)
    d2 = np.where(buckets[:, None] == 5, truth, noise) * 0.1  # squared-distance scale: a centroid temperature < 1
    centroid_tau, gate = fit_gate(router, d2, labels, buckets)
    assert len(gate) == len(PREFIX_LENGTHS) and gate[1:5] == [0.0] * 4
    assert gate[0] <= 0.1 and gate[5] >= 0.8 and set(gate) <= {round(float(g), 4) for g in GATE_GRID}
    blended = gate_logits(router, d2, buckets, gate, centroid_tau)
    for b in (0, 5):
        rows = buckets == b
        assert (blended[rows].argmax(1) == labels[rows]).mean() >= 0.9
    np.testing.assert_allclose(gate_logits(router, d2, buckets, [0.0] * 6, centroid_tau), router)
    np.testing.assert_allclose(gate_logits(router, d2, buckets, [1.0] * 6, 2.0), d2 / 2.0)


def test_a_gated_router_blends_in_centroid_routing_by_the_length_it_reads_from_its_features(tmp_path):
    """A version-4 router whose gate gives 256-token texts wholly to the centroids: a long text routes to its
    nearest centroid against the router's own choice, a short one by the router, at any column subset."""
    k, dim = 3, 4
    centroids = np.eye(k, dim, dtype=np.float32)
    coef = np.zeros((k, dim + 14 * k + N_HASHED), np.float32)
    coef[:, :dim] = -np.eye(k, dim) * 5  # the router prefers any cluster but the nearest one
    (tmp_path / "r").mkdir()
    np.save(tmp_path / "r" / "coef.npy", coef)
    np.save(tmp_path / "r" / "intercept.npy", np.zeros(k, np.float32))
    ngram = NgramModel([[1, 2], [3, 4], [5, 6]], np.arange(k), k).full().save(tmp_path / "r")
    settings = {"format": "cbtm-prefix-router", "version": 4, "n_features": coef.shape[1], "n_clusters": k,
                "temperature": 1.0, "centroid_temperature": 0.5, "gate": [0.0] * 5 + [1.0], "ngram": ngram}
    (tmp_path / "r" / "settings.json").write_text(json.dumps(settings))
    assert router_is_current(tmp_path / "r")
    texts = ["a" * 300, "b" * 300, "a" * 8, "b" * 8]  # 256 tokens routed (the last 256), 8 tokens

    def embed(batch):
        return centroids[[0 if t.startswith("a") else 1 for t in batch]]

    router = PrefixRouter(tmp_path / "r", centroids, embed, lambda t: [ord(c) for c in t],
                          lambda ids: "".join(map(chr, ids)))
    vectors = router.vectors(texts)
    logits = router.logits(vectors, np.arange(k))
    assert logits[:2].argmax(1).tolist() == [0, 1]  # long: the nearest centroid, -d^2 / 0.5
    np.testing.assert_allclose(logits[0], [0.0, -4.0, -4.0], atol=1e-5)
    assert logits[2].argmax() != 0 and logits[3].argmax() != 1  # short: the router's own (ungated) choice
    np.testing.assert_allclose(logits[2:], vectors[2:] @ coef.T.astype(np.float64), atol=1e-5)
    np.testing.assert_allclose(router.logits(vectors, np.array([2, 0])), logits[:, [2, 0]], atol=1e-6)
