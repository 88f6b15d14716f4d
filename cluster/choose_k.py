"""Choosing the number of clusters: fit each candidate k on the same sample, report inertia and silhouette."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from cluster.corpus import read_documents
from cluster.embed import load_embeddings
from cluster.kmeans import SphericalKMeans, check_rows, normalize_rows
from ground.errors import UserInputError
from ground.files import atomic_write_text
from ground.plots import figure, save_figure

log = logging.getLogger(__name__)

SILHOUETTE_SAMPLE = 5_000  # documents the silhouette is computed on (it is quadratic in this number)


def check_ks(ks: list[int], n_docs: int, sample_size: int) -> list[int]:
    """Validated, de-duplicated, sorted candidate ks; UserInputError (one line) for a bad one."""
    if not ks:
        raise UserInputError("no candidate number of clusters given: pass e.g. --k 2,4,8,16")
    for k in ks:
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise UserInputError(f"every candidate k must be an integer >= 1, got {k}: fix --k")
        if k > n_docs:
            raise UserInputError(f"k={k} is larger than the {n_docs} training documents: drop it from --k")
        if k > sample_size:
            raise UserInputError(f"k={k} is larger than the sample size {sample_size}: raise cluster.sample_size")
    return sorted({int(k) for k in ks})


def score_ks(x: np.ndarray, ks: list[int], sample_size: int = 100_000, seed: int = 0, n_init: int = 4,
             silhouette_size: int = SILHOUETTE_SAMPLE) -> list[dict]:
    """Fit spherical k-means for every k on one seeded sample of x [n, d]; one dict per k.

    Each dict: k, inertia (mean squared distance of the sample to its centroid, float), silhouette (sklearn
    silhouette_score on at most ``silhouette_size`` sampled rows, euclidean on unit vectors; None where it is
    undefined: k = 1 or k >= the sample size), sizes (documents per cluster in the sample), seconds.
    """
    from sklearn.metrics import silhouette_score

    ks = check_ks(ks, len(x), sample_size)
    check_rows(x)
    rng = np.random.default_rng(seed)
    rows = np.arange(len(x)) if len(x) <= sample_size else np.sort(rng.choice(len(x), sample_size, replace=False))
    sample = normalize_rows(x[rows])
    results = []
    for k in ks:
        start = time.perf_counter()
        model = SphericalKMeans(k, n_init=n_init, sample_size=len(sample), random_state=seed).fit(sample)
        labels = model.labels_
        n_found = len(np.unique(labels))
        silhouette = None
        if 2 <= n_found < len(sample):
            silhouette = float(silhouette_score(sample, labels, sample_size=min(silhouette_size, len(sample)),
                                                random_state=seed))
        results.append({"k": k, "inertia": model.inertia_, "silhouette": silhouette,
                        "sizes": np.bincount(labels, minlength=k).tolist(),
                        "seconds": round(time.perf_counter() - start, 3)})
        log.info("choose-k: k=%d inertia %.4f silhouette %s", k, model.inertia_,
                 "n/a" if silhouette is None else f"{silhouette:.4f}")
    return results


def best_k(results: list[dict]) -> int:
    """The k with the highest silhouette (the smallest such k on ties); the smallest k if none is defined."""
    scored = [r for r in results if r["silhouette"] is not None]
    if not scored:
        return min(r["k"] for r in results)
    return max(scored, key=lambda r: (r["silhouette"], -r["k"]))["k"]


def edge_warning(results: list[dict], best: int) -> str | None:
    """A line for a best k that is the largest candidate (silhouette may still be rising), else None."""
    largest = max(r["k"] for r in results)
    if best != largest or len(results) < 2:
        return None
    return (f"the best silhouette is at k={best}, the largest candidate: it may still rise beyond; silhouette "
            "favours many small clusters on text, so consider --clusters K near the number of domains you expect "
            "(README: Choosing k)")


def plot_choose_k(results: list[dict], path: Path, best: int | None = None) -> Path:
    """Inertia (left axis) and silhouette (right axis) against k (log2 axis); the chosen k marked. PNG."""
    ks = [r["k"] for r in results]
    fig = figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
    ax.plot(ks, [r["inertia"] for r in results], "o-", color="tab:blue")
    ax.set_xlabel("k (number of clusters)")
    ax.set_ylabel("inertia (mean squared distance)", color="tab:blue")
    if len(set(ks)) > 1 and min(ks) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    right = ax.twinx()
    scored = [(r["k"], r["silhouette"]) for r in results if r["silhouette"] is not None]
    if scored:
        right.plot(*zip(*scored), "s--", color="tab:orange")
    right.set_ylabel("silhouette (sampled)", color="tab:orange")
    if best is not None:
        ax.axvline(best, color="grey", linestyle=":", linewidth=1)
    ax.set_title("Choosing k" + (f" (best silhouette: k={best})" if best is not None else ""))
    return save_figure(fig, path)


def choose_k(embeddings_dir: Path, corpus_path: Path, ks: list[int], sample_size: int, seed: int,
             out_dir: Path, n_init: int = 4, silhouette_size: int = SILHOUETTE_SAMPLE) -> dict:
    """Score every k in ``ks`` on a seeded sample of the training split; write choose_k.json and choose_k.png.

    Returns {"results": [{k, inertia, silhouette, sizes, seconds}, ...], "best_k": int, "n_docs": int,
    "sample_size": int}. UserInputError for k < 1, a k above the number of training documents or the sample size.
    """
    ids, vectors = load_embeddings(Path(embeddings_dir))
    docs = read_documents(Path(corpus_path), columns=["id", "split"])
    if docs.column("id").to_pylist() != ids:
        raise UserInputError("embeddings do not match the corpus: re-run the embed stage (cbtm run --force embed)")
    train = np.array(docs.column("split").to_pylist()) == "train"
    x = vectors if train.all() else vectors[train]
    results = score_ks(x, ks, sample_size, seed, n_init, silhouette_size)
    best = best_k(results)
    out = {"results": results, "best_k": best, "n_docs": int(len(x)), "sample_size": int(min(len(x), sample_size))}
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "choose_k.json", json.dumps(out, indent=2))
    plot_choose_k(results, out_dir / "choose_k.png", best)
    return out
