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


def evaluate_run(ens, texts: list[str], top_ks: list[int]) -> dict:
    """Perplexity of the ensemble at each top-k and of each expert alone, overall and per cluster.

    Every expert runs once over every text; each system is then a different mixture of the same
    per-token probabilities (routing from preceding context, see `ensemble.scoring`).
    """
    from ensemble.scoring import WindowRouting, experts_logprobs, mix

    nearest = [r[0][0] for r in ens.route(texts, top_k=1)]
    encoded = [ens.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    routing = WindowRouting(ens, encoded)
    per_text = experts_logprobs(ens, encoded, routing.matrices(ens.n_experts, ens.temperature))
    results = {"n_texts": len(texts), "temperature": ens.temperature, "systems": {}}
    for top_k in sorted(set(min(k, ens.n_experts) for k in top_ks)):
        logps = mix(routing.matrices(top_k, ens.temperature), per_text)
        name = "all experts" if top_k == ens.n_experts else f"top-{top_k}"
        results["systems"][name] = _system(logps, nearest, ens.n_clusters, top_k=top_k)
        log.info("eval: %-12s perplexity %.2f", name, results["systems"][name]["perplexity"])
    for expert in ens.active.tolist():
        results["systems"][f"expert {expert} alone"] = _system([lp[expert] for lp in per_text], nearest,
                                                               ens.n_clusters, expert=expert)
    return results


def plot_results(results: dict, path: Path) -> Path:
    """Bars: held-out perplexity of every system, overall and on each expert's own cluster."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["systems"])
    values = [results["systems"][n]["perplexity"] for n in names]
    own = [results["systems"][n]["per_cluster"].get(str(results["systems"][n].get("expert")), {}).get("perplexity")
           for n in names]
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(names) + 2), 3.6))
    x = np.arange(len(names))
    ax.bar(x - 0.2, values, 0.4, label="all held-out text")
    ax.bar(x + 0.2, [v or 0 for v in own], 0.4, label="the expert's own cluster")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title("Held-out perplexity by system")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
