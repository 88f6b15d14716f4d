from collections import Counter

import numpy as np
import pytest

from cluster.kmeans import SphericalKMeans, squared_distances
from cluster.report import distinctive_words
from ensemble.rundir import UserInputError


def blobs(n_per=50, k=4, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    x = np.concatenate([c + 0.1 * rng.normal(size=(n_per, d)) for c in centers])
    return x.astype(np.float32), np.repeat(np.arange(k), n_per)


def test_follows_the_sklearn_contract_and_recovers_blobs():
    x, y = blobs()
    model = SphericalKMeans(n_clusters=4, random_state=0)
    assert model.fit(x) is model
    assert model.cluster_centers_.shape == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(model.cluster_centers_, axis=1), 1.0, atol=1e-5)
    assert len(model.labels_) == len(x)
    for label in range(4):  # every true blob lands in exactly one cluster
        assert len(set(model.labels_[y == label])) == 1
    assert model.transform(x).shape == (len(x), 4)
    np.testing.assert_array_equal(model.predict(x), model.labels_)


def test_same_inputs_and_seed_give_the_same_centroids():
    x, _ = blobs(seed=1)
    a = SphericalKMeans(4, random_state=3).fit(x).cluster_centers_
    b = SphericalKMeans(4, random_state=3).fit(x).cluster_centers_
    np.testing.assert_array_equal(a, b)


def test_squared_distances_match_numpy():
    x, _ = blobs(n_per=3)
    c = x[:2]
    expected = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    np.testing.assert_allclose(squared_distances(x, c), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", ["nan", "zero", "too_many"])
def test_bad_embeddings_are_clear_errors(bad):
    x, _ = blobs(n_per=3)
    k = 4
    if bad == "nan":
        x[0, 0] = np.nan
    elif bad == "zero":
        x[1] = 0
    else:
        k = len(x) + 1
    with pytest.raises(UserInputError):
        SphericalKMeans(k).fit(x)


def test_distinctive_words_name_each_cluster():
    texts = ["bread dough yeast flour oven"] * 3 + ["stars galaxy telescope orbit"] * 3
    words = distinctive_words(texts, np.array([0, 0, 0, 1, 1, 1]), 2, n_words=3)
    assert set(words[0]) <= {"bread", "dough", "yeast", "flour", "oven"} and len(words[0]) == 3
    assert set(words[1]) <= {"stars", "galaxy", "telescope", "orbit"}
    assert Counter(w for ws in words for w in ws).most_common(1)[0][1] == 1
