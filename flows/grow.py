"""Prefect flow `add`: grow a finished run with new documents without retraining it (`cbtm add`).

Phases, each recorded in the manifest's ``jobs["add"]`` so that a killed `cbtm add` resumes where it stopped:

1. *staged*: the new documents are ingested with the run's cleaning rules, embedded with the run's embedder
   and placed (`cluster.grow`); the grown corpus, embeddings and clusters are written to ``RUN/.cbtm-add/``.
   Nothing of the run has changed yet.
2. the new clusters' experts are trained from the run's seed (after its seed phase), and with ``--continue``
   the experts whose clusters gained documents continue on their grown sets; each is recorded the moment it
   is complete. The old experts' files are never opened for writing.
3. *swapped*: the prefix router is refitted on the grown clusters, then the staged directories replace the
   run's (renames; a resumed add finishes the ones left), the config records the new clusters and budget.
4. the report is rebuilt, the addition is recorded in ``manifest.additions``, the job is cleared.

A live `Ensemble` (or `cbtm serve`) keeps what it pinned and sees the new experts after ``reload()``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from prefect import flow

from cluster.config import CorpusConfig, GrowConfig
from cluster.corpus import ingest_corpus
from cluster.embed import load_embedder
from cluster.grow import check_embedder, new_documents, stage_growth
from experts.budget import cluster_token_counts, growth_steps
from flows.config import PipelineConfig
from flows.pipeline import assemble_run, record_config, router_task, summarize
from flows.report import label_field
from flows.training import train_experts
from ground import faults
from ground.arrays import load_npy
from ground.errors import UserInputError
from ground.files import clean_stale_temporaries, hash_path
from ground.rundir import Manifest, RunDir

log = logging.getLogger("cbtm")
STAGING = ".cbtm-add"
SWAPPED = ("corpus", "embeddings", "router", "clusters")  # clusters last: the centroids define the experts


@flow(name="add", log_prints=False, validate_parameters=False)
def add(run_dir: str, corpus: str, text_field: str | None = None, new_clusters: int | None = None,
        join_percentile: float = 95.0, from_current: bool = False, runner: str = "thread") -> dict:
    """Add the documents of ``corpus`` to the finished run at ``run_dir`` (see the module docstring);
    ``new_clusters``: None = auto; ``from_current``: continue the experts whose clusters gained documents."""
    run = RunDir(run_dir)
    grow = GrowConfig(join_percentile=join_percentile, new_clusters=new_clusters)
    with run.writing("add"):
        manifest = _finished(run)
        cfg = PipelineConfig.from_dict(manifest.config)
        corpus_cfg = dataclasses.replace(cfg.corpus, path=str(Path(corpus).resolve()),
                                         text_field=text_field or cfg.corpus.text_field)
        key = {"corpus": corpus_cfg.path, "data": hash_path(Path(corpus_cfg.path)),
               "text_field": corpus_cfg.text_field, "grow": dataclasses.asdict(grow), "continue": from_current}
        job = _job(run, manifest, key)
        if job is None:
            job = _stage(run, manifest, cfg, corpus_cfg, grow, key)
        if job["phase"] == "staged":
            _train(run, manifest, cfg, job, runner)
            _swap(run, manifest, cfg, job)
        _finish(run, manifest, job)
    return {**summarize(run), "addition": manifest.additions[-1]}


def _finished(run: RunDir) -> Manifest:
    manifest = run.read_manifest()
    if not run.done_path.exists() or "assemble" not in manifest.stages:
        if not manifest.jobs.get("add"):
            raise UserInputError(f"run {run.root} is not finished: finish it with `cbtm run --out {run.root}` first")
    if manifest.jobs.get("retrain"):
        raise UserInputError(f"run {run.root} has an interrupted `cbtm retrain` of cluster(s) "
                             f"{manifest.jobs['retrain']['clusters']}: finish it (run it again) first")
    return manifest


def _job(run: RunDir, manifest: Manifest, key: dict) -> dict | None:
    """The interrupted add to resume (it must be this one), or None to start afresh."""
    job = manifest.jobs.get("add")
    if job is None:
        shutil.rmtree(run.root / STAGING, ignore_errors=True)  # left by an add that failed before it was recorded
        return None
    if job["key"] != key:
        raise UserInputError(f"run {run.root} has an interrupted `cbtm add` of {job['key']['corpus']}: run that "
                             "command again (same flags) to finish it before adding anything else")
    log.info("  add       resuming the interrupted add (phase %s, expert(s) %s already trained)", job["phase"],
             job["done"])
    return job


def _stage(run: RunDir, manifest: Manifest, cfg: PipelineConfig, corpus_cfg: CorpusConfig, grow: GrowConfig,
           key: dict) -> dict:
    """Phase 1: the grown data under RUN/.cbtm-add, the steps of every expert to train; recorded as a job."""
    staging = run.root / STAGING
    clean_stale_temporaries(run.root)
    try:
        ingest_corpus(corpus_cfg, staging / "new" / "docs.parquet")
        added, already = new_documents(run.corpus_path, staging / "new" / "docs.parquet")
        if not len(added):
            raise UserInputError(f"every document of {corpus_cfg.path} is already in run {run.root} ({already} "
                                 "skipped): nothing to add")
        embedder = load_embedder(cfg.embed, run.embeddings_dir)
        check_embedder(embedder, run)
        k_old = len(load_npy(run.centroids_path))
        joinable = np.array([_joinable(manifest, c) for c in range(k_old)])
        summary = stage_growth(run, added, embedder, cfg.embed, cfg.cluster, grow, joinable, label_field(cfg, run),
                               staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # the run is untouched: nothing was recorded yet
        raise
    summary.update(corpus=corpus_cfg.path, already_in_run=already)
    continued = [int(c) for c in summary["joined"]] if key["continue"] else []
    steps = _steps(run, manifest, cfg, summary["new_clusters"], continued)
    job = {"key": key, "phase": "staged", "summary": summary, "steps": {str(c): s for c, s in steps.items()},
           "continued": [c for c in continued if c in steps], "done": []}
    manifest.jobs["add"] = job
    run.write_manifest(manifest)
    faults.point("add:staged")
    return job


def _joinable(manifest: Manifest, cluster_id: int) -> bool:
    entry = manifest.experts.get(str(cluster_id)) or {}
    return bool(entry) and not entry.get("skipped") and cluster_id not in manifest.removed


def _steps(run: RunDir, manifest: Manifest, cfg: PipelineConfig, new_ids: list[int],
           continued: list[int]) -> dict[int, int]:
    staging = run.root / STAGING
    branch = run.branch_dir(bool(cfg.seed_tokens()))
    k_old = len(load_npy(run.centroids_path))
    old_tokens = cluster_token_counts(branch, run.corpus_path, run.assignments_path, k_old, run.token_cache)
    grown = cluster_token_counts(branch, staging / "corpus" / run.corpus_path.name,
                                 staging / "clusters" / "assignments.parquet", k_old + len(new_ids), run.token_cache)
    old_steps = {int(c): int(e.get("steps") or 0) for c, e in manifest.experts.items()}
    seed_steps = cfg.seed_tokens() // cfg.train.tokens_per_step
    return growth_steps(cfg.train, old_steps, old_tokens, grown, new_ids, continued, seed_steps)


def _train(run: RunDir, manifest: Manifest, cfg: PipelineConfig, job: dict, runner: str) -> None:
    """Phase 2: new experts from the seed, continued ones from themselves, on the staged data."""
    staging = run.root / STAGING
    k = job["summary"]["old_clusters"] + len(job["summary"]["new_clusters"])
    grown_cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, n_clusters=k))
    data = (staging / "corpus" / run.corpus_path.name, staging / "clusters" / "assignments.parquet")
    steps = {int(c): s for c, s in job["steps"].items()}
    done = set(job["done"])
    fresh = [c for c in job["summary"]["new_clusters"] if c not in done]
    again = [c for c in job["continued"] if c not in done]
    for ids, from_current in ((fresh, False), (again, True)):
        if ids:
            train_experts(grown_cfg, run, manifest, ids, force=True, keep_done=True, runner=runner,
                          from_current=from_current, job="add", steps=steps, data=data)


def _swap(run: RunDir, manifest: Manifest, cfg: PipelineConfig, job: dict) -> None:
    """Phase 3: the router on the grown clusters, then the staged directories replace the run's."""
    staging = run.root / STAGING
    if cfg.ensemble.router == "prefix" and not job.get("router"):
        router_task(staging / "corpus" / run.corpus_path.name, staging / "clusters", run.tokenizer_dir, cfg.embed,
                    staging / "embeddings", staging / "router", run.router_cache)
        job["router"] = True
        run.write_manifest(manifest)
    _swap_dirs(run, staging)
    new_ids = job["summary"]["new_clusters"]
    trained = sum(job["steps"].values()) * cfg.train.tokens_per_step
    seed_tokens = cfg.seed_tokens()
    cfg.cluster.n_clusters += len(new_ids)
    if seed_tokens:  # the seed phase stays what it was, whatever share of the grown budget it now is
        cfg.seed.pretrain_tokens = seed_tokens
    if cfg.train.total_tokens is not None:
        cfg.train.total_tokens += trained  # the budget now includes the experts this add trained
    record_config(cfg, run, manifest)
    for stage in ("ingest", "embed", "cluster", "router"):
        if stage in manifest.stages:
            manifest.stages[stage]["outputs"] = hash_path(run.stage_output(stage))
    job["phase"] = "swapped"
    run.write_manifest(manifest)
    shutil.rmtree(staging, ignore_errors=True)


def _swap_dirs(run: RunDir, staging: Path) -> None:
    """Move every staged directory into place (idempotent: a resumed add moves the ones a kill left)."""
    trash = staging / "replaced"
    trash.mkdir(parents=True, exist_ok=True)
    for name in SWAPPED:
        staged, target = staging / name, run.root / name
        if not staged.exists():
            continue  # moved already (or not staged: a run without a prefix router)
        if target.exists():
            shutil.rmtree(trash / name, ignore_errors=True)
            os.rename(target, trash / name)
            faults.point(f"add:swap:{name}")
        os.rename(staged, target)


def _finish(run: RunDir, manifest: Manifest, job: dict) -> None:
    """Phase 4: the addition recorded and the job cleared (persisted with the assemble stage, so a kill
    before it repeats this phase), the report with the new clusters."""
    def complete(m: Manifest) -> None:
        m.additions.append({**job["summary"], "trained": job["steps"], "continued": job["continued"]})
        m.jobs.pop("add", None)

    assemble_run(PipelineConfig.from_dict(manifest.config), run, manifest, complete)
    log.info("  add       %d document(s) added: cluster(s) %s joined, new cluster(s) %s",
             job["summary"]["documents"], sorted(int(c) for c in job["summary"]["joined"]),
             job["summary"]["new_clusters"])
