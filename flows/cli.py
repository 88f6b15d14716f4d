"""`cbtm`: run the pipeline, retrain one expert, query and evaluate a run.

Bad input exits with code 2 and one line on stderr saying what is wrong and what to do.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from ensemble.rundir import STAGES, UserInputError

log = logging.getLogger("cbtm")
PACKAGE_LOGGERS = ("cbtm", "cluster", "experts", "ensemble", "flows")
AUTO_K = [2, 4, 8, 16, 32]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cbtm", description="Cluster-Branch-Train-Merge: discover domains, train one "
                                "expert LM per domain, query the sparse ensemble.")
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect logs and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the pipeline end to end (default: the embedded demo corpus)",
                         description="Run the build flow: ingest, embed, cluster, train one expert per cluster, "
                         "assemble. Re-running the same command resumes and skips finished stages.")
    run.add_argument("--config", metavar="FILE", help="TOML pipeline config (sections corpus, embed, cluster, seed, "
                     "train, ensemble); flags below override it")
    run.add_argument("--corpus", metavar="PATH", help="JSONL(.gz)/Parquet/CSV file or a directory of them "
                     "(default: the demo corpus data/demo)")
    run.add_argument("--text-field", metavar="NAME", help="the field holding each document's text (default: text)")
    run.add_argument("--clusters", metavar="K", help="number of clusters = experts (default: 6), or auto: "
                     "the best silhouette among 2,4,8,16,32 (see `cbtm clusters choose-k`)")
    run.add_argument("--out", metavar="DIR", help="run directory (default: runs/demo, or runs/<corpus name>)")
    run.add_argument("--until", metavar="STAGE", choices=STAGES, default="assemble",
                     help=f"stop after this stage: {', '.join(STAGES)} (default: assemble)")
    run.add_argument("--force", metavar="STAGE", action="append", choices=STAGES, default=[],
                     help="re-run this stage even if it is up to date (repeatable)")
    run.add_argument("--runner", metavar="SPEC", default="thread",
                     help="Prefect task runner: thread (default), process, ray, ray=ADDRESS, dask, dask=ADDRESS "
                     "(for process/ray/dask one API server is started and shared by the workers)")
    run.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                     help="override one config value, e.g. --set train.steps=300 (repeatable)")

    retrain = sub.add_parser("retrain", help="retrain one cluster's expert and nothing else",
                             description="Retrain the expert(s) of the given cluster(s) from the seed; the new "
                             "expert replaces the old one atomically.")
    retrain.add_argument("run_dir", metavar="RUN", help="a finished run directory")
    retrain.add_argument("--cluster", metavar="I", type=int, action="append", required=True,
                         help="cluster id whose expert is retrained (repeatable)")
    retrain.add_argument("--runner", metavar="SPEC", default="thread", help="task runner, as for `cbtm run`")
    retrain.add_argument("--continue", dest="from_current", action="store_true",
                         help="continue training the current expert instead of starting again from the seed")

    query = sub.add_parser("query", help="route a prompt and print the ensemble's completion",
                           description="Print the routing weights of PROMPT and the top-k ensemble's completion.")
    query.add_argument("run_dir", metavar="RUN", help="a finished run directory")
    query.add_argument("prompt", metavar="PROMPT", help="the text to continue")
    query.add_argument("--top-k", type=int, default=None, help="experts to mix (default: the run's top_k)")
    query.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default: 40)")
    query.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    query.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    query.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --sample)")
    query.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    query.add_argument("--reroute-every", metavar="N", type=int, default=None,
                       help="re-embed the growing context every N tokens and update the weights")

    clusters = sub.add_parser("clusters", help="inspect the clustering of a run (choose-k)",
                              description="Clustering tools; `cbtm clusters choose-k RUN --k 2,4,8` scores k.")
    csub = clusters.add_subparsers(dest="clusters_command", required=True, metavar="TOOL")
    ck = csub.add_parser("choose-k", help="inertia and sampled silhouette for several k, with a plot",
                         description="Fit spherical k-means for every k on the run's embedded training sample; "
                         "print inertia and silhouette, write RUN/choose_k/choose_k.json and choose_k.png.")
    ck.add_argument("run_dir", metavar="RUN", help="a run directory embedded at least (cbtm run --until embed)")
    ck.add_argument("--k", default=",".join(map(str, AUTO_K)), help="comma-separated k (default: 2,4,8,16,32)")
    ck.add_argument("--sample-size", type=int, default=100_000, help="documents fitted per k (default: 100000)")
    ck.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    tune = sub.add_parser("tune-temperature", help="pick the routing temperature by held-out perplexity",
                          description="Score the held-out split at every temperature of the grid (the experts run "
                          "once), record the best in the run's manifest, plot perplexity against T.")
    tune.add_argument("run_dir", metavar="RUN", help="a finished run directory")
    tune.add_argument("--grid", default="0.01,0.03,0.1,0.3,1,3",
                      help="comma-separated temperatures (default: 0.01,0.03,0.1,0.3,1,3)")
    tune.add_argument("--top-k", type=int, default=None, help="experts mixed while scoring (default: the run's)")
    tune.add_argument("--limit", metavar="N", type=int, default=None, help="use at most N held-out documents")

    ev = sub.add_parser("eval", help="held-out perplexity of the ensemble, its experts and equal-budget baselines",
                        description="Score held-out text under the ensemble (routing from preceding context) at "
                        "top-1, top-2, top-4 and all experts, each expert alone, and optional baselines trained at "
                        "the run's total token budget; write RUN/eval/results.json, plots and report.md.")
    ev.add_argument("run_dir", metavar="RUN", help="a finished run directory")
    ev.add_argument("--corpus", metavar="PATH", help="evaluate on this corpus instead of the run's held-out split")
    ev.add_argument("--text-field", metavar="NAME", default=None,
                    help="text field of --corpus (default: the run's corpus.text_field)")
    ev.add_argument("--top-k", metavar="K", type=int, action="append", help="top-k to evaluate (repeatable; "
                    "default: 1, 2, 4 and all)")
    ev.add_argument("--limit", metavar="N", type=int, default=None, help="evaluate at most N documents")
    ev.add_argument("--baselines", metavar="LIST", default="",
                    help="comma-separated: dense (one model, k = 1) and/or random (random clusters of the same "
                    "sizes), trained at the same total token budget and cached in RUN/baselines")
    ev.add_argument("--runner", metavar="SPEC", default="thread", help="task runner for baseline training, as for "
                    "`cbtm run`")
    return p


def _setup_logging(verbose: bool) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "CRITICAL")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in PACKAGE_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
    if not verbose:
        for noisy in ("transformers", "sentence_transformers", "datasets", "httpx"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        import warnings

        warnings.filterwarnings("ignore")
        # Loading/saving a tiny expert takes milliseconds; transformers' own bars would drown the stage bars.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _quiet_prefect(verbose: bool) -> None:
    """Keep Prefect's per-task logs and tracebacks out of the terminal; our own stage lines remain."""
    if verbose:
        return
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.server", "uvicorn"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _pipeline_config(args):
    from flows.config import PipelineConfig
    from flows.pipeline import default_corpus

    cfg = PipelineConfig.load(args.config) if args.config else PipelineConfig()
    overrides = list(args.overrides)
    if args.corpus:
        overrides.append(f"corpus.path={_toml_str(args.corpus)}")
    if args.text_field:
        overrides.append(f"corpus.text_field={_toml_str(args.text_field)}")
    if args.clusters == "auto":
        overrides.append(f"cluster.auto_k={AUTO_K}")
    elif args.clusters is not None:
        if not args.clusters.lstrip("-").isdigit():
            raise UserInputError(f"--clusters {args.clusters!r} must be a whole number or auto")
        overrides.append(f"cluster.n_clusters={int(args.clusters)}")
    cfg = cfg.with_overrides(overrides)
    corpus = Path(cfg.corpus.path)
    if not args.corpus and str(corpus) == "data/demo" and not corpus.exists():
        corpus = default_corpus()  # run from outside the checkout: use the shipped demo corpus
    if not corpus.exists():
        raise UserInputError(f"corpus {corpus} does not exist: pass --corpus with a JSONL, Parquet or CSV file "
                             "or a directory of them")
    cfg.corpus.path = str(corpus.resolve())
    return cfg


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cmd_run(args) -> int:
    from flows.runners import task_runner

    cfg = _pipeline_config(args)
    corpus_name = Path(cfg.corpus.path).name.split(".")[0]
    out = Path(args.out or Path("runs") / ("demo" if corpus_name == "demo" else corpus_name))
    runner = task_runner(args.runner)
    from cluster.corpus import check_corpus

    check_corpus(cfg.corpus, min_documents=min(cfg.cluster.auto_k or [cfg.cluster.n_clusters]))  # before a server starts for nothing
    from flows.pipeline import build
    from flows.runners import shared_api_server

    _quiet_prefect(args.verbose)
    existed = out.exists()
    try:
        with shared_api_server(args.runner):
            summary = build.with_options(task_runner=runner)(cfg.to_dict(), str(out), args.until, args.force,
                                                             args.runner)
    except UserInputError:
        if not existed:  # bad input leaves no run directory behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    except BaseException:
        if not existed:  # a run that never got going leaves nothing; a started one is kept to resume
            _remove_unfinished(out)
        raise
    _print_summary(summary)
    return 0


def _remove_unfinished(out: Path) -> None:
    from ensemble.rundir import RunDir

    run = RunDir(out)
    if not run.exists() or not run.read_manifest().stages.get("ingest"):
        shutil.rmtree(out, ignore_errors=True)


def _print_summary(summary: dict) -> None:
    print()
    if summary["clusters"]:
        print(f"Clusters ({len(summary['clusters'])}):")
        for c in summary["clusters"]:
            print(f"  {c['cluster_id']:>3}  {c['size_train']:>6} train docs  {', '.join(c['keywords'][:8])}")
    if summary["experts"]:
        print("Experts (held-out loss, nats/token):")
        for cid, e in sorted(summary["experts"].items(), key=lambda kv: int(kv[0])):
            if e.get("skipped"):
                print(f"  {cid:>3}  skipped ({e.get('reason')}): routing excludes it")
                continue
            val = "n/a" if e["val_loss"] is None else f"{e['val_loss']:.3f}"
            print(f"  {cid:>3}  val {val}  train {e['train_loss']:.3f}  {e['path']}")
    print(f"Run directory: {summary['run_dir']}" + ("  (report.md)" if summary["done"] else ""))
    if summary["done"]:
        print(f'Try:  cbtm query {summary["run_dir"]} "Bread dough should rise" --top-k 2')


def cmd_retrain(args) -> int:
    from flows.pipeline import retrain
    from flows.runners import shared_api_server, task_runner

    runner = task_runner(args.runner)
    _quiet_prefect(args.verbose)
    with shared_api_server(args.runner):
        summary = retrain.with_options(task_runner=runner)(str(args.run_dir), sorted(set(args.cluster)), args.runner,
                                                           args.from_current)
    _print_summary(summary)
    return 0


def cmd_query(args) -> int:
    from ensemble import Ensemble

    ens = Ensemble.load(args.run_dir)
    top_k = args.top_k or ens.top_k
    routes = ens.route(args.prompt, top_k=top_k)
    keywords = {e["cluster_id"]: e["keywords"] for e in ens.experts}
    print("Routing:")
    for cid, weight in routes:
        print(f"  cluster {cid:>3}  weight {weight:.3f}  {', '.join(keywords[cid][:5])}")
    print("Completion:")
    print(args.prompt, end="", flush=True)
    for piece in ens.stream(args.prompt, max_new_tokens=args.max_new_tokens, top_k=top_k, do_sample=args.sample,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            reroute_every=args.reroute_every):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_tune_temperature(args) -> int:
    from ensemble import Ensemble
    from ensemble.evaluate import heldout_texts, plot_temperature
    from ensemble.rundir import atomic_write_text
    from ensemble.scoring import tune_temperature

    try:
        grid = sorted({float(x) for x in args.grid.split(",") if x.strip()})
    except ValueError as exc:
        raise UserInputError(f"--grid {args.grid!r} must be comma-separated numbers, e.g. 0.03,0.1,0.3") from exc
    if not grid or min(grid) <= 0:
        raise UserInputError(f"--grid {args.grid!r} must hold temperatures > 0")
    ens = Ensemble.load(args.run_dir)
    top_k = args.top_k or ens.top_k
    ens._check_top_k(top_k)
    results = tune_temperature(ens, heldout_texts(ens)[: args.limit], grid, top_k)
    manifest = ens.run.read_manifest()
    manifest.temperature = results["best"]
    ens.run.write_manifest(manifest)
    atomic_write_text(ens.run.eval_dir / "temperature.json", json.dumps(results, indent=2) + "\n")
    plot = plot_temperature(results, ens.run.plots_dir / "temperature.png")
    print(f"Held-out perplexity by routing temperature (top-{top_k}):")
    for row in results["grid"]:
        mark = "  <- chosen" if row["temperature"] == results["best"] else ""
        print(f"  T={row['temperature']:<8g} {row['perplexity']:>9.2f}{mark}")
    print(f"Recorded temperature {results['best']:g} in {ens.run.manifest_path}; plot: {plot}")
    return 0


def cmd_eval(args) -> int:
    from flows.baselines import parse_baselines
    from flows.evaluation import evaluate
    from flows.runners import shared_api_server, task_runner

    baselines = parse_baselines(args.baselines)  # bad names fail before Prefect starts
    if args.limit is not None and args.limit < 1:
        raise UserInputError(f"--limit must be >= 1, got {args.limit}")
    _quiet_prefect(args.verbose)
    runner = task_runner(args.runner)
    with shared_api_server(args.runner):
        results = evaluate.with_options(task_runner=runner)(str(args.run_dir), args.top_k, args.corpus,
                                                            args.text_field, args.limit, baselines, args.runner)
    print(f"Held-out perplexity over {results['n_texts']} documents (own cluster in brackets for experts):")
    for name, r in results["systems"].items():
        own = r["per_cluster"].get(str(r.get("expert")), {}).get("perplexity")
        print(f"  {name:<22} {r['perplexity']:>9.2f}  ({r['tokens']} tokens)" + (f"  [{own:.2f}]" if own else ""))
    for kind, b in results["baselines"].items():
        print(f"Baseline {kind}: {b['n_experts']} expert(s), {b['budget_tokens']:,} training tokens in all "
              f"({Path(args.run_dir) / b['path']})")
    print(f"Results: {Path(args.run_dir) / 'eval' / 'results.json'} (and report.md)")
    return 0


def cmd_clusters(args) -> int:
    from cluster.choose_k import choose_k
    from ensemble.rundir import RunDir

    run = RunDir(args.run_dir)
    manifest = run.read_manifest()
    if "embed" not in manifest.stages:
        raise UserInputError(f"run {run.root} has no embeddings yet: run `cbtm run --out {run.root} --until embed`")
    try:
        ks = sorted({int(k) for k in args.k.split(",") if k.strip()})
    except ValueError as exc:
        raise UserInputError(f"--k {args.k!r} must be comma-separated whole numbers, e.g. 2,4,8") from exc
    result = choose_k(run.embeddings_dir, run.corpus_path, ks, args.sample_size, args.seed, run.root / "choose_k")
    print(f"{'k':>4} {'inertia':>10} {'silhouette':>11}")
    for row in result["results"]:
        sil = "n/a" if row["silhouette"] is None else f"{row['silhouette']:.4f}"
        print(f"{row['k']:>4} {row['inertia']:>10.4f} {sil:>11}" + ("  <- best" if row["k"] == result["best_k"] else ""))
    print(f"Plot: {run.root / 'choose_k' / 'choose_k.png'}; use it with `cbtm run --clusters K` "
          "(or --clusters auto)")
    return 0


COMMANDS = {"run": cmd_run, "retrain": cmd_retrain, "query": cmd_query, "eval": cmd_eval,
            "tune-temperature": cmd_tune_temperature, "clusters": cmd_clusters}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except (UserInputError, FileNotFoundError, ValueError) as exc:
        if args.verbose:
            raise
        print(f"cbtm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cbtm {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        print(f"cbtm {args.command}: failed: {type(exc).__name__}: {exc} (re-run with --verbose for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
