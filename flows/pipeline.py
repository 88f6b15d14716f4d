"""Prefect flows: `build` (the whole pipeline) and `retrain` (one or more experts).

Each stage is a plain function from the `cluster`, `experts` or `ensemble` packages wrapped thinly as a
task; artifacts move as files in the run directory, tasks return only small summaries. The flow body is
the only writer of ``manifest.json``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from cluster.corpus import ingest_corpus
from cluster.embed import embed_corpus
from cluster.kmeans import cluster_corpus, read_clusters
from ensemble.device import resolve_device
from ensemble.report import write_report
from ensemble.rundir import (STAGES, Manifest, RunDir, UserInputError, atomic_write_text, clean_stale_temporaries,
                             hash_json)
from experts.seed import build_seed
from experts.tokenizer import train_tokenizer
from experts.train import train_expert
from flows.config import PipelineConfig
from flows.stages import expert_is_current, record_expert, run_stage, stage_inputs

log = logging.getLogger("cbtm")


def _no_retry_on_user_error(task, task_run, state) -> bool:
    try:
        state.result()
    except UserInputError:
        return False
    except Exception:
        return True
    return True


ingest_task = task(ingest_corpus, name="ingest", cache_policy=NO_CACHE)
embed_task = task(embed_corpus, name="embed", cache_policy=NO_CACHE)
cluster_task = task(cluster_corpus, name="cluster", cache_policy=NO_CACHE)
tokenizer_task = task(train_tokenizer, name="tokenizer", cache_policy=NO_CACHE)
seed_task = task(build_seed, name="seed", cache_policy=NO_CACHE)
train_task = task(train_expert, name="train-expert", cache_policy=NO_CACHE, retries=2,
                  retry_condition_fn=_no_retry_on_user_error, task_run_name="train-expert-{cluster_id}")
report_task = task(write_report, name="assemble", cache_policy=NO_CACHE)


def open_run(run: RunDir, cfg: PipelineConfig) -> Manifest:
    """Create the run directory or reopen it with the current config (saved as config.toml)."""
    run.root.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(run.root)
    manifest = run.read_manifest() if run.exists() else Manifest()
    manifest.config = cfg.to_dict()
    manifest.embedder = cfg.embed.model
    manifest.n_clusters = cfg.cluster.n_clusters
    atomic_write_text(run.config_path, cfg.to_toml())
    run.write_manifest(manifest)
    return manifest


def _train_experts(cfg: PipelineConfig, run: RunDir, manifest: Manifest, cluster_ids: list[int],
                   force: bool, keep_done: bool = False) -> list[int]:
    """Train the experts of ``cluster_ids`` that are not current; returns the ids that were trained.

    ``keep_done``: the run stays usable meanwhile (retrain swaps complete experts one by one).
    """
    todo = []
    for cid in cluster_ids:
        inputs = stage_inputs(cfg, manifest, "expert", cid)
        if force or not expert_is_current(run, manifest, cid, inputs):
            todo.append((cid, inputs))
    skipped = len(cluster_ids) - len(todo)
    log.info("  train     %d expert(s) to train, %d up to date", len(todo), skipped)
    if todo and not keep_done:
        run.done_path.unlink(missing_ok=True)
    # On CPU one expert at a time uses every core; on GPUs the task runner spreads experts over devices.
    sequential = resolve_device(cfg.train.device) == "cpu"
    futures, failed = {}, {}
    for cid, inputs in todo:
        futures[cid] = (train_task.submit(cfg.train, run.seed_dir, run.corpus_path,
                                          run.clusters_dir / "assignments.parquet", cid, run.expert_dir(cid)),
                        inputs)
        if sequential:
            futures[cid][0].wait()
    for cid, (future, inputs) in futures.items():
        try:
            record_expert(run, manifest, cid, inputs, future.result())
        except UserInputError:
            raise
        except Exception as exc:  # keep every other expert; name the failed ones at the end
            failed[cid] = f"{type(exc).__name__}: {exc}"
    if failed:
        names = "; ".join(f"expert {c}: {msg}" for c, msg in failed.items())
        raise RuntimeError(f"{len(failed)} expert(s) failed for good ({names}); the others are kept; "
                           "re-run the same command to retry only these")
    run.record_stage(manifest, "train", stage_inputs(cfg, manifest, "train"),
                     hash_json({cid: e.get("hash") for cid, e in sorted(manifest.experts.items())}))
    return [cid for cid, _ in todo]


def _assemble(cfg: PipelineConfig, run: RunDir, manifest: Manifest) -> None:
    manifest.temperature = manifest.temperature or cfg.ensemble.temperature
    manifest.top_k = cfg.ensemble.top_k
    inputs = stage_inputs(cfg, manifest, "assemble")
    ran = run_stage(run, manifest, "assemble", inputs, lambda: report_task(run, manifest))
    if ran or not run.done_path.exists():
        _publish_artifacts(run, manifest)
    atomic_write_text(run.done_path, time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")


def _publish_artifacts(run: RunDir, manifest: Manifest) -> None:
    clusters = read_clusters(run.clusters_dir)["clusters"]
    create_table_artifact(key="cbtm-clusters", description=f"Clusters of {run.root}",
                          table=[{"cluster": c["cluster_id"], "train docs": c["size_train"],
                                  "keywords": ", ".join(c["keywords"][:6])} for c in clusters])
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
            "experts": {cid: {k: e.get(k) for k in ("val_loss", "train_loss", "path")}
                        for cid, e in manifest.experts.items()}}


@flow(name="build", log_prints=False, validate_parameters=False)
def build(config: dict, run_dir: str, until: str = "assemble", force: list[str] | None = None) -> dict:
    """The whole pipeline: ingest -> embed -> cluster -> tokenizer/seed + one expert per cluster -> assemble.

    Stages whose inputs and outputs are unchanged are skipped; ``until`` stops after a stage;
    ``force`` re-runs the named stages.
    """
    if until not in STAGES:
        raise UserInputError(f"--until {until!r} is not a stage: use one of {', '.join(STAGES)}")
    force = set(force or [])
    cfg = PipelineConfig.from_dict(config)
    run = RunDir(run_dir)
    manifest = open_run(run, cfg)
    log.info("run directory %s", run.root)
    steps = [
        ("ingest", lambda: ingest_task(cfg.corpus, run.corpus_path)),
        ("embed", lambda: embed_task(cfg.embed, run.corpus_path, run.embeddings_dir)),
        ("cluster", lambda: cluster_task(cfg.cluster, run.corpus_path, run.embeddings_dir, run.clusters_dir)),
    ]
    for stage, work in steps:
        run_stage(run, manifest, stage, stage_inputs(cfg, manifest, stage), work, force=stage in force)
        if until == stage:
            return summarize(run)
    run_stage(run, manifest, "tokenizer", stage_inputs(cfg, manifest, "tokenizer"),
              lambda: tokenizer_task(cfg.seed, run.corpus_path, run.tokenizer_dir), force="train" in force)
    run_stage(run, manifest, "seed", stage_inputs(cfg, manifest, "seed"),
              lambda: seed_task(cfg.seed, run.tokenizer_dir, run.seed_dir), force="train" in force)
    _train_experts(cfg, run, manifest, list(range(cfg.cluster.n_clusters)), force="train" in force)
    if until == "train":
        return summarize(run)
    _assemble(cfg, run, manifest)
    return summarize(run)


@flow(name="retrain", log_prints=False, validate_parameters=False)
def retrain(run_dir: str, cluster_ids: list[int]) -> dict:
    """Retrain the experts of ``cluster_ids`` from the seed; every other expert's files stay untouched.

    Each new expert replaces the old one atomically, so an `Ensemble` loaded before keeps using the old
    files until it calls `reload()`.
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
    _train_experts(cfg, run, manifest, list(cluster_ids), force=True, keep_done=True)
    if "assemble" in manifest.stages:
        _assemble(cfg, run, manifest)
    return summarize(run)


def default_corpus() -> Path:
    """The embedded demo corpus shipped with the project."""
    return Path(__file__).resolve().parent.parent / "data" / "demo"
