"""Prefect flow `evaluate`: held-out perplexity of a run, and of baselines trained at the same budget."""
from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from ensemble import Ensemble
from flows.baselines import (
    DerivedPlan,
    finish_derived,
    finished_parent,
    parse_baselines,
    plan_baseline,
    record_derived_expert,
)
from flows.config import PipelineConfig
from flows.evaluate import evaluate_run, heldout_texts, plot_per_cluster, plot_results, write_results
from flows.report import label_field, write_report
from flows.training import run_expert_tasks
from ground.errors import UserInputError
from ground.rundir import RunDir

log = logging.getLogger("cbtm")


def train_baseline(plan: DerivedPlan, runner: str) -> RunDir:
    """One Prefect task per baseline expert still to train, each recorded as it finishes; then finish the run."""
    run_expert_tasks({cid: plan.train_kwargs(cid) for cid in plan.todo}, runner, plan.train.device,
                     plan.train.retries, lambda cid, summary: record_derived_expert(plan, cid, summary),
                     f"baseline experts of {plan.run.root}")
    return finish_derived(plan)


def _score_baselines(run: RunDir, baselines: list[str], texts: list[str], top_ks: list[int], results: dict,
                     nearest: list[int], runner: str) -> None:
    """Train (or reuse) each baseline and add its systems to ``results`` (per cluster of ``run``)."""
    vectors = results.pop("routing_vectors")
    for kind in baselines:
        plan = plan_baseline(run, kind)
        base = Ensemble.load(train_baseline(plan, runner).root)
        scored = task(evaluate_run, name=f"score-{kind}", cache_policy=NO_CACHE)(
            base, texts, top_ks, nearest, len(results["clusters"]), prefix=f"{kind} ", experts_alone=False,
            routing_vectors=vectors)
        scored.pop("routing_vectors")
        for system in scored["systems"].values():
            system.update(baseline=kind, budget_tokens=plan.train.total_tokens)
        results["systems"].update(scored["systems"])
        results["baselines"][kind] = {"path": plan.run.root.relative_to(run.root).as_posix(),
                                      "n_experts": base.n_experts, "budget_tokens": plan.train.total_tokens,
                                      "seed_tokens": plan.seed_tokens}


@flow(name="evaluate", log_prints=False, validate_parameters=False)
def evaluate(run_dir: str, top_ks: list[int] | None = None, corpus: str | None = None, text_field: str | None = None,
             limit: int | None = None, baselines: list[str] | None = None, runner: str = "thread") -> dict:
    """Held-out perplexity of the ensemble at each top-k (default 1, 2, 4 and all experts) and of each expert
    alone, overall and per cluster; ``baselines`` ("dense", "random") are trained at the run's token budget
    (cached under RUN/baselines) and scored on the same texts. Writes eval/results.json, two plots and the
    table in report.md."""
    baselines = parse_baselines(baselines)
    run = RunDir(run_dir)
    finished_parent(run)  # names untrained experts before anything is loaded or scored
    with run.writing("eval"):
        return _evaluate(run, top_ks, corpus, text_field, limit, baselines, runner)


def _evaluate(run: RunDir, top_ks, corpus, text_field, limit, baselines, runner) -> dict:
    ens = Ensemble.load(run.root)
    cfg = PipelineConfig.from_dict(ens.manifest.config)
    top_ks = top_ks or sorted({min(k, ens.n_experts) for k in (1, 2, 4, ens.n_experts)})
    bad = [k for k in top_ks if not 1 <= k <= ens.n_experts]
    if bad:
        raise UserInputError(f"--top-k {bad[0]} is out of range: this run has {ens.n_experts} experts")
    texts = heldout_texts(ens, Path(corpus) if corpus else None, text_field or cfg.corpus.text_field)[:limit]
    results = task(evaluate_run, name="score", cache_policy=NO_CACHE)(ens, texts, top_ks)
    results.update(clusters=list(range(ens.n_clusters)), baselines={}, default_top_k=ens.top_k,
                   scored_state=ens.manifest.scored_state())
    if baselines:
        nearest = [r[0][0] for r in ens.route(texts, top_k=1)]
        _score_baselines(run, baselines, texts, top_ks, results, nearest, runner)
    results.pop("routing_vectors", None)
    write_results(run.results_path, results)
    plot_results(results, run.plots_dir / "perplexity.png")
    plot_per_cluster(results, run.plots_dir / "perplexity_per_cluster.png")
    write_report(run, run.read_manifest(), label_field(cfg, run))
    create_table_artifact(key="cbtm-evaluation", description=f"held-out perplexity of {run.root}",
                          table=[{"system": name, "perplexity": round(r["perplexity"], 3), "tokens": r["tokens"]}
                                 for name, r in results["systems"].items()])
    return results
