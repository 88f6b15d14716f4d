"""Held-out perplexity of a run: the ensemble at several top-k, overall and per cluster."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ensemble.rundir import UserInputError, atomic_write_text

log = logging.getLogger(__name__)


def heldout_texts(ens, corpus: Path | None = None, text_field: str = "text") -> list[str]:
    """The run's held-out documents, or every document of another corpus file."""
    if corpus is None:
        from cluster.corpus import read_documents

        texts = read_documents(ens.run.corpus_path, split="heldout", columns=["text"]).column("text").to_pylist()
        if not texts:
            raise UserInputError(f"run {ens.run.root} has no held-out documents (corpus.heldout_fraction is 0): "
                                 "pass --corpus FILE to evaluate on another corpus")
        return texts
    from cluster.corpus import load_corpus

    ds = load_corpus(Path(corpus))
    if text_field not in ds.column_names:
        raise UserInputError(f"corpus {corpus} has no field {text_field!r}; its fields are {', '.join(ds.column_names)}")
    texts = [t.strip() for t in ds[text_field] if isinstance(t, str) and t.strip()]
    if not texts:
        raise UserInputError(f"corpus {corpus} has no non-empty {text_field!r} values")
    return texts


def evaluate_run(ens, texts: list[str], top_ks: list[int]) -> dict:
    """Perplexity per system ("top-K") overall and per cluster (each text's nearest cluster)."""
    nearest = [r[0][0] for r in ens.route(texts, top_k=1)]
    results = {"n_texts": len(texts), "systems": {}}
    for top_k in sorted(set(min(k, ens.n_experts) for k in top_ks)):
        logps = ens.score(texts, top_k=top_k)
        per_cluster = {}
        for cid in range(ens.n_clusters):
            parts = [lp for lp, c in zip(logps, nearest) if c == cid]
            if parts:
                flat = np.concatenate(parts)
                per_cluster[str(cid)] = {"perplexity": float(np.exp(-flat.mean())), "tokens": int(flat.size)}
        flat = np.concatenate(logps)
        name = "all experts" if top_k == ens.n_experts else f"top-{top_k}"
        results["systems"][name] = {"top_k": top_k, "perplexity": float(np.exp(-flat.mean())),
                                    "tokens": int(flat.size), "per_cluster": per_cluster}
        log.info("eval: %-12s perplexity %.2f over %d tokens", name, results["systems"][name]["perplexity"],
                 flat.size)
    return results


def write_results(run_root: Path, results: dict) -> Path:
    path = Path(run_root) / "eval" / "results.json"
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    return path


def plot_temperature(results: dict, path: Path) -> Path:
    """Held-out perplexity against the routing temperature (log x axis), the chosen T marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = results["grid"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["temperature"] for r in grid], [r["perplexity"] for r in grid], "o-")
    ax.axvline(results["best"], color="tab:red", linestyle="--", label=f"chosen T = {results['best']:g}")
    ax.set_xscale("log")
    ax.set_xlabel("routing temperature T")
    ax.set_ylabel(f"held-out perplexity (top-{results['top_k']})")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
