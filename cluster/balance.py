"""Capacity-constrained (balanced) assignment of documents to clusters, for training.

Problem: given squared distances D [n, k] and a capacity C with C * k >= n, choose one cluster a(i) per row
minimising sum_i D[i, a(i)] subject to at most C rows per cluster (a transportation problem).

Method (`balanced_assignment`), exact, in two phases that share one invariant: every row sits in a cheapest
cluster under ``D[i, j] + p[j]`` for cluster prices p >= 0, and only full clusters have a positive price
(the optimality conditions of the problem's linear programme, whose optimum is integral).

1. Ascending-price auction (moves the bulk): while a cluster holds more than C rows, its price rises just
   enough that the C rows that lose most by leaving stay; the others move to their second choice. One sweep
   is O(n k). It has a slow tail (rows bounce between full neighbours), so it stops as soon as a sweep
   removes less than 5 % of the surplus.
2. Successive shortest paths (moves the rest, one row at a time): on the graph of the k clusters, where
   a -> b costs the cheapest reduced cost of moving a row of a to b, Dijkstra finds the cheapest chain of
   moves from an over-full cluster to one with room, and prices rise so the chain costs nothing.
   The per-pair cheapest rows are kept in sorted candidate lists, so a move costs O(k^2), not O(n k).

The prices certify the result: ``dual_bound(D, p - min(p), C)`` is a lower bound on the optimum; measured
gaps are 0 (bench/kmeans_scale.py; it also matched scipy's HiGHS LP optimum at 100,000 x 16). Time: 1-2 s at
100,000 x 16, about 20 s at 1,000,000 x 64 when the largest natural cluster is twice the cap (a near-balanced 1M x 64
needs about 1 s). Memory: D plus a few [n] arrays. Only if more than ``max_moves`` rows were left for
phase 2 are the excess placed greedily by regret (approximate, logged).

`greedy_regret_assignment` is the fast baseline (no prices): rows are placed best-regret-first.
"""
from __future__ import annotations

import logging

import numpy as np

from ground.errors import UserInputError

log = logging.getLogger(__name__)

AUCTION_MIN_PROGRESS = 0.05  # stop the auction when a sweep removes less than this share of the surplus


def _top2(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row of cost [m, k] (k >= 2): (argmin int64, min float64, second argmin int64, second min float64)."""
    part = np.argpartition(cost, 1, axis=1)[:, :2]
    vals = np.take_along_axis(cost, part, axis=1).astype(np.float64)
    swap = vals[:, 0] > vals[:, 1]
    part[swap] = part[swap][:, ::-1]
    vals[swap] = vals[swap][:, ::-1]
    return part[:, 0].astype(np.int64), vals[:, 0], part[:, 1].astype(np.int64), vals[:, 1]


def _check(d: np.ndarray, capacity: int) -> np.ndarray:
    d = np.asarray(d, dtype=np.float32)
    if d.ndim != 2 or d.shape[1] < 1:
        raise ValueError(f"sq_distances must be a 2-D array [n, k], got shape {d.shape}")
    if capacity < 1 or capacity * d.shape[1] < d.shape[0]:
        raise UserInputError(f"a capacity of {capacity} per cluster cannot hold {d.shape[0]} documents in "
                             f"{d.shape[1]} clusters: raise cluster.balance_slack")
    if not np.isfinite(d).all():
        raise UserInputError("distances contain NaN or inf: re-run the embed stage (cbtm run --force embed)")
    return d


def assignment_cost(sq_distances: np.ndarray, labels: np.ndarray) -> float:
    """Total cost sum_i D[i, labels[i]] (float64) of an assignment labels int [n] under D [n, k]."""
    d = np.asarray(sq_distances)
    return float(d[np.arange(len(d)), labels].astype(np.float64).sum())


def dual_bound(sq_distances: np.ndarray, prices: np.ndarray, capacity: int) -> float:
    """Lower bound on the optimal balanced cost for any prices p >= 0 [k]: sum_i min_j (D[i,j] + p[j]) - C sum p."""
    d = np.asarray(sq_distances, dtype=np.float64)
    p = np.asarray(prices, dtype=np.float64)
    total = sum(float((d[s] + p).min(1).sum()) for s in _chunks(len(d)))
    return total - capacity * float(p.sum())


def _chunks(n: int, size: int = 65_536):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def greedy_regret_assignment(sq_distances: np.ndarray, capacity: int) -> np.ndarray:
    """Greedy capacity-constrained assignment: int32 [n], at most ``capacity`` rows per cluster.

    Rows whose second choice is much worse than their first (high regret) are placed first.
    """
    d = _check(sq_distances, capacity)
    free = np.full(d.shape[1], capacity, dtype=np.int64)
    return _greedy_fill(d, np.arange(len(d)), free).astype(np.int32)


def _greedy_fill(cost: np.ndarray, rows: np.ndarray, free: np.ndarray, prices: np.ndarray | None = None) -> np.ndarray:
    """Cluster for each of ``rows`` (int64 [m]) under cost [n, k] (+ prices [k]) within ``free`` [k] slots.

    Vectorised in rounds: every pending row proposes to its cheapest open cluster; a cluster accepts its
    proposers by decreasing regret up to its free slots and closes when full. Each round assigns every
    pending row or closes at least one cluster, so there are at most k + 1 rounds. ``free`` is updated.
    """
    out = np.full(len(rows), -1, dtype=np.int64)
    pending = np.arange(len(rows))
    k = cost.shape[1]
    while len(pending):
        sub = cost[rows[pending]].astype(np.float64)
        if prices is not None:
            sub += prices
        sub[:, free <= 0] = np.inf
        if k == 1:
            best, regret = np.zeros(len(sub), np.int64), np.zeros(len(sub))
        else:
            best, v1, _, v2 = _top2(sub)
            regret = np.where(np.isinf(v2), np.inf, v2 - v1)
        order = np.lexsort((-regret, best))  # by cluster, highest regret first
        sorted_best = best[order]
        first = np.searchsorted(sorted_best, sorted_best, side="left")
        accept = order[(np.arange(len(order)) - first) < free[sorted_best]]
        out[pending[accept]] = best[accept]
        free -= np.bincount(best[accept], minlength=k)
        keep = np.ones(len(pending), bool)
        keep[accept] = False
        pending = pending[keep]
    return out


def balanced_assignment(sq_distances: np.ndarray, capacity: int, max_sweeps: int = 50,
                        max_moves: int = 200_000, return_prices: bool = False):
    """Minimum-cost assignment with at most ``capacity`` rows per cluster.

    sq_distances: float [n, k] costs (squared distances to the centroids); capacity: int with capacity * k >= n.
    Returns int32 [n] cluster per row (and the float64 [k] prices when ``return_prices``). Rows whose nearest
    cluster has room keep it: with capacity >= the largest natural cluster the result is the plain argmin.
    Exact (up to float rounding): the auction moves the bulk, shortest paths move the last surplus rows. Only
    if more than ``max_moves`` surplus rows were left for shortest paths are the excess placed greedily by
    regret under the auction's prices (approximate, logged at INFO).
    """
    d = _check(sq_distances, capacity)
    n, k = d.shape
    if k == 1 or n == 0:
        labels, prices = np.zeros(n, np.int32), np.zeros(k)
        return (labels, prices) if return_prices else labels
    labels, prices, loads, sweeps = _auction(d, capacity, max_sweeps)
    surplus = int(np.maximum(loads - capacity, 0).sum())
    if surplus:
        _shortest_path_finish(d, labels, prices, loads, capacity, max_moves)
    left = int(np.maximum(loads - capacity, 0).sum())
    if left:
        log.info("balanced assignment: %d surplus row(s) left after %d auction sweeps and %d shortest-path "
                 "moves; placing them greedily by regret (approximate)", left, sweeps, max_moves)
        labels = _repair(d, labels, capacity, prices)
    log.debug("balanced assignment: n=%d k=%d capacity=%d: %d auction sweeps, %d shortest-path moves",
              n, k, capacity, sweeps, surplus - left)
    labels = labels.astype(np.int32)
    return (labels, prices) if return_prices else labels


def _second_best(cost: np.ndarray, best: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows of cost [m, k] float64 and their chosen column best [m]: (second column int64, its cost)."""
    cost = cost.copy()
    cost[np.arange(len(cost)), best] = np.inf
    second = cost.argmin(1)
    return second, cost[np.arange(len(cost)), second]


def _auction(d: np.ndarray, capacity: int, max_sweeps: int):
    """Ascending-price auction; returns (labels int64 [n], prices float64 [k], loads int64 [k], sweeps).

    Invariant: every row sits in a cheapest cluster under d + prices; a raised cluster holds >= capacity rows.
    Stops when no cluster is over capacity, or when a sweep shrank the total surplus by less than 5 % (the
    auction's slow tail: shortest paths finish faster), or after ``max_sweeps`` sweeps.
    """
    k = d.shape[1]
    prices = np.zeros(k)
    i1, v1, i2, v2 = (np.concatenate(parts) for parts in zip(*(_top2(d[s]) for s in _chunks(len(d)))))
    loads = np.bincount(i1, minlength=k)
    previous, sweep = np.inf, 0
    for sweep in range(1, max_sweeps + 1):
        over = np.flatnonzero(loads > capacity)
        surplus = int((loads[over] - capacity).sum())
        if not len(over) or surplus > (1.0 - AUCTION_MIN_PROGRESS) * previous:
            break
        previous = surplus
        for j in over[np.argsort(-loads[over], kind="stable")]:
            if loads[j] > capacity:
                _raise_price(d, prices, j, capacity, i1, v1, i2, v2, loads)
    return i1, prices, loads, sweep


def _raise_price(d, prices, j, capacity, i1, v1, i2, v2, loads) -> None:
    """Raise cluster j's price until exactly ``capacity`` of its rows stay; update the top-2 state in place.

    The rows that stay are those that lose most by leaving (largest second-best minus best); the others move
    to their second choice, which after the raise costs them no more than j.
    """
    rows = np.flatnonzero(i1 == j)
    margin = v2[rows] - v1[rows]
    cut = len(rows) - capacity
    part = np.argpartition(margin, cut)
    leave, stay = rows[part[:cut]], rows[part[cut:]]
    delta = float(margin[part[:cut]].max())
    prices[j] += delta
    v1[stay] += delta
    i1[leave], v1[leave] = i2[leave], v2[leave]
    i2[leave], v2[leave] = _second_best(d[leave] + prices, i1[leave])
    loads[j] = capacity
    loads += np.bincount(i1[leave], minlength=len(loads))
    second = np.flatnonzero(i2 == j)  # rows for which j was the runner-up: it now costs more
    second = second[i1[second] != j]
    if len(second):
        i2[second], v2[second] = _second_best(d[second] + prices, i1[second])


class _MoveCandidates:
    """For every ordered pair of clusters (a, b): the cheapest row of a to move to b.

    The price-free key of moving row i from a to b is d[i, b] - d[i, a]; its reduced cost under prices p is
    key + p[b] - p[a], so the order of a's rows never changes when prices do. Per cluster, the ``top``
    cheapest rows per destination are kept sorted (rebuilt when used up) and rows that arrived later are kept
    in a short list; rows that left are skipped lazily (``labels`` is shared and updated by `move`).
    """

    def __init__(self, d: np.ndarray, labels: np.ndarray, top: int = 512):
        self.d, self.labels, self.top = d, labels, top
        k = d.shape[1]
        self.rows: list = [None] * k
        self.keys: list = [None] * k
        self.complete = np.zeros(k, bool)
        self.ptr = np.zeros((k, k), np.int64)
        self.arrivals: list[list[int]] = [[] for _ in range(k)]
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(k + 1))
        for a in range(k):
            self._build(a, order[bounds[a]:bounds[a + 1]])

    def _build(self, a: int, members: np.ndarray) -> None:
        keys = self.d[members].astype(np.float64) - self.d[members, a][:, None]
        top = min(self.top, len(members))
        idx = np.argpartition(keys, top - 1, axis=0)[:top] if 0 < top < len(members) else \
            np.repeat(np.arange(len(members))[:, None], keys.shape[1], axis=1)
        part = np.take_along_axis(keys, idx, axis=0)
        order = np.argsort(part, axis=0, kind="stable")
        self.rows[a] = members[np.take_along_axis(idx, order, axis=0)]
        self.keys[a] = np.take_along_axis(part, order, axis=0)
        self.complete[a] = top == len(members)
        self.ptr[a] = 0
        self.arrivals[a] = []

    def heads(self, a: int) -> tuple[np.ndarray, np.ndarray]:
        """(key float64 [k], row int64 [k]): per destination b, the cheapest row of a (inf, -1 if none)."""
        rows, keys, p = self.rows[a], self.keys[a], self.ptr[a]
        cols = np.arange(len(p))
        while True:
            stale = p < len(rows)
            stale[stale] = self.labels[rows[p[stale], cols[stale]]] != a
            if not stale.any():
                break
            p[stale] += 1
        if (p == len(rows)).any() and not self.complete[a]:
            self._build(a, np.flatnonzero(self.labels == a))
            return self.heads(a)
        found = p < len(rows)
        key = np.full(len(p), np.inf)
        row = np.full(len(p), -1)
        key[found], row[found] = keys[p[found], cols[found]], rows[p[found], cols[found]]
        arrived = np.array(self.arrivals[a], dtype=np.int64)
        arrived = arrived[self.labels[arrived] == a]
        self.arrivals[a] = arrived.tolist()
        if len(arrived):
            extra = self.d[arrived].astype(np.float64) - self.d[arrived, a][:, None]
            best = extra.argmin(0)
            better = extra[best, cols] < key
            key[better], row[better] = extra[best, cols][better], arrived[best][better]
        key[a], row[a] = np.inf, -1
        return key, row

    def move(self, row: int, b: int) -> None:
        """Record that ``row`` now belongs to cluster b."""
        self.labels[row] = b
        self.arrivals[b].append(int(row))


def _shortest_path_finish(d, labels, prices, loads, capacity: int, max_moves: int) -> None:
    """Successive shortest paths: move surplus rows one at a time along the cheapest chain of moves.

    Nodes are the k clusters; edge a -> b costs the cheapest reduced cost of moving a row of a to b (>= 0
    because every row sits in a cheapest cluster). Dijkstra from the over-full clusters to the nearest cluster
    with room; prices rise by (distance to it - own distance) so the path costs nothing and every row stays in
    a cheapest cluster: the assignment stays optimal for its loads. Updates labels, prices, loads in place.
    """
    k = d.shape[1]
    cand = _MoveCandidates(d, labels)
    weight = np.full((k, k), np.inf)
    mover = np.full((k, k), -1)
    for a in range(k):
        weight[a], mover[a] = cand.heads(a)
    for _ in range(max_moves):
        if not (loads > capacity).any():
            return
        reduced = np.maximum(weight + prices[None, :] - prices[:, None], 0.0)
        path = _dijkstra(reduced, loads > capacity, loads < capacity, prices)
        for a, b in zip(path[:-1], path[1:]):
            cand.move(int(mover[a, b]), b)
        loads[path[0]] -= 1
        loads[path[-1]] += 1
        for a in path:
            weight[a], mover[a] = cand.heads(a)


def _dijkstra(weight: np.ndarray, sources: np.ndarray, sinks: np.ndarray, prices: np.ndarray) -> list[int]:
    """Cheapest path (list of clusters) from any source to the nearest sink over weight [k, k] >= 0.

    Raises prices in place by max(0, distance to that sink - own distance) over the settled clusters.
    """
    k = len(weight)
    dist = np.where(sources, 0.0, np.inf)
    pred = np.full(k, -1)
    done = np.zeros(k, bool)
    while True:
        u = int(np.argmin(np.where(done, np.inf, dist)))
        if not np.isfinite(dist[u]):
            raise RuntimeError("balanced assignment: no cluster with room is reachable (capacity too small)")
        done[u] = True
        if sinks[u]:
            break
        cand = dist[u] + weight[u]
        better = (cand < dist) & ~done
        dist[better], pred[better] = cand[better], u
    prices += np.maximum(0.0, dist[u] - np.where(done, dist, np.inf))
    path = [u]
    while pred[path[-1]] >= 0:
        path.append(int(pred[path[-1]]))
    return path[::-1]


def _repair(d: np.ndarray, labels: np.ndarray, capacity: int, prices: np.ndarray) -> np.ndarray:
    """Keep, in each over-full cluster, the ``capacity`` rows with the largest regret; re-place the rest greedily."""
    k = d.shape[1]
    labels = labels.copy()
    cost = d.astype(np.float64) + prices
    surplus = []
    for j in np.flatnonzero(np.bincount(labels, minlength=k) > capacity):
        rows = np.flatnonzero(labels == j)
        others = np.delete(cost[rows], j, axis=1).min(1)
        order = np.argsort(-(others - cost[rows, j]), kind="stable")
        surplus.append(rows[order[capacity:]])
        labels[rows[order[capacity:]]] = -1
    moved = np.concatenate(surplus)
    free = capacity - np.bincount(labels[labels >= 0], minlength=k)
    labels[moved] = _greedy_fill(d, moved, free, prices)
    return labels
