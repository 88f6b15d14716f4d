"""`cbtm eval --tasks`: lm-evaluation-harness tasks for every system of a run (Prefect flow `harness`).

Systems: the run's ensemble at each top-k (default 1, 2 and all experts) and, when asked, the equal-budget
baselines of `cbtm eval --baselines` (trained, or reused from RUN/baselines). Each is an `ensemble.harness.CbtmLM`
scored by `lm_eval.simple_evaluate` on the same tasks; the results objects go to ``eval/harness.json``, a table
and a plot to report.md.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from prefect import flow

from ensemble import Ensemble
from flows.baselines import finished_parent, parse_baselines, plan_baseline
from flows.config import PipelineConfig
from flows.evaluation import train_baseline
from flows.report import headline, label_field, write_report
from ground.errors import UserInputError
from ground.files import atomic_write_text
from ground.plots import figure, save_figure
from ground.rundir import RunDir

log = logging.getLogger("cbtm")
KEPT = ("results", "versions", "n-shot", "higher_is_better", "n-samples", "configs")


def require_harness():
    """The lm_eval package, or UserInputError saying how to install it."""
    try:
        import lm_eval
    except ImportError as exc:
        raise UserInputError("--tasks needs lm-evaluation-harness, which is not installed: "
                             "pip install -e '.[eval]' (or pip install lm-eval)") from exc
    return lm_eval


def check_tasks(tasks: list[str], include_path: str | None):
    """A TaskManager that knows every name of ``tasks`` (built-in or from ``include_path``), else UserInputError."""
    if include_path is not None and not Path(include_path).is_dir():
        raise UserInputError(f"--include-path {include_path} is not a directory of task YAMLs")
    manager = _task_manager(include_path, Path(include_path).stat().st_mtime_ns if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserInputError(f"lm-eval knows no task {unknown[0]!r}: name a built-in task or pass --include-path DIR "
                             "with its YAML (bench/harness_data.py writes cbtm's offline tasks)")
    return manager


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, mtime_ns: int | None):
    """lm-eval's index of its built-in tasks and ``include_path``'s, built once per process: it reads some
    14,000 YAML files (seconds), and `cbtm eval --tasks` needs it before training baselines and again to score.
    ``mtime_ns`` (the directory's) is part of the key, so a file added to or removed from the directory is seen
    (a YAML edited in place, by a long-lived process, is not)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def systems(ens: Ensemble, top_ks: list[int] | None) -> dict[str, int]:
    """{system name: top_k} of a run, as `cbtm eval` names them."""
    ks = sorted({min(k, ens.n_experts) for k in (top_ks or (1, 2, ens.n_experts))})
    bad = [k for k in (top_ks or []) if not 1 <= k <= ens.n_experts]
    if bad:
        raise UserInputError(f"--top-k {bad[0]} is out of range: this run has {ens.n_experts} experts")
    return {("all experts" if k == ens.n_experts else f"top-{k}"): k for k in ks}


def evaluate_system(ens: Ensemble, top_k: int, tasks: list[str], manager, num_fewshot: int | None,
                    limit: int | None) -> dict:
    """lm-eval's results object (the JSON-able parts) of one system."""
    import lm_eval

    from ensemble.harness import CbtmLM

    out = lm_eval.simple_evaluate(model=CbtmLM(ensemble=ens, top_k=top_k), tasks=tasks, num_fewshot=num_fewshot,
                                  limit=limit, task_manager=manager, log_samples=False, bootstrap_iters=0)
    return json.loads(json.dumps({k: out[k] for k in KEPT if k in out}, default=str))


@flow(name="harness", log_prints=False, validate_parameters=False)
def harness(run_dir: str, tasks: list[str], include_path: str | None = None, num_fewshot: int | None = None,
            limit: int | None = None, baselines: list[str] | None = None, top_ks: list[int] | None = None,
            runner: str = "thread") -> dict:
    """Run the harness ``tasks`` for every system of the run (and its ``baselines``); write eval/harness.json,
    plots/harness.png and the report's harness section. Returns what harness.json holds."""
    baselines = parse_baselines(baselines)
    run = RunDir(run_dir)
    finished_parent(run)
    require_harness()
    manager = check_tasks(tasks, include_path)
    with run.writing("eval --tasks"):
        ens = Ensemble.load(run.root)
        found = {name: (ens, k) for name, k in systems(ens, top_ks).items()}
        for kind in baselines:
            base = Ensemble.load(train_baseline(plan_baseline(run, kind), runner).root)
            for name, k in systems(base, None).items():
                found[kind if base.n_experts == 1 else f"{kind} {name}"] = (base, k)
        result = {"tasks": tasks, "num_fewshot": num_fewshot, "limit": limit,
                  "scored_state": ens.manifest.scored_state(), "systems": {}}
        for name, (system, k) in found.items():
            log.info("harness: %s (top-%d of %d experts)", name, k, system.n_experts)
            scored = evaluate_system(system, k, tasks, manager, num_fewshot, limit)
            result["systems"][name] = {"top_k": k, "run": str(system.run.root), **scored}
        atomic_write_text(run.harness_path, json.dumps(result, indent=2) + "\n")
        plot_harness(result, run.plots_dir / "harness.png")
        write_report(run, run.read_manifest(), label_field(PipelineConfig.from_dict(ens.manifest.config), run))
    return result


def plot_harness(result: dict, path: Path) -> Path:
    """One panel per task: every system's headline metric."""
    tasks = result["tasks"]
    names = list(result["systems"])
    fig = figure(figsize=(max(4.5, 3.2 * len(tasks)), 3.4))
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        values = [headline(result["systems"][n]["results"].get(task, {})) for n in names]
        ax.bar(range(len(names)), [v[1] if v else 0 for v in values], color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(task, fontsize=9)
        metric = next((v[0] for v in values if v), "")
        ax.set_ylabel(metric)
        if "perplexity" in metric and all(v and v[1] > 0 for v in values):
            ax.set_yscale("log")  # random clusters can be 100x worse: a linear axis would flatten the rest
    return save_figure(fig, path)
