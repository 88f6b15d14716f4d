"""The prefix router's residual fit: cbtm's (used columns only, scipy products) against the earlier torch.sparse
fit over every column, on features shaped like the router's own. Both are measured in the same run.

    python bench/router_fit.py                       # 1,532 / 6,000 / 16,000 prefixes (the demo's, a middle, MAX)
    python bench/router_fit.py --prefixes 4000 --k 20

Features: a dense block (a hybrid embedding of 484 dims plus the 14k distance and n-gram columns, random normal)
and the router's real hashed unigram + bigram features (`ensemble.prefix_ngrams.hashed_ngrams`, 2^16 columns) of
random token sequences whose lengths are drawn from the router's prefix lengths (8-256). Labels are random, so
L-BFGS runs its full 60 iterations as on hard real data. Prints the seconds (best of --repeats) to fit the
router's whole penalty grid (L2_GRID, three fits, as the router stage does) and the largest coefficient
difference between the two fits.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ensemble.prefix_ngrams import hashed_ngrams  # noqa: E402
from ensemble.prefix_router import CENTROID_T, L2_GRID, PREFIX_LENGTHS, fit_residual  # noqa: E402


def features(n: int, k: int, dim: int, vocab: int, seed: int = 0):
    """(x CSR float32 [n, dim + 14k + 2^16], labels int64 [n], d2_col) like `prefix_features` builds."""
    from scipy.sparse import csr_matrix, hstack

    rng = np.random.default_rng(seed)
    lengths = rng.choice(PREFIX_LENGTHS, size=n)
    ids = [rng.integers(0, vocab, size=int(m)).tolist() for m in lengths]
    dense = rng.normal(size=(n, dim + 14 * k)).astype(np.float32) * 0.1
    x = hstack([csr_matrix(dense), hashed_ngrams(ids)], format="csr").astype(np.float32)
    return x, rng.integers(0, k, size=n), dim


def fit_torch_sparse(x, y: np.ndarray, k: int, l2: float, d2_col: int, steps: int = 60):
    """The baseline: the same L-BFGS over every column, products by torch.sparse.mm (cbtm before 2026-12-03)."""
    import torch

    coo = x.tocoo()
    xt = torch.sparse_coo_tensor(np.vstack([coo.row, coo.col]), coo.data, coo.shape, dtype=torch.float32,
                                 check_invariants=False).coalesce()
    base = torch.zeros(x.shape[1], k)
    base[d2_col:d2_col + k] = torch.eye(k) / CENTROID_T
    w = torch.zeros(x.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    target = torch.as_tensor(y, dtype=torch.long)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = torch.sparse.mm(xt, base + w) + b
        loss = torch.nn.functional.cross_entropy(logits, target) + l2 * (w.pow(2).sum() + b.pow(2).sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    return (base + w).detach().numpy().T, b.detach().numpy()


def best_time(fn, repeats: int):
    best, out = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefixes", default="1532,6000,16000")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--dim", type=int, default=484)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    print(f"torch threads {torch.get_num_threads()}, k = {args.k}, dense dims {args.dim} + {14 * args.k}")
    print("\n| prefixes | non-zeros | used columns | torch.sparse, all columns (s) | cbtm (s) | speed-up "
          "| max coef diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in (int(v) for v in args.prefixes.split(",")):
        x, y, d2_col = features(n, args.k, args.dim, args.vocab)
        used = int((np.diff(x.tocsc().indptr) > 0).sum())
        t_old, old = best_time(lambda: [fit_torch_sparse(x, y, args.k, l2, d2_col) for l2 in L2_GRID], args.repeats)
        t_new, new = best_time(lambda: fit_residual(x, y, args.k, L2_GRID, d2_col), args.repeats)
        diff = max(np.abs(a[0] - b[0]).max() for a, b in zip(old, new))
        print(f"| {n:,} | {x.nnz:,} | {used:,} | {t_old:.2f} | {t_new:.2f} | {t_old / t_new:.1f}× | {diff:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
