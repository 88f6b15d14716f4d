"""`cbtm run | retrain | eval | clusters`: the commands that run Prefect flows or pipeline stages."""
from __future__ import annotations

import logging
import shlex
import shutil
from pathlib import Path

from cluster.choose_k import choose_k, edge_warning
from cluster.corpus import check_corpus
from flows.api_server import api_server
from flows.baselines import parse_baselines
from flows.cli_args import AUTO_K
from flows.config import PipelineConfig
from flows.evaluation import evaluate
from flows.harness_eval import check_tasks, harness, require_harness
from flows.pipeline import build, retrain
from flows.report import budget_words, dense_gain, harness_table
from flows.runners import task_runner
from flows.training import default_corpus
from ground.device import resolve_device
from ground.errors import UserInputError
from ground.rundir import RunDir

log = logging.getLogger("cbtm")


def pipeline_config(args) -> PipelineConfig:
    """The run's config from --config (or the run's own), the flags and --set, every value checked (before any
    work starts)."""
    cfg = base_config(args)
    overrides = list(args.overrides)
    if args.corpus:
        overrides.append(f"corpus.path={toml_str(args.corpus)}")
    if args.text_field:
        overrides.append(f"corpus.text_field={toml_str(args.text_field)}")
    if args.clusters == "auto":
        overrides.append(f"cluster.auto_k={AUTO_K}")
    elif args.clusters is not None:
        if not args.clusters.lstrip("-").isdigit():
            raise UserInputError(f"--clusters {args.clusters!r} must be a whole number or auto")
        overrides.append(f"cluster.n_clusters={int(args.clusters)}")
    cfg = cfg.with_overrides(overrides)
    if not cfg.corpus.path.startswith("hf:"):
        corpus = Path(cfg.corpus.path)
        if not args.corpus and str(corpus) == "data/demo" and not corpus.exists():
            corpus = default_corpus()  # run from outside the checkout: use the shipped demo corpus
        if not corpus.exists():
            raise UserInputError(f"corpus {corpus} does not exist: pass --corpus with a JSONL, Parquet or CSV file, "
                                 "a directory of them, or hf:NAME")
        cfg.corpus.path = str(corpus.resolve())
    for device in {cfg.train.device, cfg.embed.device}:
        resolve_device(device)  # a device this machine lacks fails now, not after the embed stage
    return cfg


def base_config(args) -> PipelineConfig:
    """--config's file; else, when --out is an existing run, the config.toml it was built with, so that
    `cbtm run --out RUN` resumes or repairs that run as it was set up (flags and --set still override it);
    else the defaults."""
    if args.config:
        return PipelineConfig.load(args.config)
    saved = RunDir(args.out) if args.out else None
    if saved is not None and saved.exists() and saved.config_path.is_file():
        log.info("settings: %s (the run's own; flags and --set override them)", saved.config_path)
        return PipelineConfig.load(saved.config_path)
    return PipelineConfig()


def toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cmd_run(args) -> int:
    cfg = pipeline_config(args)
    corpus_name = Path(cfg.corpus.path).name.split(".")[0].replace("hf:", "")
    out = Path(args.out or Path("runs") / ("demo" if corpus_name == "demo" else corpus_name))
    run = RunDir(out)
    run.check_usable_as_output()
    runner = task_runner(args.runner)
    # Before a server starts for nothing: the corpus opens, has the fields and enough documents.
    check_corpus(cfg.corpus, min_documents=min(cfg.cluster.auto_k or [cfg.cluster.n_clusters]))
    existed = out.exists()
    fresh = not existed or not any(out.iterdir())
    try:
        with api_server():
            summary = build.with_options(task_runner=runner)(cfg.to_dict(), str(out), args.until, args.force,
                                                             args.runner)
    except UserInputError:
        if fresh:  # bad input leaves no run directory behind
            _remove_fresh(out, existed)
        raise
    except BaseException:
        if fresh and (not run.exists() or not run.read_manifest().stages.get("ingest")):
            _remove_fresh(out, existed)  # a run that never got going leaves nothing; a started one is kept
        raise
    print_summary(summary)
    return 0


def _remove_fresh(out: Path, existed: bool) -> None:
    """Undo what this command wrote into a new run directory (an empty directory the user made stays, empty)."""
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def print_summary(summary: dict) -> None:
    print()
    if summary["clusters"]:
        print(f"Clusters ({len(summary['clusters'])}):")
        for c in summary["clusters"]:
            print(f"  {c['cluster_id']:>3}  {c['size_train']:>6} train docs  {', '.join(c['keywords'][:8])}")
    if summary["experts"]:
        print("Experts (held-out loss, nats/token" + ("" if summary["done"] else "; recorded so far") + "):")
        for cid, e in sorted(summary["experts"].items(), key=lambda kv: int(kv[0])):
            if e.get("skipped"):
                print(f"  {cid:>3}  skipped ({e.get('reason')}): routing excludes it")
                continue
            val = "n/a" if e["val_loss"] is None else f"{e['val_loss']:.3f}"
            print(f"  {cid:>3}  val {val}  train {e['train_loss']:.3f}  {e['path']}")
    print(f"Run directory: {summary['run_dir']}" + ("  (report.md)" if summary["done"] else ""))
    if summary["done"]:
        prompt = shlex.quote(summary.get("example_prompt") or "The")
        print(f"Try:  cbtm query {shlex.quote(summary['run_dir'])} {prompt} --top-k 2")
    else:  # stopped by --until, or experts of other clusters still to train: not servable yet
        print(f"Unfinished: `cbtm run --out {shlex.quote(summary['run_dir'])}` carries on from here (its config.toml)")


def cmd_retrain(args) -> int:
    runner = task_runner(args.runner)
    with api_server():
        summary = retrain.with_options(task_runner=runner)(str(args.run_dir), sorted(set(args.cluster)), args.runner,
                                                           args.from_current)
    print_summary(summary)
    return 0


def cmd_eval(args) -> int:
    baselines = parse_baselines(args.baselines)  # bad names fail before Prefect starts
    if args.limit is not None and args.limit < 1:
        raise UserInputError(f"--limit must be >= 1, got {args.limit}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserInputError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    runner = task_runner(args.runner)
    if args.tasks is not None:
        return _eval_tasks(args, baselines, runner)
    with api_server():
        results = evaluate.with_options(task_runner=runner)(str(args.run_dir), args.top_k, args.corpus,
                                                            args.text_field, args.limit, baselines, args.runner)
    print(f"Held-out perplexity over {results['n_texts']} documents (own cluster in brackets for experts); route "
          f"temperature {results['route_temperature']:g}, evidence weight {results.get('evidence_weight', 0):g}:")
    for name, r in results["systems"].items():
        own = r["per_cluster"].get(str(r.get("expert")), {}).get("perplexity")
        print(f"  {name:<22} {r['perplexity']:>9.2f}  ({r['tokens']} tokens)" + (f"  [{own:.2f}]" if own else ""))
    for kind, b in results["baselines"].items():
        print(f"Baseline {kind}: {b['n_experts']} expert(s), {budget_words(b)}, as the ensemble's experts "
              f"({Path(args.run_dir) / b['path']})")
    if gain := dense_gain(results):
        print(gain)
    print(f"Results: {RunDir(args.run_dir).results_path} (and report.md)")
    return 0


def _eval_tasks(args, baselines: list[str], runner) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserInputError("--tasks is empty: name at least one lm-eval task, e.g. --tasks cbtm_ag_news_topic")
    require_harness()
    check_tasks(tasks, args.include_path)  # unknown names fail before any baseline is trained
    with api_server():
        result = harness.with_options(task_runner=runner)(str(args.run_dir), tasks, args.include_path,
                                                          args.num_fewshot, args.limit, baselines, args.top_k,
                                                          args.runner)
    print("\n".join(harness_table(result)))
    print(f"Results: {RunDir(args.run_dir).harness_path} (and report.md)")
    return 0


def cmd_clusters(args) -> int:
    run = RunDir(args.run_dir)
    manifest = run.read_manifest()
    if "embed" not in manifest.stages:
        raise UserInputError(f"run {run.root} has no embeddings yet: run `cbtm run --out {run.root} --until embed`")
    try:
        ks = sorted({int(k) for k in args.k.split(",") if k.strip()})
    except ValueError as exc:
        raise UserInputError(f"--k {args.k!r} must be comma-separated whole numbers, e.g. 2,4,8") from exc
    with run.writing("clusters choose-k"):
        result = choose_k(run.embeddings_dir, run.corpus_path, ks, args.sample_size, args.seed, run.choose_k_dir)
    print(f"{'k':>4} {'inertia':>10} {'silhouette':>11}")
    for row in result["results"]:
        sil = "n/a" if row["silhouette"] is None else f"{row['silhouette']:.4f}"
        best = "  <- best" if row["k"] == result["best_k"] else ""
        print(f"{row['k']:>4} {row['inertia']:>10.4f} {sil:>11}{best}")
    if warning := edge_warning(result["results"], result["best_k"]):
        print(f"Note: {warning}")
    print(f"Plot: {run.choose_k_dir / 'choose_k.png'}; use it with `cbtm run --clusters K` (or --clusters auto)")
    return 0
