"""The `cbtm` command line: every command and flag (`flows.cli` runs them, `flows.commands` implements them)."""
from __future__ import annotations

import argparse

from ground.rundir import STAGES

AUTO_K = [2, 4, 8, 16, 32]


def parser() -> argparse.ArgumentParser:
    """The `cbtm` argument parser (every command and flag, with help)."""
    p = argparse.ArgumentParser(prog="cbtm", description="Cluster-Branch-Train-Merge: discover domains, train one "
                                "expert LM per domain, query the sparse ensemble.")
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect logs and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _run_parser(sub)
    _retrain_parser(sub)
    _query_parser(sub)
    _clusters_parser(sub)
    _tune_parser(sub)
    _eval_parser(sub)
    _serve_parser(sub)
    _grow_parsers(sub)
    return p


def _run_parser(sub) -> None:
    """The `run` command: the build flow."""
    run = sub.add_parser("run", help="run the pipeline end to end (default: the embedded demo corpus)",
                         description="Run the build flow: ingest, embed, cluster, train one expert per cluster, "
                         "assemble. Re-running the same command resumes and skips finished stages.")
    run.add_argument("--config", metavar="FILE", help="TOML pipeline config (sections corpus, embed, cluster, seed, "
                     "train, ensemble); flags below override it (default: the config.toml of the run in "
                     "--out when it exists, else the defaults)")
    run.add_argument("--corpus", metavar="PATH", help="JSONL(.gz)/Parquet/CSV file or a directory of them, "
                     "its train split if its files name splits (default: the config's; else the demo corpus "
                     "data/demo)")
    run.add_argument("--text-field", metavar="NAME", help="the field holding each document's text (default: text)")
    run.add_argument("--clusters", metavar="K", help="number of clusters = experts (default: the config's; "
                     "else 6), or auto: the best silhouette among 2,4,8,16,32 (see `cbtm clusters choose-k`)")
    run.add_argument("--out", metavar="DIR", help="run directory (default: runs/demo, or runs/<corpus name>)")
    run.add_argument("--until", metavar="STAGE", choices=STAGES, default="assemble",
                     help=f"stop after this stage: {', '.join(STAGES)} (default: assemble)")
    run.add_argument("--force", metavar="STAGE", action="append", choices=STAGES, default=[],
                     help="re-run this stage from scratch even if it is up to date (repeatable); interrupted, the "
                     "same command resumes the forced build")
    run.add_argument("--runner", metavar="SPEC", default="thread",
                     help="Prefect task runner: thread (default), process, ray, ray=ADDRESS, dask, dask=ADDRESS "
                     "(for process/ray/dask one API server is started and shared by the workers)")
    run.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                     help="override one config value, e.g. --set train.steps=300 (repeatable)")


def _retrain_parser(sub) -> None:
    """The `retrain` command."""
    retrain = sub.add_parser("retrain", help="retrain one cluster's expert and nothing else",
                             description="Retrain the expert(s) of the given cluster(s) from the seed; the new "
                             "expert replaces the old one atomically.")
    retrain.add_argument("run_dir", metavar="RUN", help="a finished run directory")
    retrain.add_argument("--cluster", metavar="I", type=int, action="append", required=True,
                         help="cluster id whose expert is retrained (repeatable)")
    retrain.add_argument("--runner", metavar="SPEC", default="thread", help="task runner, as for `cbtm run`")
    retrain.add_argument("--continue", dest="from_current", action="store_true",
                         help="continue training the current expert instead of starting again from the seed")


def _query_parser(sub) -> None:
    """The `query` command."""
    query = sub.add_parser("query", help="route a prompt and print the ensemble's completion",
                           description="Print the routing weights of PROMPT and the top-k ensemble's completion.")
    query.add_argument("run_dir", metavar="RUN", help="a finished run directory")
    query.add_argument("prompt", metavar="PROMPT", help="the text to continue")
    query.add_argument("--top-k", type=int, default=None, help="experts to mix (default: the run's top_k)")
    query.add_argument("--route-temperature", type=float, default=None,
                       help="routing temperature T in softmax(-d^2/T) (default: the run's, tuned or configured)")
    query.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default: 40)")
    query.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    query.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    query.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --sample)")
    query.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    query.add_argument("--reroute-every", metavar="N", type=int, default=None,
                       help="re-embed the growing context every N tokens and update the weights")
    query.add_argument("--experts", metavar="IDS", default=None,
                       help="only these cluster ids may serve, comma-separated (default: every active expert)")
    query.add_argument("--exclude-experts", metavar="IDS", default=None,
                       help="these cluster ids may not serve, comma-separated (a data owner opting out of one "
                            "query; `cbtm remove` opts out for good)")
    query.add_argument("--stop", action="append", default=None,
                       help="end the completion before this string (repeatable)")


def _clusters_parser(sub) -> None:
    """The `clusters` tools (choose-k)."""
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


def _tune_parser(sub) -> None:
    """The `tune-temperature` command."""
    tune = sub.add_parser("tune-temperature", help="pick the routing temperature by held-out perplexity",
                          description="Score the held-out split at every temperature of the grid (the experts run "
                          "once), record the best in the run's manifest, plot perplexity against T.")
    tune.add_argument("run_dir", metavar="RUN", help="a finished run directory")
    tune.add_argument("--grid", default="0.01,0.03,0.1,0.3,1,3",
                      help="comma-separated routing temperatures > 0 (default: 0.01,0.03,0.1,0.3,1,3)")
    tune.add_argument("--top-k", type=int, default=None, help="experts mixed while scoring (default: the run's)")
    tune.add_argument("--limit", metavar="N", type=int, default=None, help="use at most N held-out documents")
    tune.add_argument("--clear", action="store_true",
                      help="forget the tuned temperature: the run's config value applies again (with "
                      "ensemble.route_temperature unset, the tune stage picks one at the next `cbtm run`)")


def _eval_parser(sub) -> None:
    """The `eval` command (perplexity, baselines, harness tasks)."""
    ev = sub.add_parser("eval", help="held-out perplexity of the ensemble, its experts and equal-budget baselines",
                        description="Score held-out text under the ensemble (routing from preceding context) at "
                        "top-1, top-2, top-4 and all experts, each expert alone, and optional baselines trained at "
                        "the run's total token budget; write RUN/eval/results.json, plots and report.md.")
    ev.add_argument("run_dir", metavar="RUN", help="a finished run directory")
    ev.add_argument("--corpus", metavar="PATH", help="evaluate on this corpus instead of the run's "
                    "held-out split (a directory whose files name splits: its test split)")
    ev.add_argument("--text-field", metavar="NAME", default=None,
                    help="text field of --corpus (default: the run's corpus.text_field)")
    ev.add_argument("--top-k", metavar="K", type=int, action="append", help="top-k to evaluate (repeatable; "
                    "default: 1, 2, 4 and all)")
    ev.add_argument("--limit", metavar="N", type=int, default=None,
                    help="evaluate at most N documents (with --tasks: N examples per task)")
    ev.add_argument("--baselines", metavar="LIST", default="",
                    help="comma-separated: dense (one model, k = 1) and/or random (random clusters of the same "
                    "sizes), trained at the same total token budget and cached in RUN/baselines")
    ev.add_argument("--runner", metavar="SPEC", default="thread", help="task runner for baseline training, as for "
                    "`cbtm run`")
    ev.add_argument("--tasks", metavar="T1,T2", default=None,
                    help="run these lm-evaluation-harness tasks instead (needs the eval extra) for top-1, top-2, all "
                    "experts and the --baselines; writes RUN/eval/harness.json")
    ev.add_argument("--include-path", metavar="DIR", default=None,
                    help="a folder of task YAMLs for --tasks (bench/harness_data.py writes cbtm's offline tasks)")
    ev.add_argument("--num-fewshot", metavar="K", type=int, default=None,
                    help="few-shot examples per --tasks prompt (default: each task's own)")


def _grow_parsers(sub) -> None:
    add = sub.add_parser("add", help="add documents to a finished run without retraining it",
                         description="Ingest and embed NEW with the run's embedder; a document close to an existing "
                         "cluster (within its --join-percentile of training distances) joins it, the rest form new "
                         "clusters whose experts are trained from the run's seed. Old experts are not touched. "
                         "Re-running the same command resumes an interrupted add.")
    add.add_argument("run_dir", metavar="RUN", help="a finished run directory")
    add.add_argument("--corpus", metavar="NEW", required=True,
                     help="the new documents (JSONL/Parquet/CSV, a directory of them: its train "
                     "split if its files name splits)")
    add.add_argument("--text-field", metavar="NAME", help="text field of NEW (default: the run's corpus.text_field)")
    add.add_argument("--new-clusters", metavar="K", default="auto",
                     help="clusters the far documents form: a number (0: none, everything joins its nearest "
                     "cluster) or auto, the best silhouette among 2,4,8,16,32 that leave each new cluster at least "
                     "half the run's median training cluster (default: auto)")
    add.add_argument("--join-percentile", metavar="P", type=float, default=95.0,
                     help="a document joins its nearest cluster when closer than this percentile of the cluster's "
                     "own training distances (default: 95)")
    add.add_argument("--continue", dest="from_current", action="store_true",
                     help="the experts whose clusters gained documents continue training on their grown sets "
                     "(default: they stay as they are)")
    add.add_argument("--runner", metavar="SPEC", default="thread", help="task runner, as for `cbtm run`")
    remove = sub.add_parser("remove", help="stop routing to an expert (a data owner opting out)",
                            description="The expert is no longer routed to; its files are kept unless --delete. "
                            "`cbtm restore` undoes it.")
    remove.add_argument("run_dir", metavar="RUN", help="a run directory")
    remove.add_argument("--cluster", metavar="I", type=int, action="append", required=True,
                        help="cluster id of the expert (repeatable)")
    remove.add_argument("--delete", action="store_true", help="also delete the expert's files (restore then needs "
                        "`cbtm retrain RUN --cluster I`)")
    restore = sub.add_parser("restore", help="route to a removed expert again",
                             description="Undo `cbtm remove`: the expert is routed to again.")
    restore.add_argument("run_dir", metavar="RUN", help="a run directory")
    restore.add_argument("--cluster", metavar="I", type=int, action="append", required=True,
                         help="cluster id of the expert (repeatable)")


def _serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="serve the ensemble over HTTP (OpenAI-compatible, continuous batching)",
                           description="Serve a finished run: /v1/completions, /v1/chat/completions, /v1/models, "
                           "/v1/route, /v1/reload, /metrics and /health. Requests join one running batch at every "
                           "step. SIGHUP or POST /v1/reload picks up retrained experts.")
    serve.add_argument("run_dir", metavar="RUN", help="a finished run directory")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--top-k", type=int, default=None, help="experts mixed per prompt (default: the run's)")
    serve.add_argument("--route-temperature", type=float, default=None, help="routing temperature (default: the run's)")
    serve.add_argument("--max-batch-size", type=int, default=32, help="prompts decoding together (default: 32)")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="requests waiting for room in the batch; more get 429 (default: 256)")
    serve.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: the context)")
    serve.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens (default: the context)")
    serve.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (default: $CBTM_API_KEY; "
                       "none: no key)")
    serve.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    serve.add_argument("--max-loaded-experts", type=int, default=None, help="experts kept in memory (default: all)")
    serve.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads for decoding (default: torch's, one per core); on a small CPU, fewer "
                       "leave a core to HTTP and routing: lower latency for few clients")
    serve.add_argument("--model-name", default=None, help="the model id clients send (default: the run's folder name)")
