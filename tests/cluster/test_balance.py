import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from cluster.balance import assignment_cost, balanced_assignment, dual_bound, greedy_regret_assignment
from ground.errors import UserInputError


def costs(n, k, seed, ties=False):
    """Squared distances float32 [n, k] of Gaussian points to k random centres (an uneven mixture)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, 6))
    x = centers[rng.choice(k, n, p=rng.dirichlet(np.ones(k)))] + rng.normal(size=(n, 6))
    d = ((x[:, None] - centers[None]) ** 2).sum(-1)
    return (np.round(d) if ties else d).astype(np.float32)


def brute_force(d, capacity):
    """The optimal cost: every cluster expanded into ``capacity`` slots, then a linear assignment."""
    slots = np.repeat(d.astype(np.float64), capacity, axis=1)
    rows, cols = linear_sum_assignment(slots)
    return slots[rows, cols].sum()


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("ties", [False, True])
def test_matches_brute_force_and_respects_the_capacity(seed, ties):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(10, 70)), int(rng.integers(2, 6))
    capacity = int(np.ceil(n / k * rng.uniform(1.0, 1.3)))
    d = costs(n, k, seed, ties)
    labels, prices = balanced_assignment(d, capacity, return_prices=True)
    assert labels.dtype == np.int32 and labels.shape == (n,)
    assert np.bincount(labels, minlength=k).max() <= capacity
    optimum = brute_force(d, capacity)
    assert assignment_cost(d, labels) == pytest.approx(optimum, rel=1e-6, abs=1e-6)
    assert dual_bound(d, prices - prices.min(), capacity) <= optimum + 1e-6  # the prices certify optimality
    assert assignment_cost(d, greedy_regret_assignment(d, capacity)) >= optimum - 1e-6


def test_shortest_path_finish_alone_is_exact_and_greedy_repair_respects_the_capacity():
    d = costs(60, 4, seed=3)
    optimum = brute_force(d, 16)
    exact = balanced_assignment(d, 16, max_sweeps=0)  # every surplus row moved by shortest paths
    assert assignment_cost(d, exact) == pytest.approx(optimum, rel=1e-6)
    repaired = balanced_assignment(d, 16, max_sweeps=1, max_moves=0)  # auction + greedy repair
    assert np.bincount(repaired, minlength=4).max() <= 16


def test_larger_problem_is_certified_optimal():
    d = costs(20_000, 8, seed=5)
    capacity = int(np.ceil(1.1 * 20_000 / 8))
    labels, prices = balanced_assignment(d, capacity, return_prices=True)
    assert np.bincount(labels, minlength=8).max() <= capacity
    cost = assignment_cost(d, labels)
    assert cost - dual_bound(d, prices - prices.min(), capacity) <= 1e-6 * cost
    assert cost <= assignment_cost(d, greedy_regret_assignment(d, capacity)) + 1e-6


def test_a_loose_capacity_keeps_the_nearest_centroid():
    d = costs(200, 5, seed=1)
    largest = np.bincount(d.argmin(1), minlength=5).max()
    np.testing.assert_array_equal(balanced_assignment(d, largest), d.argmin(1))
    np.testing.assert_array_equal(balanced_assignment(d[:, :1], 200), np.zeros(200))


@pytest.mark.parametrize("bad", ["too_small", "nan"])
def test_impossible_or_broken_input_is_a_clear_error(bad):
    d = costs(50, 4, seed=2)
    capacity = 12 if bad == "too_small" else 20
    if bad == "nan":
        d[3, 1] = np.nan
    with pytest.raises(UserInputError) as info:
        balanced_assignment(d, capacity)
    assert "\n" not in str(info.value)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 5), extra=st.integers(0, 5), seed=st.integers(0, 1000))
def test_any_cost_matrix_gets_a_feasible_optimal_assignment(n, k, extra, seed):
    capacity = -(-n // k) + extra
    d = np.random.default_rng(seed).integers(0, 4, size=(n, k)).astype(np.float32)  # many ties
    labels = balanced_assignment(d, capacity)
    assert labels.min() >= 0 and labels.max() < k
    assert np.bincount(labels, minlength=k).max() <= capacity
    assert assignment_cost(d, labels) == pytest.approx(brute_force(d, capacity), abs=1e-6)
