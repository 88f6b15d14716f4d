"""`report.md` and its plots: what a person reads before trusting a run."""
from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.parquet as pq

from cluster.kmeans import read_clusters
from cluster.report import clusters_markdown, write_cluster_plots
from experts.train import read_metrics
from flows.config import PipelineConfig
from ground.errors import UserInputError
from ground.files import atomic_write_text, read_json
from ground.plots import figure, save_figure
from ground.rundir import Manifest, RunDir

log = logging.getLogger(__name__)


def plot_loss_curves(run: RunDir, cluster_ids: list[int], path: Path) -> Path:
    """Training (solid) and validation (dots) loss against tokens seen, one colour per expert."""
    fig = figure(figsize=(6, 3.8))
    ax = fig.subplots()
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
    return save_figure(fig, path)


def label_field(cfg: PipelineConfig, run: RunDir) -> str | None:
    """The corpus column reports compare clusters with: corpus.label_field, else "label" or "domain"."""
    names = pq.read_schema(run.corpus_path).names
    if cfg.corpus.label_field:
        if cfg.corpus.label_field not in names:
            raise UserInputError(f"corpus has no label field {cfg.corpus.label_field!r}; its fields are "
                                 f"{', '.join(names)}: fix corpus.label_field")
        return cfg.corpus.label_field
    return next((name for name in ("label", "domain") if name in names), None)


def _routing(manifest: Manifest, key: str) -> str:
    entry = manifest.routing.get(key) or {}
    return f"{entry.get('value')} ({entry.get('source', 'config')})"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def write_report(run: RunDir, manifest: Manifest, label_field: str | None = None) -> Path:
    """Write ``report.md`` (clusters, experts, evaluation) and its plots into the run directory."""
    clusters = read_clusters(run.clusters_dir)["clusters"]
    ids = [c["cluster_id"] for c in clusters]
    write_cluster_plots(run.clusters_dir, run.corpus_path, run.embeddings_dir, run.plots_dir, label_field)
    plot_loss_curves(run, ids, run.plots_dir / "loss_curves.png")
    lines = [f"# cbtm run `{run.root.name}`", "",
             f"Embedder `{manifest.embedder}`, {len(clusters)} experts, route temperature "
             f"{_routing(manifest, 'route_temperature')}, default top-k {_routing(manifest, 'top_k')}, evidence "
             f"weight {manifest.config.get('ensemble', {}).get('evidence_weight', 0):g}. "
             f"Corpus `{manifest.config.get('corpus', {}).get('path')}`.", "",
             clusters_markdown(run.clusters_dir, "plots"), "", *_experts_section(run, manifest, ids),
             *_router_section(run), *_growth_section(manifest), *_evaluation_section(run, manifest),
             *_harness_section(run, manifest)]
    atomic_write_text(run.report_path, "\n".join(lines) + "\n")
    return run.report_path


def _experts_section(run: RunDir, manifest: Manifest, ids: list[int]) -> list[str]:
    lines = ["## Experts", "", "![loss curves](plots/loss_curves.png)", "",
             "| cluster | path | steps | tokens | train loss | held-out loss | seconds | loss curve |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    for cid in ids:
        e = manifest.experts.get(str(cid), {})
        curve = f"experts/{cid}/loss.png"
        link = f"[png]({curve})" if (run.root / curve).exists() else ""
        lines.append(f"| {cid} | `{e.get('path')}` | {e.get('steps')} | {e.get('tokens')} | "
                     f"{_fmt(e.get('train_loss'))} | {_fmt(e.get('val_loss'))} | {e.get('seconds')} | {link} |")
    return lines


def _router_section(run: RunDir) -> list[str]:
    """How often the prefix router picks a held-out document's own cluster from its first tokens."""
    path = run.router_dir / "settings.json"
    info = read_json(path) if path.exists() else {}
    agree, centroid = info.get("heldout_top1_agreement"), info.get("heldout_top1_agreement_centroid", {})
    if not agree:
        return []
    gate = dict(zip(map(str, info.get("prefix_lengths", [])), info.get("gate", [])))
    gate_row = ["| centroid share (the gate) | " + " | ".join(_fmt(gate.get(n)) for n in agree) + " |"] if gate else []
    return ["", "## Prefix router", "",
            f"Trained on {info.get('train_prefixes')} prefixes of training documents (n-gram model counted on "
            f"{info.get('ngram_documents', 'no')} documents), calibrated temperature {info['temperature']:.3f}. "
            "Top-1 agreement with each held-out document's own cluster, from its first tokens:", "",
            "| first tokens | " + " | ".join(agree) + " |", "|---|" + "---:|" * len(agree),
            "| prefix router | " + " | ".join(f"{v:.3f}" for v in agree.values()) + " |",
            "| centroid routing | " + " | ".join(_fmt(centroid.get(n)) for n in agree) + " |", *gate_row]


def _growth_section(manifest: Manifest) -> list[str]:
    """What `cbtm add` added and which experts `cbtm remove` took out of routing."""
    if not manifest.additions and not manifest.removed:
        return []
    lines = ["", "## Growth", ""]
    for i, a in enumerate(manifest.additions, 1):
        joined = ", ".join(f"{c}: +{n}" for c, n in a["joined"].items()) or "none"
        lines.append(f"{i}. `cbtm add` of `{a['corpus']}`: {a['documents']} new documents ({a['already_in_run']} "
                     f"already in the run); training documents joining clusters (within their "
                     f"{a['join_percentile']:g}th percentile of distances): {joined}; new clusters "
                     f"{', '.join(map(str, a['new_clusters'])) or 'none'}"
                     + (f"; continued experts {', '.join(map(str, a['continued']))}" if a["continued"] else "") + ".")
    if manifest.removed:
        lines += ["", f"Removed from routing (`cbtm restore` brings them back): "
                  f"{', '.join(map(str, manifest.removed))}."]
    return lines + [""]


def _harness_section(run: RunDir, manifest: Manifest) -> list[str]:
    if not run.harness_path.exists():
        return []
    result = read_json(run.harness_path)
    shots = "default" if result.get("num_fewshot") is None else result["num_fewshot"]
    return ["", "## lm-evaluation-harness", "", *earlier_state(result, manifest, f"cbtm eval {run.root} --tasks ..."),
            f"`cbtm eval --tasks` ({shots}-shot, limit {result.get('limit')}); "
            "details in `eval/harness.json`.", "", "![harness tasks](plots/harness.png)", "", *harness_table(result)]


def headline(task_results: dict) -> tuple[str, float] | None:
    """(metric, value) a task is reported by: acc for multiple choice, word_perplexity for rolling tasks."""
    for metric in ("acc,none", "word_perplexity,none", "exact_match,none"):
        if isinstance(task_results.get(metric), (int, float)):
            return metric.split(",")[0], float(task_results[metric])
    numbers = [(k, v) for k, v in task_results.items() if isinstance(v, (int, float)) and "stderr" not in k
               and "," in k]
    return (numbers[0][0].split(",")[0], float(numbers[0][1])) if numbers else None


def harness_table(result: dict) -> list[str]:
    """Markdown rows: one per system, one column per task (its headline metric)."""
    tasks = result["tasks"]
    heads = {}
    for system in result["systems"].values():
        for task in tasks:
            h = headline(system["results"].get(task, {}))
            if h:
                heads[task] = h[0]
    lines = ["| system | " + " | ".join(f"{t} ({heads.get(t, '?')})" for t in tasks) + " |",
             "|---|" + "---:|" * len(tasks)]
    for name, system in result["systems"].items():
        cells = [headline(system["results"].get(t, {})) for t in tasks]
        lines.append(f"| {name} | " + " | ".join("" if c is None else f"{c[1]:.4g}" for c in cells) + " |")
    return lines


def earlier_state(results: dict, manifest: Manifest, command: str) -> list[str]:
    """A warning line when ``results`` (results.json, harness.json) scored another state of the run than the
    manifest's: a rebuild, retrain, `cbtm add`, `cbtm remove` or a new temperature came after them."""
    if results.get("scored_state") in (None, manifest.scored_state()):  # None: written before 2026-12-07
        return []
    return [f"**These figures are of an earlier state of this run: its experts, clusters or routing changed "
            f"after they were measured. Run `{command}` again for current ones.**", ""]


def _evaluation_section(run: RunDir, manifest: Manifest) -> list[str]:
    path = run.eval_dir / "results.json"
    if not path.exists():
        return ["", "Held-out evaluation: run `cbtm eval` to add it here."]
    results = read_json(path)
    temperature = results.get("route_temperature", results.get("temperature"))
    gain = dense_gain(results)
    evidence = results.get("evidence_weight") or 0
    reweighed = (f", reweighted by each expert's log-probabilities of the tokens just before it (evidence weight "
                 f"{evidence:g}, decay {results.get('evidence_decay')})") if evidence else ""
    lines = ["", "## Held-out perplexity", "", *earlier_state(results, manifest, f"cbtm eval {run.root}"),
             f"Route temperature {temperature}; a token's weights "
             f"come from the text before it{reweighed}. \"expert i alone\": that expert on all held-out text, and "
             "on its own cluster's.", *_baselines_note(results), *([f"**{gain}**."] if gain else []), "",
             "![perplexity by system](plots/perplexity.png)",
             "![perplexity per cluster](plots/perplexity_per_cluster.png)", "",
             "| system | perplexity | tokens | on its own cluster |", "|---|---:|---:|---:|"]
    for name, r in results["systems"].items():
        own = r["per_cluster"].get(str(r.get("expert")), {}).get("perplexity")
        lines.append(f"| {name} | {r['perplexity']:.2f} | {r['tokens']} | {'' if own is None else f'{own:.2f}'} |")
    if results.get("clusters"):
        lines += ["", *_per_cluster_table(results)]
    if (run.plots_dir / "temperature.png").exists():
        lines += ["", "![perplexity by routing temperature](plots/temperature.png)"]
    return lines


def dense_gain(results: dict) -> str | None:
    """One line: the run's best ensemble system against the dense baseline, then its own top_k (from
    ``results["default_top_k"]``) when that scores worse than the best; None without a dense baseline."""
    ours = {n: r for n, r in results["systems"].items() if "baseline" not in r and r.get("expert") is None}
    dense = [r["perplexity"] for r in results["systems"].values() if r.get("baseline") == "dense"]
    if not ours or not dense:
        return None
    name = min(ours, key=lambda n: ours[n]["perplexity"])
    best, base = ours[name]["perplexity"], min(dense)
    # Every system losing means too few tokens per expert: Brown at the default budget lost at k = 6 and 2, won
    # at 4x the tokens (README, "Brown at its default budget").
    verdict = ("better than dense at the same total tokens" if best <= base else "worse than dense at the same "
               "total tokens: train on more tokens (--set train.total_tokens=N) or build fewer clusters")
    line = (f"Best ensemble ({name}) {best:.2f} vs dense {base:.2f}: {100 * (best - base) / base:+.1f}% perplexity "
            f"({verdict})")
    # The best system is often "all experts"; what query, serve and Ensemble.load run is the run's own top_k.
    served = next((n for n, r in ours.items() if r.get("top_k") == results.get("default_top_k")), None)
    # Compared as printed: a top-2 0.001 above top-1 would otherwise repeat the same figure as "worse".
    if served is None or round(ours[served]["perplexity"], 2) <= round(best, 2):
        return line
    ppl = ours[served]["perplexity"]
    # When the best system lost too, the advice is in the first part: a larger top-k cannot win.
    advice = ": pass a larger --top-k or build fewer clusters" if best <= base else ""
    verdict = "better than dense" if ppl <= base else f"worse than dense{advice}"
    return (f"{line}; the run's {served}, which query and serve use, {ppl:.2f}: "
            f"{100 * (ppl - base) / base:+.1f}% ({verdict})")


def budget_words(baseline: dict) -> str:
    """A baseline's training tokens in words: after the shared seed phase, and in all (results.json's entry)."""
    budget, seed = baseline["budget_tokens"], baseline.get("seed_tokens")
    if seed is None:  # results.json written before 2026-12-04 did not record the seed phase
        return f"{budget:,} training tokens besides any shared seed phase"
    if not seed:
        return f"{budget:,} training tokens in all"
    return f"{budget:,} training tokens after the shared seed phase of {seed:,} ({budget + seed:,} in all)"


def _baselines_note(results: dict) -> list[str]:
    notes = [f"`{kind}` ({b['n_experts']} expert(s), `{b['path']}`)"
             for kind, b in results.get("baselines", {}).items()]
    if not notes:
        return []
    budget = budget_words(next(iter(results["baselines"].values())))
    return [f"Baselines trained by the same code at the same total budget as the ensemble's experts, {budget}: "
            + ", ".join(notes) + "."]


def _per_cluster_table(results: dict) -> list[str]:
    """Perplexity per cluster (columns) of every system but the single experts (rows)."""
    systems = {n: r for n, r in results["systems"].items() if "expert" not in r}
    clusters = [str(c) for c in results["clusters"]]
    lines = ["Per cluster (held-out documents by nearest centroid):", "",
             "| system | " + " | ".join(clusters) + " |", "|---|" + "---:|" * len(clusters)]
    for name, r in systems.items():
        cells = [f"{r['per_cluster'][c]['perplexity']:.2f}" if c in r["per_cluster"] else "" for c in clusters]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
