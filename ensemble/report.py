"""`report.md` and its plots: what a person reads before trusting a run."""
from __future__ import annotations

import logging
from pathlib import Path

from cluster.kmeans import read_clusters
from cluster.report import plot_cluster_sizes
from ensemble.rundir import Manifest, RunDir, atomic_write_text
from experts.train import read_metrics

log = logging.getLogger(__name__)


def plot_loss_curves(run: RunDir, cluster_ids: list[int], path: Path) -> Path:
    """Training (solid) and validation (dots) loss against tokens seen, one colour per expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, cid in enumerate(cluster_ids):
        rows = read_metrics(run.expert_dir(cid))
        colour = f"C{i % 10}"
        ax.plot([r["tokens"] for r in rows], [r["train_loss"] for r in rows], color=colour, label=f"expert {cid}")
        val = [(r["tokens"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if val:
            ax.plot(*zip(*val), "o", color=colour, markersize=4)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Expert training: train (line), held-out (dots)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def write_report(run: RunDir, manifest: Manifest) -> Path:
    """Write ``report.md`` (clusters, experts, plots) into the run directory and return its path."""
    clusters = read_clusters(run.clusters_dir)["clusters"]
    ids = [c["cluster_id"] for c in clusters]
    plot_cluster_sizes(clusters, run.plots_dir / "cluster_sizes.png")
    plot_loss_curves(run, ids, run.plots_dir / "loss_curves.png")
    lines = [f"# cbtm run `{run.root.name}`", "",
             f"Embedder `{manifest.embedder}`, {len(clusters)} clusters, routing temperature "
             f"{manifest.temperature}, default top-k {manifest.top_k}.", "",
             "## Clusters", "", "![cluster sizes](plots/cluster_sizes.png)", "",
             "| cluster | train docs | held-out docs | distinctive words |", "|---:|---:|---:|---|"]
    lines += [f"| {c['cluster_id']} | {c['size_train']} | {c['size_heldout']} | {', '.join(c['keywords'])} |"
              for c in clusters]
    lines += ["", "Documents nearest each centroid:", ""]
    for c in clusters:
        lines.append(f"- **cluster {c['cluster_id']}**")
        lines += [f"  - {t[:200].replace(chr(10), ' ')}" for t in c["nearest"]]
    lines += ["", "## Experts", "", "![loss curves](plots/loss_curves.png)", "",
              "| cluster | path | steps | tokens | train loss | held-out loss | seconds |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for cid in ids:
        e = manifest.experts.get(str(cid), {})
        lines.append(f"| {cid} | `{e.get('path')}` | {e.get('steps')} | {e.get('tokens')} | "
                     f"{_fmt(e.get('train_loss'))} | {_fmt(e.get('val_loss'))} | {e.get('seconds')} |")
    atomic_write_text(run.report_path, "\n".join(lines) + "\n")
    return run.report_path
