import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ensemble.router import prior_weights, route_weights

distances = arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 8)),
                   elements=st.floats(0, 4, allow_nan=False))


def dense_softmax(d2, temperature):
    z = np.exp(-(d2 - d2.min(1, keepdims=True)) / temperature)
    return z / z.sum(1, keepdims=True)


@settings(max_examples=200, deadline=None)
@given(d2=distances, temperature=st.floats(0.01, 10), data=st.data())
def test_weights_are_non_negative_sum_to_one_and_best_first(d2, temperature, data):
    top_k = data.draw(st.integers(1, d2.shape[1]))
    ids, w = route_weights(d2, temperature, top_k)
    assert ids.shape == w.shape == (d2.shape[0], top_k)
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-9)
    assert np.all(np.diff(w, axis=1) <= 1e-12)  # best first
    np.testing.assert_array_equal(ids[:, 0], d2.argmin(1))  # nearest centroid first
    assert all(len(set(row)) == top_k for row in ids)


def test_ranks_by_distance_where_the_logits_underflow():
    """Found by the property above: -d^2 / T rounds the smallest subnormal distance to 0, a tie with d^2 = 0."""
    ids, w = route_weights(np.array([[5e-324, 0.0]]), 2.0, 1)
    assert ids.tolist() == [[1]] and w.tolist() == [[1.0]]


@settings(max_examples=100, deadline=None)
@given(d2=distances, temperature=st.floats(0.01, 10))
def test_top_k_equal_to_k_is_the_dense_softmax(d2, temperature):
    ids, w = route_weights(d2, temperature, d2.shape[1])
    dense = np.zeros_like(w)
    np.put_along_axis(dense, ids, w, axis=1)
    np.testing.assert_allclose(dense, dense_softmax(d2, temperature), rtol=1e-7, atol=1e-12)


def test_top_k_renormalises_the_kept_softmax_weights():
    d2 = np.array([[0.2, 0.5, 1.0, 2.0]])
    full = dense_softmax(d2, 0.5)[0]
    ids, w = route_weights(d2, 0.5, 2)
    assert ids.tolist() == [[0, 1]]
    np.testing.assert_allclose(w[0], full[:2] / full[:2].sum())


@pytest.mark.parametrize("top_k,temperature", [(0, 0.1), (5, 0.1), (1, 0.0)])
def test_bad_arguments(top_k, temperature):
    with pytest.raises(ValueError):
        route_weights(np.zeros((1, 4)), temperature, top_k)


def test_prior_prefers_the_largest_clusters():
    ids, w = prior_weights(np.array([10, 30, 20]), 2)
    assert ids.tolist() == [[1, 2]]
    np.testing.assert_allclose(w, [[0.6, 0.4]])
