"""Clustering at scale: spherical k-means fit + streaming assignment + balanced assignment, time and peak RSS.

    python bench/kmeans_scale.py                      # 1,000,000 x 384 random unit vectors, k = 64
    python bench/kmeans_scale.py --balance-only       # balanced-assignment methods at 100,000 x 16
    python bench/kmeans_scale.py --n 200000 --k 32    # smaller
    python bench/kmeans_scale.py --balance-only --balance-n 1000000 --balance-k 64   # balancing at 1M x 64

Part 1 times the stages the cluster stage runs (ClusterConfig defaults: sample 100,000, n_init 10, slack 0.1).
Part 2 compares the balanced-assignment methods on an uneven mixture (100,000 x 16 by default): the exact
auction + shortest paths (cluster.balance.balanced_assignment), greedy-by-regret, and optionally (--lp) the
LP optimum by scipy's HiGHS. "gap" is the distance to the optimum certified by balanced_assignment's dual
prices (or to the LP optimum with --lp).
Peak RSS is the process high-water mark after each stage (ru_maxrss), so it only grows down the table.
"""
from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.balance import assignment_cost, balanced_assignment, dual_bound, greedy_regret_assignment  # noqa: E402
from cluster.config import N_INIT  # noqa: E402
from cluster.kmeans import SphericalKMeans, balance_capacity  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def random_unit(n: int, d: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """float32 [n, d] uniformly random unit vectors, generated in chunks (no float64 copy of the whole)."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, d), np.float32)
    for start in range(0, n, chunk):
        part = rng.standard_normal((min(chunk, n - start), d), dtype=np.float32)
        x[start:start + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return x


def timed(rows: list, name: str, fn):
    start = time.perf_counter()
    out = fn()
    rows.append((name, time.perf_counter() - start, peak_rss_gb()))
    return out


def scale(n: int, d: int, k: int, sample: int, n_init: int, slack: float, seed: int) -> None:
    rows: list = []
    x = timed(rows, f"generate {n:,} x {d} random unit vectors (float32, {n * d * 4 / 1e9:.2f} GB)",
              lambda: random_unit(n, d, seed))
    model = SphericalKMeans(k, n_init=n_init, sample_size=sample, random_state=seed, compute_labels=False)
    timed(rows, f"fit k={k} on a {min(n, sample):,}-row sample", lambda: model.fit(x))
    labels, _ = timed(rows, "assign all rows (streaming, 65,536 per batch)", lambda: model.assign(x))
    dist = timed(rows, f"squared distances [n, k] for balancing ({n * k * 4 / 1e9:.2f} GB)", lambda: model.transform(x))
    x = None  # free the vectors before balancing (the lambdas above ran already)
    cap = balance_capacity(n, k, slack)
    bal, prices = timed(rows, f"balanced assignment (capacity {cap:,})",
                        lambda: balanced_assignment(dist, cap, return_prices=True))
    greedy = timed(rows, "greedy-by-regret (for comparison)", lambda: greedy_regret_assignment(dist, cap))
    print(f"\n{n:,} x {d}, k = {k}, seed {seed}\n")
    print("| stage | seconds | peak RSS so far (GB) |\n|---|---:|---:|")
    for name, sec, rss in rows:
        print(f"| {name} | {sec:.2f} | {rss:.2f} |")
    sizes = np.bincount(labels, minlength=k)
    print(f"\nnearest-centroid cluster sizes: min {sizes.min():,}, max {sizes.max():,} (capacity {cap:,})")
    quality(dist, labels, {"balanced_assignment": bal, "greedy-by-regret": greedy}, cap, prices)


def quality(d: np.ndarray, nearest: np.ndarray, results: dict, cap: int, prices: np.ndarray,
            times: dict | None = None, optimum: float | None = None) -> None:
    base = assignment_cost(d, nearest)
    bound = optimum if optimum is not None else dual_bound(d, prices - prices.min(), cap)
    print("\n| method | seconds | mean sq. distance | vs. unconstrained | max load / capacity | gap to optimum |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| unconstrained (nearest centroid) | | {base / len(d):.5f} | | "
          f"{np.bincount(nearest).max():,} / {cap:,} | |")
    for name, labels in results.items():
        cost = assignment_cost(d, labels)
        sec = f"{times[name]:.2f}" if times else ""
        print(f"| {name} | {sec} | {cost / len(d):.5f} | +{(cost / base - 1) * 100:.3f}% | "
              f"{np.bincount(labels).max():,} / {cap:,} | {max(cost - bound, 0) / bound:.1e} |")


def uneven_mixture(n: int, d: int, k: int, seed: int) -> np.ndarray:
    """Unit vectors around k random directions with Dirichlet(2) weights: natural clusters of uneven size."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[rng.choice(k, n, p=rng.dirichlet(np.full(k, 2.0)))] * 0.5
    x += rng.standard_normal((n, d), dtype=np.float32) / math.sqrt(d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def lp_optimum(d: np.ndarray, cap: int) -> float:
    """Exact optimum of the transportation LP by scipy's HiGHS (integral: totally unimodular constraints)."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    n, k = d.shape
    cols = np.arange(n * k)
    a_eq = coo_matrix((np.ones(n * k), (cols // k, cols)), shape=(n, n * k)).tocsr()
    a_ub = coo_matrix((np.ones(n * k), (cols % k, cols)), shape=(k, n * k)).tocsr()
    res = linprog(d.ravel().astype(np.float64), A_ub=a_ub, b_ub=np.full(k, cap), A_eq=a_eq, b_eq=np.ones(n),
                  bounds=(0, None), method="highs")
    return float(res.fun)


def balance_methods(n: int, d: int, k: int, slack: float, seed: int, lp: bool) -> None:
    x = uneven_mixture(n, d, k, seed)
    dist = SphericalKMeans(k, n_init=1, random_state=seed, compute_labels=False).fit(x).transform(x)
    del x
    cap = balance_capacity(n, k, slack)
    times, results = {}, {}
    for name, fn in (("balanced_assignment", lambda: balanced_assignment(dist, cap, return_prices=True)),
                     ("greedy-by-regret", lambda: greedy_regret_assignment(dist, cap))):
        start = time.perf_counter()
        results[name] = fn()
        times[name] = time.perf_counter() - start
    results["balanced_assignment"], prices = results["balanced_assignment"]
    optimum = None
    if lp:
        start = time.perf_counter()
        optimum = lp_optimum(dist, cap)
        print(f"exact LP (scipy HiGHS): {time.perf_counter() - start:.1f} s, mean sq. distance {optimum / n:.5f}")
    print(f"\nbalanced assignment, uneven mixture {n:,} x {d}, k = {k}, capacity {cap:,} (slack {slack})")
    quality(dist, dist.argmin(1), results, cap, prices, times, optimum)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--sample", type=int, default=100_000)
    p.add_argument("--n-init", type=int, default=N_INIT)
    p.add_argument("--slack", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--balance-only", action="store_true", help="only part 2 (balanced-assignment methods)")
    p.add_argument("--balance-n", type=int, default=100_000)
    p.add_argument("--balance-k", type=int, default=16)
    p.add_argument("--lp", action="store_true", help="also solve part 2 exactly with scipy HiGHS (slow)")
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS/OpenMP threads (default: all); 1 is faster when other jobs share the cores")
    args = p.parse_args(argv)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(args.threads):
        if not args.balance_only:
            scale(args.n, args.d, args.k, args.sample, args.n_init, args.slack, args.seed)
        balance_methods(args.balance_n, args.d, args.balance_k, args.slack, args.seed, args.lp)


if __name__ == "__main__":
    main()
