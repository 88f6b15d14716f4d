"""Held-out perplexity of a run: the ensemble at several top-k, overall and per cluster."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from cluster.corpus import load_corpus, read_documents
from ensemble.scoring import mix
from ground.errors import UserInputError
from ground.files import atomic_write_text
from ground.plots import figure, save_figure
from ground.progress import ProgressCallback

log = logging.getLogger(__name__)


def heldout_texts(ens, corpus: Path | None = None, text_field: str = "text") -> list[str]:
    """The run's held-out documents, or every document of another corpus (of a directory whose files name
    splits, its test split: `cluster.splits`)."""
    if corpus is None:
        texts = read_documents(ens.run.corpus_path, split="heldout", columns=["text"]).column("text").to_pylist()
        if not texts:
            raise UserInputError(f"run {ens.run.root} has no held-out documents (corpus.heldout_fraction is 0): "
                                 "pass --corpus FILE to evaluate on another corpus")
        return texts
    ds = load_corpus(Path(corpus), split="test")
    if text_field not in ds.column_names:
        raise UserInputError(f"corpus {corpus} has no field {text_field!r} (the run's text field); its fields are "
                             f"{', '.join(ds.column_names)}: pass --text-field NAME")
    texts = [t.strip() for t in ds[text_field] if isinstance(t, str) and t.strip()]
    if not texts:
        raise UserInputError(f"corpus {corpus} has no non-empty {text_field!r} values")
    return texts


def _system(logps: list[np.ndarray], nearest: list[int], n_clusters: int, **extra) -> dict:
    """Overall and per-cluster (each text's nearest cluster) perplexity of per-token log-probabilities."""
    per_cluster = {}
    for cid in range(n_clusters):
        parts = [lp for lp, c in zip(logps, nearest) if c == cid]
        if parts:
            flat = np.concatenate(parts)
            per_cluster[str(cid)] = {"perplexity": float(np.exp(-flat.mean())), "tokens": int(flat.size)}
    flat = np.concatenate(logps)
    return {**extra, "perplexity": float(np.exp(-flat.mean())), "tokens": int(flat.size), "per_cluster": per_cluster}


def evaluate_run(ens, texts: list[str], top_ks: list[int], nearest: list[int] | None = None,
                 n_clusters: int | None = None, prefix: str = "", experts_alone: bool = True,
                 routing_vectors: np.ndarray | None = None) -> dict:
    """Perplexity of the ensemble at each top-k and of each expert alone, overall and per cluster.

    Every expert runs once over every text; each system is then a different mixture of the same
    per-token probabilities (routing from preceding context, see `ensemble.scoring`). ``nearest`` and
    ``n_clusters`` (default: this run's) define the per-cluster breakdown, so that a baseline is reported
    on the clusters of the run it is compared with; ``prefix`` names its systems ("dense ", "random ").
    ``results["routing_vectors"]`` (not JSON: pop it) can be passed to the next call over the same texts.
    """
    if nearest is None:
        nearest, n_clusters = [r[0][0] for r in ens.route(texts, top_k=1)], ens.n_clusters
    bar = ProgressCallback(f"{prefix or 'eval '}routing windows", unit="window")
    plan = ens.scoring(texts, vectors=routing_vectors, on_progress=bar)
    bar.close()
    temperature = ens.route_temperature
    per_text = plan.logprobs(plan.weights(ens.n_experts, temperature))
    results = {"n_texts": len(texts), "route_temperature": temperature, "evidence_weight": ens.evidence.weight,
               "evidence_decay": ens.evidence.decay, "systems": {}, "routing_vectors": plan.vectors}
    for top_k in sorted(set(min(k, ens.n_experts) for k in top_ks)):
        weights = plan.weights(top_k, temperature)
        name = prefix + ("all experts" if top_k == ens.n_experts else f"top-{top_k}")
        if ens.n_experts == 1:
            name = prefix.strip() or "the only expert"
        results["systems"][name] = _system(mix(weights, per_text, ens.evidence), nearest, n_clusters, top_k=top_k)
        log.info("eval: %-20s perplexity %.2f", name, results["systems"][name]["perplexity"])
    for expert in ens.active.tolist() if experts_alone else []:
        results["systems"][f"expert {expert} alone"] = _system([lp[expert] for lp in per_text], nearest,
                                                               n_clusters, expert=expert)
    return results


def plot_results(results: dict, path: Path) -> Path:
    """Bars: held-out perplexity of every system, overall and on each expert's own cluster."""
    names = list(results["systems"])
    values = [results["systems"][n]["perplexity"] for n in names]
    own = [results["systems"][n]["per_cluster"].get(str(results["systems"][n].get("expert")), {}).get("perplexity")
           for n in names]
    fig = figure(figsize=(max(5, 0.8 * len(names) + 2), 3.6))
    ax = fig.subplots()
    x = np.arange(len(names))
    ax.bar(x - 0.2, values, 0.4, label="all held-out text")
    ax.bar(x + 0.2, [v or 0 for v in own], 0.4, label="the expert's own cluster")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title("Held-out perplexity by system")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_per_cluster(results: dict, path: Path) -> Path:
    """Held-out perplexity on each cluster's documents, one line per system (experts alone left out)."""
    systems = {n: r for n, r in results["systems"].items() if "expert" not in r}
    clusters = sorted({int(c) for r in systems.values() for c in r["per_cluster"]})
    fig = figure(figsize=(max(5, 0.45 * len(clusters) + 3), 3.6))
    ax = fig.subplots()
    for i, (name, r) in enumerate(systems.items()):
        ys = [r["per_cluster"].get(str(c), {}).get("perplexity", np.nan) for c in clusters]
        ax.plot(clusters, ys, "o-" if i < 10 else "s--", label=name, markersize=4)
    ax.set_xticks(clusters)
    ax.set_xlabel("cluster (each held-out document's nearest centroid)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title("Held-out perplexity per cluster")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def write_results(path: Path, results: dict) -> Path:
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    return path


def tune_temperature(ens, texts: list[str], grid: list[float], top_k: int) -> dict:
    """Held-out perplexity for every routing temperature in ``grid``; the experts run once (the top-k set is the
    same for every T, only the weights change). Returns {"top_k", "grid": [{route_temperature, perplexity}],
    "best": T}."""
    bar = ProgressCallback("tune: routing windows", unit="window")
    plan = ens.scoring(texts, on_progress=bar)
    bar.close()
    per_text = plan.logprobs(plan.weights(top_k, grid[0]))
    rows = []
    for temperature in grid:
        flat = np.concatenate(mix(plan.weights(top_k, temperature), per_text, ens.evidence))
        rows.append({"route_temperature": float(temperature), "perplexity": float(np.exp(-flat.mean()))})
    best = min(rows, key=lambda r: r["perplexity"])["route_temperature"]
    return {"top_k": top_k, "grid": rows, "best": best}


def keep_unless_gain(results: dict, current: float, min_gain: float) -> list[float]:
    """Set ``results["best"]`` (of `tune_temperature`) to the T nearest ``current`` (log scale) among those whose
    perplexity is within ``min_gain`` of the lowest: where T changes next to nothing (a confident router, top-1)
    the run keeps its temperature rather than taking the grid's lowest by noise. Returns those T."""
    lowest = min(row["perplexity"] for row in results["grid"])
    close = [row["route_temperature"] for row in results["grid"] if row["perplexity"] <= lowest * (1 + min_gain)]
    results["best"] = min(close, key=lambda t: abs(math.log(t / current)))
    return close


def plot_temperature(results: dict, path: Path) -> Path:
    """Held-out perplexity against the routing temperature (log x axis), the chosen T marked."""
    grid = results["grid"]
    fig = figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.plot([r["route_temperature"] for r in grid], [r["perplexity"] for r in grid], "o-")
    ax.axvline(results["best"], color="tab:red", linestyle="--", label=f"chosen T = {results['best']:g}")
    ax.set_xscale("log")
    ax.set_xlabel("routing temperature T")
    ax.set_ylabel(f"held-out perplexity (top-{results['top_k']})")
    ax.legend()
    return save_figure(fig, path)
