"""Prefect flows `build` (the whole pipeline) and `retrain` (one or more experts).

Each stage is a plain function from the `cluster`, `experts` or `flows` packages wrapped thinly as a task;
artifacts move as files in the run directory, tasks return only small summaries. The flow body is the only
writer of ``manifest.json`` and holds the run's writer lock while it runs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from cluster.choose_k import choose_k, edge_warning
from cluster.config import EmbedConfig
from cluster.corpus import ingest_corpus, read_documents
from cluster.embed import embed_shard, load_embedder, plan_shards, stage_embedder, write_embeddings_meta
from cluster.kmeans import cluster_corpus, read_clusters
from cluster.report import clusters_table
from ensemble.config import record_routing
from experts.seed import build_seed, pretrain_seed
from experts.tokenizer import train_tokenizer
from flows.config import PipelineConfig
from flows.report import label_field, write_report
from flows.routing_stage import train_router
from flows.runners import is_remote
from flows.stages import forget_earlier_clusters, run_stage, stage_inputs, start_forced
from flows.training import train_experts
from flows.tuning import tune_inputs, tune_stage
from ground.device import resolve_device
from ground.errors import UserInputError
from ground.files import atomic_write_text, clean_stale_temporaries, hash_path, read_json
from ground.progress import progress
from ground.rundir import STAGES, Manifest, RunDir

log = logging.getLogger("cbtm")

ingest_task = task(ingest_corpus, name="ingest", cache_policy=NO_CACHE)
_EMBEDDERS: dict[tuple[str, str], object] = {}  # per worker process: load the embedder once, not per shard


def embed_one_shard(cfg: EmbedConfig, corpus_path: Path, out_dir: Path, shard_index: int, n_docs: int) -> str:
    """Embed one shard in whatever worker runs it (the stage's `embed_shard`, with a progress bar)."""
    key = (json.dumps(dataclasses.asdict(cfg), sort_keys=True), str(out_dir))
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = load_embedder(cfg, out_dir)
    bar = progress(total=n_docs, desc=f"embed shard {shard_index}", unit="doc")
    try:
        return str(embed_shard(cfg, corpus_path, out_dir, shard_index, _EMBEDDERS[key], bar.update))
    finally:
        bar.close()


embed_shard_task = task(embed_one_shard, name="embed-shard", cache_policy=NO_CACHE,
                        task_run_name="embed-shard-{shard_index}")
cluster_task = task(cluster_corpus, name="cluster", cache_policy=NO_CACHE)
tokenizer_task = task(train_tokenizer, name="tokenizer", cache_policy=NO_CACHE)
seed_task = task(build_seed, name="seed", cache_policy=NO_CACHE)
report_task = task(write_report, name="assemble", cache_policy=NO_CACHE)
tune_task = task(tune_stage, name="tune", cache_policy=NO_CACHE)
choose_k_task = task(choose_k, name="choose-k", cache_policy=NO_CACHE)
pretrain_task = task(pretrain_seed, name="pretrain-seed", cache_policy=NO_CACHE)
router_task = task(train_router, name="router", cache_policy=NO_CACHE)


def open_run(run: RunDir, cfg: PipelineConfig, force: set[str] = frozenset()) -> Manifest:
    """Create the run directory or reopen it.

    Refused: a file, an unwritable place, a non-empty directory that is not a cbtm run, and a run built from
    another corpus unless ``ingest`` is forced. Only temporaries of dead cbtm processes are cleaned up. The
    config of an existing run is replaced only when a build with the new one succeeds (`record_config`), so a
    failed re-run never leaves a finished run describing a config it was not built with.
    """
    run.check_usable_as_output()
    manifest = run.read_manifest() if run.exists() else Manifest()
    corpus = str(Path(cfg.corpus.path).resolve()) if not cfg.corpus.path.startswith("hf:") else cfg.corpus.path
    previous = (manifest.config.get("corpus") or {}).get("path")
    if previous and previous != corpus and "ingest" not in force:
        raise UserInputError(f"run directory {run.root} was built from corpus {previous}, not {corpus}: "
                             "pass another --out, or --force ingest to rebuild it from this corpus")
    if manifest.additions:
        raise UserInputError(f"run {run.root} was grown by `cbtm add` ({len(manifest.additions)} addition(s)); "
                             "`cbtm run` would rebuild it from its original corpus alone: build a new run with "
                             "--out NEW_DIR, or keep growing this one with `cbtm add` / `cbtm retrain`")
    new = not run.exists()
    run.root.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(run.root)
    if new:
        record_config(cfg, run, manifest)
    return manifest


def record_config(cfg: PipelineConfig, run: RunDir, manifest: Manifest) -> None:
    """Save ``cfg`` as the run's config (manifest and config.toml)."""
    manifest.config = cfg.to_dict()
    manifest.embedder = cfg.embed.model
    manifest.n_clusters = cfg.cluster.n_clusters
    atomic_write_text(run.config_path, cfg.to_toml())
    run.write_manifest(manifest)


def _embed(cfg: PipelineConfig, run: RunDir, runner: str) -> None:
    """The embed stage as one task per shard (several workers embed at once on Ray or Dask).

    The embedder is prepared here first: stale shards of other settings are cleared and a tf-idf embedder is
    fitted and saved, so every worker loads the same one. On a local CPU shards run one after another.
    """
    embedder = stage_embedder(cfg.embed, run.corpus_path, run.embeddings_dir)
    _EMBEDDERS[(json.dumps(dataclasses.asdict(cfg.embed), sort_keys=True), str(run.embeddings_dir))] = embedder
    n_rows = pq.ParquetFile(run.corpus_path).metadata.num_rows
    n_shards = plan_shards(run.corpus_path, cfg.embed.shard_size)
    sequential = resolve_device(cfg.embed.device) == "cpu" and not is_remote(runner)
    futures = []
    for i in range(n_shards):
        size = min(cfg.embed.shard_size, n_rows - i * cfg.embed.shard_size)
        futures.append(embed_shard_task.submit(cfg.embed, run.corpus_path, run.embeddings_dir, i, size))
        if sequential:
            futures[-1].wait()
    for future in futures:
        future.result()
    write_embeddings_meta(cfg.embed, run.corpus_path, run.embeddings_dir, embedder)


def assemble_run(cfg: PipelineConfig, run: RunDir, manifest: Manifest,
                 complete: Callable[[Manifest], None] | None = None) -> None:
    """The tune and assemble stages (routing entry, route temperature, report, DONE) of a run whose experts are
    all recorded. ``complete(manifest)``: the end of the command's job (clear it, record what it did), applied
    after tuning and persisted with the assemble stage, so that a command killed before that resumes its job."""
    manifest.routing = record_routing(manifest.routing, cfg.ensemble)
    run.write_manifest(manifest)  # the tune stage opens the run from disk, with this routing entry
    up = lambda name: (manifest.stages.get(name) or {}).get("outputs")  # noqa: E731
    tuning = tune_inputs(cfg, manifest, up("router") if cfg.ensemble.router == "prefix" else None, up("ingest"))
    tune_task(run, manifest, cfg, run.corpus_path, tuning)
    if complete is not None:
        complete(manifest)
    inputs = stage_inputs(cfg, manifest, "assemble")
    ran = run_stage(run, manifest, "assemble", inputs, lambda: report_task(run, manifest, label_field(cfg, run)))
    if complete is not None and not ran:
        run.write_manifest(manifest)  # the skipped stage recorded nothing: the job's end, still before DONE
    if ran or not run.done_path.exists():
        _publish_artifacts(run, manifest)
    atomic_write_text(run.done_path, time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")


def _publish_artifacts(run: RunDir, manifest: Manifest) -> None:
    create_table_artifact(key="cbtm-clusters", description=f"Clusters of {run.root}",
                          table=clusters_table(run.clusters_dir))
    create_table_artifact(key="cbtm-experts", description=f"Experts of {run.root}",
                          table=[{"cluster": int(cid), **{k: e.get(k) for k in ("steps", "train_loss", "val_loss")}}
                                 for cid, e in sorted(manifest.experts.items(), key=lambda kv: int(kv[0]))])
    create_markdown_artifact(key="cbtm-report", markdown=run.report_path.read_text(), description=str(run.root))


def summarize(run: RunDir) -> dict:
    """Small JSON summary of a run: clusters (sizes, keywords) and experts (losses), for the CLI."""
    manifest = run.read_manifest()
    clusters = read_clusters(run.clusters_dir)["clusters"] if (run.clusters_dir / "clusters.json").exists() else []
    return {"run_dir": str(run.root), "stages": list(manifest.stages), "done": run.done_path.exists(),
            "clusters": [{k: c[k] for k in ("cluster_id", "size_train", "size_heldout", "keywords")}
                         for c in clusters],
            "experts": {cid: {k: e.get(k) for k in ("val_loss", "train_loss", "path", "skipped", "reason")}
                        for cid, e in manifest.experts.items()},
            "example_prompt": example_prompt(run)}


def example_prompt(run: RunDir, words: int = 5) -> str:
    """The first words of the run's first held-out document (else its first document): a prompt from the
    user's own corpus for the closing "Try:" line; "" before ingest."""
    if not run.corpus_path.exists():
        return ""
    for split in ("heldout", "train"):
        texts = read_documents(run.corpus_path, split=split, columns=["text"]).column("text").slice(0, 1)
        if len(texts):
            return " ".join(str(texts[0]).split()[:words])
    return ""


def _choose_k(cfg: PipelineConfig, run: RunDir, manifest: Manifest) -> None:
    """`--clusters auto`: score every k of cluster.auto_k, keep the best silhouette as cluster.n_clusters."""
    out = run.choose_k_dir
    run_stage(run, manifest, "choose_k", stage_inputs(cfg, manifest, "choose_k"),
              lambda: choose_k_task(run.embeddings_dir, run.corpus_path, cfg.cluster.auto_k, cfg.cluster.sample_size,
                                    cfg.cluster.seed, out))
    chosen = read_json(out / "choose_k.json")
    best = chosen["best_k"]
    log.info("  choose_k  best silhouette at k=%d (of %s)", best, cfg.cluster.auto_k)
    if warning := edge_warning(chosen["results"], best):
        log.warning("  choose_k  %s", warning)
    cfg.cluster.n_clusters = best  # recorded with the rest of the config when the build succeeds


def _cluster(cfg: PipelineConfig, run: RunDir, manifest: Manifest) -> None:
    """The cluster stage; other clusters than before make the run forget what belonged to the earlier ones,
    before the stage is recorded (a build killed in between forgets on its re-run)."""
    earlier = (manifest.stages.get("cluster") or {}).get("outputs")

    def work() -> None:
        cluster_task(cfg.cluster, run.corpus_path, run.embeddings_dir, run.clusters_dir, label_field(cfg, run))
        if earlier is not None and hash_path(run.clusters_dir) != earlier:
            forget_earlier_clusters(run, manifest, cfg.cluster.n_clusters)

    run_stage(run, manifest, "cluster", stage_inputs(cfg, manifest, "cluster"), work)
    if any(int(c) >= cfg.cluster.n_clusters for c in manifest.experts):  # re-clustered before 2026-12-07
        forget_earlier_clusters(run, manifest, cfg.cluster.n_clusters)


@flow(name="build", log_prints=False, validate_parameters=False)
def build(config: dict, run_dir: str, until: str = "assemble", force: list[str] | None = None,
          runner: str = "thread") -> dict:
    """The whole pipeline: ingest -> embed -> cluster -> tokenizer/seed + one expert per cluster -> assemble.

    Stages whose inputs and outputs are unchanged are skipped; ``until`` stops after a stage; ``force`` re-runs
    the named stages (a job that resumes, see `start_forced`); ``runner`` is the `--runner` spec the flow's task
    runner was made from (it decides per-task resources such as one GPU per expert on Ray).
    """
    if until not in STAGES:
        raise UserInputError(f"--until {until!r} is not a stage: use one of {', '.join(STAGES)}")
    cfg = PipelineConfig.from_dict(config)
    run = RunDir(run_dir)
    run.check_usable_as_output()
    with run.writing("run"):
        manifest = open_run(run, cfg, set(force or []))
        log.info("run directory %s", run.root)
        start_forced(run, manifest, {s for s in force or [] if STAGES.index(s) <= STAGES.index(until)})
        _build_stages(cfg, run, manifest, until, runner)
        manifest.jobs.pop("run", None)  # the forced job is done (or was interrupted and this build finished it)
        record_config(cfg, run, manifest)
    return summarize(run)


def _build_stages(cfg: PipelineConfig, run: RunDir, manifest: Manifest, until: str, runner: str) -> None:
    """Run (or skip) every stage up to and including ``until``."""
    for stage, work in [("ingest", lambda: ingest_task(cfg.corpus, run.corpus_path)),
                        ("embed", lambda: _embed(cfg, run, runner))]:
        run_stage(run, manifest, stage, stage_inputs(cfg, manifest, stage), work)
        if until == stage:
            return
    if cfg.cluster.auto_k:
        _choose_k(cfg, run, manifest)
    _cluster(cfg, run, manifest)
    if until == "cluster":
        return
    run_stage(run, manifest, "tokenizer", stage_inputs(cfg, manifest, "tokenizer"),
              lambda: tokenizer_task(cfg.seed, run.corpus_path, run.tokenizer_dir))
    run_stage(run, manifest, "seed", stage_inputs(cfg, manifest, "seed"),
              lambda: seed_task(cfg.seed, run.tokenizer_dir, run.seed_dir))
    if cfg.seed_tokens():  # Branch-Train-Merge seed phase: train the seed on everything first
        run_stage(run, manifest, "pretrain", stage_inputs(cfg, manifest, "pretrain"),
                  lambda: pretrain_task(cfg.seed_tokens(), cfg.train, run.seed_dir, run.corpus_path, run.pretrained_dir,
                                        checkpoint_dir=run.checkpoint_dir("seed"), cache_dir=run.token_cache))
    if cfg.ensemble.router == "prefix":
        run_stage(run, manifest, "router", stage_inputs(cfg, manifest, "router"),
                  lambda: router_task(run.corpus_path, run.clusters_dir, run.tokenizer_dir, cfg.embed,
                                      run.embeddings_dir, run.router_dir, run.router_cache))
    # An expert removed with --delete stays deleted: `cbtm retrain` is how it comes back, not any rebuild.
    deleted = {int(c) for c, e in manifest.experts.items() if e.get("deleted") and int(c) in manifest.removed}
    train_experts(cfg, run, manifest, [c for c in range(cfg.cluster.n_clusters) if c not in deleted], force=False,
                  runner=runner)
    if until == "train":
        return
    assemble_run(cfg, run, manifest)


@flow(name="retrain", log_prints=False, validate_parameters=False)
def retrain(run_dir: str, cluster_ids: list[int], runner: str = "thread", from_current: bool = False) -> dict:
    """Retrain the experts of ``cluster_ids`` from the seed (``from_current``: continue from the current
    expert); every other expert's files stay untouched.

    Each new expert replaces the old one atomically; an `Ensemble` loaded before keeps the version it
    pinned when it loaded until it calls `reload()`.
    """
    run = RunDir(run_dir)
    manifest = run.read_manifest()
    cfg = PipelineConfig.from_dict(manifest.config)
    missing = [s for s in ("cluster", "seed") if s not in manifest.stages]
    if missing:
        raise UserInputError(f"run {run.root} has not finished stage(s) {missing}: run `cbtm run --out {run.root}`")
    bad = [c for c in cluster_ids if not 0 <= c < cfg.cluster.n_clusters]
    if bad:
        raise UserInputError(f"cluster(s) {bad} do not exist: this run has clusters 0..{cfg.cluster.n_clusters - 1}")
    if from_current:
        absent = [c for c in cluster_ids if not (run.expert_dir(c) / "config.json").exists()]
        if absent:
            raise UserInputError(f"--continue needs the current expert(s) {absent}, which do not exist: "
                                 "retrain them without --continue")
    with run.writing("retrain"):
        clean_stale_temporaries(run.root)
        todo = _retrain_job(run, manifest, sorted(set(cluster_ids)), from_current)
        train_experts(cfg, run, manifest, todo, force=True, keep_done=True, runner=runner,
                      from_current=from_current, job="retrain")
        if "assemble" in manifest.stages:
            assemble_run(cfg, run, manifest, complete=lambda m: m.jobs.pop("retrain", None))
        else:
            manifest.jobs.pop("retrain", None)
            run.write_manifest(manifest)
    return summarize(run)


def _retrain_job(run: RunDir, manifest: Manifest, cluster_ids: list[int], from_current: bool) -> list[int]:
    """The experts this retrain still has to train: all of them, or, when the same retrain was interrupted,
    those it had not finished (a retrained expert is never retrained twice, nor continued twice)."""
    job = {"clusters": cluster_ids, "from_current": from_current}
    pending = manifest.jobs.get("retrain") or {}
    if {k: pending.get(k) for k in job} == job:
        done = set(pending.get("done", []))
        if done:
            log.info("  retrain   resuming: expert(s) %s were already retrained by this command", sorted(done))
        return [c for c in cluster_ids if c not in done]
    manifest.jobs["retrain"] = {**job, "done": []}
    run.write_manifest(manifest)
    return cluster_ids
