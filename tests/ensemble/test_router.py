import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.sparse import csr_matrix

from ensemble.router import prior_weights, route_weights
from ensemble.scoring import VECTOR_CHUNK, context_vectors, window_starts, window_weights

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


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n_tokens=st.integers(1, 80), n=st.integers(2, 6), window=st.integers(2, 40))
def test_the_first_windows_early_spans_keep_every_expert_by_the_router(data, n_tokens, n, window):
    """Scoring weights: the size prior before a text's first span; inside the first window (spans from a
    router's early starts) every expert by the router's softmax; from the second window on its top-k."""
    top_k = data.draw(st.integers(1, n))
    starts = window_starts(n_tokens, window, (1, window // 2))
    owners = [(0, s, e) for s, e in zip(starts, [*starts[1:], n_tokens])]
    logits = data.draw(arrays(np.float64, (len(owners), n), elements=st.floats(-30, 0))) if owners else None
    prior = (np.arange(n), np.arange(1.0, n + 1) / np.arange(1.0, n + 1).sum())
    w = window_weights([n_tokens], n, owners, logits, top_k, np.arange(n), prior, window)[0]
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-9)
    first = starts[0] if starts else n_tokens
    np.testing.assert_array_equal(w[:first], np.broadcast_to(prior[1], (first, n)))
    for row, (_, s, e) in zip(logits if owners else [], owners):
        softmax = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        if s < window:
            np.testing.assert_allclose(w[s:e], np.broadcast_to(softmax, (e - s, n)), rtol=1e-9, atol=1e-12)
        else:
            assert ((w[s:e] > 0).sum(1) <= top_k).all()
            kept = w[s] > 0
            np.testing.assert_allclose(w[s, kept], softmax[kept] / softmax[kept].sum(), rtol=1e-9)


def _dense_fit(x: np.ndarray, y: np.ndarray, k: int, l2: float, d2_col: int, steps: int = 60):
    """The prefix router's residual fit written plainly: dense x, every column, torch autograd throughout."""
    import torch

    from ensemble.prefix_router import CENTROID_T

    xt = torch.as_tensor(x, dtype=torch.float32)
    base = torch.zeros(x.shape[1], k)
    base[d2_col:d2_col + k] = torch.eye(k) / CENTROID_T
    w = torch.zeros(x.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, history_size=20, line_search_fn="strong_wolfe")
    target = torch.as_tensor(y)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ (base + w) + b, target) + l2 * (w.pow(2).sum() + b.pow(2).sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    return (base + w).detach().numpy().T, b.detach().numpy()


def _objective(x: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: np.ndarray, l2: float, d2_col: int):
    """The residual fit's loss (mean cross-entropy + l2 |W, b|^2, W = coef - the centroid start) in float64."""
    from ensemble.prefix_router import CENTROID_T

    k = coef.shape[0]
    w = coef.astype(np.float64).copy()
    w[:, d2_col:d2_col + k] -= np.eye(k) / CENTROID_T
    z = x.astype(np.float64) @ coef.T.astype(np.float64) + intercept
    z -= z.max(axis=1, keepdims=True)
    cross_entropy = -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))).mean()
    return float(cross_entropy + l2 * ((w ** 2).sum() + (intercept.astype(np.float64) ** 2).sum()))


def test_the_sparse_residual_fit_finds_the_plain_dense_fits_optimum():
    """fit_residual skips the columns no prefix uses and takes its sparse products from scipy: the same router."""
    import scipy.sparse as sp

    from ensemble.prefix_router import fit_residual

    rng = np.random.default_rng(0)
    n, k, d2_col = 300, 4, 8
    dense = rng.normal(size=(n, d2_col + k)).astype(np.float32)
    hashed = sp.random(n, 400, density=0.002, random_state=1, dtype=np.float32)  # many columns all zero
    x = sp.hstack([sp.csr_matrix(dense), hashed]).tocsr()
    y = rng.integers(0, k, n)
    unused = d2_col + k + np.flatnonzero(np.diff(hashed.tocsc().indptr) == 0)
    assert len(unused) > 100
    for l2, (coef, intercept) in zip((1e-3, 1e-1), fit_residual(x, y, k, (1e-3, 1e-1), d2_col)):
        want_coef, want_intercept = _dense_fit(x.toarray(), y, k, l2, d2_col)
        assert coef.shape == (k, x.shape[1]) and coef.dtype == np.float32
        got, want = (_objective(x.toarray(), y, c, b, l2, d2_col) for c, b in ((coef, intercept),
                                                                              (want_coef, want_intercept)))
        assert abs(got - want) <= 1e-5 * want, (l2, got, want)  # a halved data gradient: +1.5% at 1e-3
        if l2 >= 0.1:  # well conditioned: one optimum, reached by both on every CPU (at 1e-3 L-BFGS stops in
            # a flat valley, where the last steps' rounding moves a coefficient by up to 0.012 on an AVX2 CPU)
            np.testing.assert_allclose(coef, want_coef, atol=2e-3)
            np.testing.assert_allclose(intercept, want_intercept, atol=2e-3)
        assert not coef[:, unused].any()  # a column without data keeps its start


@pytest.mark.parametrize("sparse", [False, True])
def test_context_vectors_in_chunks_equal_one_call_and_report_progress(sparse):
    class Router:  # features of a text depend on that text alone, as every router's do
        def vectors(self, texts):
            x = np.array([[len(t), t.count("a"), hash(t) % 97] for t in texts], np.float32)
            return csr_matrix(x) if sparse else x

    contexts = [f"a{'ab' * (i % 13)}{i}" for i in range(2 * VECTOR_CHUNK + 5)]
    calls = []
    chunked = context_vectors(Router(), contexts, lambda done, total: calls.append((done, total)))
    whole = Router().vectors(contexts)
    if sparse:
        assert chunked.format == "csr"
        chunked, whole = chunked.toarray(), whole.toarray()
    np.testing.assert_array_equal(chunked, whole)
    n = len(contexts)
    assert calls == [(0, n), (VECTOR_CHUNK, n), (2 * VECTOR_CHUNK, n), (n, n)]
