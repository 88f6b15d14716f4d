"""Stage bookkeeping shared by the flows: input hashes, "is this stage current?", running a stage.

A stage is skipped when the manifest records it with the same input hash *and* its outputs on disk still
hash to what was recorded (a deleted or edited artifact is rebuilt). Which artifact records a stage is
`RunDir.stage_output`; which settings never count is `ground.rundir.NOT_HASHED`. Nothing here imports Prefect.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Callable

from cluster.embed import release_embed_dir
from ensemble.prefix_router import VERSION as ROUTER_VERSION
from flows.config import PipelineConfig
from ground import faults
from ground.files import hash_json, hash_path, model_files
from ground.rundir import Manifest, RunDir, hashed_settings

log = logging.getLogger("cbtm")

# The manifest records each `cbtm run --force STAGE` makes run again.
FORCED_RECORDS = {"ingest": ("ingest",), "embed": ("embed",), "cluster": ("choose_k", "cluster", "router"),
                  "train": ("tokenizer", "seed", "pretrain", "train"), "assemble": ("tune", "assemble")}


def _seed_settings(cfg: PipelineConfig) -> dict:
    # The seed phase (its tokens) is the pretrain stage's input, not the tokenizer's or the seed's.
    return {k: v for k, v in hashed_settings(cfg.seed).items() if k not in ("pretrain_tokens", "pretrain_share")}


def stage_inputs(cfg: PipelineConfig, manifest: Manifest, stage: str, cluster_id: int | None = None,
                 steps: int | None = None) -> str:
    """Content hash of everything ``stage`` depends on: its config section and its inputs' output hashes."""
    up = lambda name: (manifest.stages.get(name) or {}).get("outputs")  # noqa: E731
    if stage == "ingest":
        return hash_json({"cfg": hashed_settings(cfg.corpus), "data": hash_path(Path(cfg.corpus.path))})
    if stage == "embed":
        return hash_json({"cfg": hashed_settings(cfg.embed), "ingest": up("ingest")})
    if stage == "choose_k":
        return hash_json({"k": cfg.cluster.auto_k, "sample": cfg.cluster.sample_size, "seed": cfg.cluster.seed,
                          "embed": up("embed")})
    if stage == "cluster":
        return hash_json({"cfg": hashed_settings(cfg.cluster), "embed": up("embed"),
                          "label_field": cfg.corpus.label_field})
    if stage in ("tokenizer", "seed"):
        prev = up("ingest") if stage == "tokenizer" else up("tokenizer")
        return hash_json({"cfg": _seed_settings(cfg), "up": prev})
    if stage == "pretrain":
        # The branches' learning rate is not the seed phase's input.
        train = {k: v for k, v in hashed_settings(cfg.train).items() if k != "branch_lr_ratio"}
        return hash_json({"tokens": cfg.seed_tokens(), "train": train,
                          "seed": up("seed")})
    if stage == "expert":
        return hash_json({"cfg": hashed_settings(cfg.train), "seed": up("seed"), "cluster": up("cluster"),
                          "pretrain": up("pretrain") if cfg.seed_tokens() else None,
                          "ingest": up("ingest"), "cluster_id": cluster_id, "steps": steps})
    if stage == "train":
        return hash_json({cid: e.get("inputs") for cid, e in sorted(manifest.experts.items())})
    if stage == "router":
        return hash_json({"router": cfg.ensemble.router, "version": ROUTER_VERSION, "cluster": up("cluster"),
                          "tokenizer": up("tokenizer")})
    if stage == "assemble":
        return hash_json({"cfg": hashed_settings(cfg.ensemble), "train": up("train"), "cluster": up("cluster"),
                          "router": up("router") if cfg.ensemble.router == "prefix" else None,
                          "tune": up("tune")})  # the report names the temperature chosen
    raise ValueError(f"unknown stage {stage!r}")


def start_forced(run: RunDir, manifest: Manifest, force: set[str]) -> None:
    """Begin `cbtm run --force STAGE...`: the records of the forced stages (for train, every expert's too) are
    marked ``forced``, so they are not current until they run again, once. The job is recorded: the same command
    re-run after a kill or Ctrl-C resumes it, keeping what it finished, instead of forcing those stages again.
    Forced means recomputed, not resumed from an earlier build: its embedding shards and training checkpoints
    go first (a kill before the manifest is written just repeats this)."""
    job = {"force": sorted(force)}
    if not force or manifest.jobs.get("run") == job:
        if force:
            log.info("  resuming the interrupted `--force %s` build: what it finished is kept",
                     " --force ".join(job["force"]))
        return
    if "embed" in force:
        release_embed_dir(run.embeddings_dir)
    if "train" in force:
        shutil.rmtree(run.checkpoints_root, ignore_errors=True)
    records = [manifest.stages[name] for stage in force for name in FORCED_RECORDS[stage] if name in manifest.stages]
    if "train" in force:
        records += [entry for entry in manifest.experts.values() if not entry.get("deleted")]
    for record in records:
        record["forced"] = True
    manifest.jobs["run"] = job
    run.write_manifest(manifest)


def is_current(run: RunDir, manifest: Manifest, stage: str, inputs: str) -> bool:
    record = manifest.stages.get(stage)
    if not record or record.get("forced") or record.get("inputs") != inputs:
        return False
    return hash_path(run.stage_output(stage)) == record.get("outputs")


def expert_is_current(run: RunDir, manifest: Manifest, cluster_id: int, inputs: str) -> bool:
    entry = manifest.experts.get(str(cluster_id))
    if not entry or entry.get("forced") or entry.get("inputs") != inputs:
        return False
    if entry.get("skipped"):
        return True  # too little data for one block: nothing to train with these inputs
    return hash_path(run.expert_dir(cluster_id)) == entry.get("hash")


def run_stage(run: RunDir, manifest: Manifest, stage: str, inputs: str, work: Callable[[], object],
              force: bool = False) -> bool:
    """Run ``work`` unless ``stage`` is current; record it in the manifest. Returns True if it ran."""
    if not force and is_current(run, manifest, stage, inputs):
        log.info("  %-9s up to date, skipped", stage)
        return False
    out = run.stage_output(stage)
    record = manifest.stages.get(stage)
    if record and record.get("inputs") != inputs and out.is_dir():
        shutil.rmtree(out)  # stale outputs of other inputs (e.g. embedding shards) must not be resumed
    started = time.perf_counter()
    work()
    run.record_stage(manifest, stage, inputs, hash_path(out))
    log.info("  %-9s done in %.1fs", stage, time.perf_counter() - started)
    faults.point(f"stage:{stage}")
    return True


EXPERT_KEYS = ("steps", "tokens", "train_loss", "val_loss", "seconds", "device", "tokens_per_s", "resumed_from")


def record_expert(run: RunDir, manifest: Manifest, cluster_id: int, inputs: str, summary: dict,
                  job: str | None = None) -> None:
    """Enter a trained (or skipped) expert in the manifest's cluster id -> expert table, and persist it.

    Called the moment the expert is complete, so a killed run keeps it. The entry holds the content hash of
    the expert directory and the size and sha256 of its model files (checked when an `Ensemble` loads it).
    A skipped expert (its cluster had too few tokens for one block) has no files; routing excludes it.
    ``job``: the manifest job (e.g. "retrain") that this expert completes a part of, in the same write.
    """
    skipped = bool(summary.get("skipped"))
    expert_dir = run.expert_dir(cluster_id)
    manifest.experts[str(cluster_id)] = {
        "path": expert_dir.relative_to(run.root).as_posix(), "inputs": inputs,
        "hash": None if skipped else hash_path(expert_dir), "files": {} if skipped else model_files(expert_dir),
        "skipped": skipped, **({"reason": summary.get("reason")} if skipped else {}),
        **{k: summary.get(k) for k in EXPERT_KEYS}}
    if skipped:
        shutil.rmtree(expert_dir, ignore_errors=True)  # an older expert must not be served
    if job and job in manifest.jobs:
        manifest.jobs[job]["done"] = sorted({*manifest.jobs[job]["done"], int(cluster_id)})
    run.write_manifest(manifest)
    faults.point(f"expert:{run.root.name}:{cluster_id}")


def forget_earlier_clusters(run: RunDir, manifest: Manifest, n_clusters: int) -> None:
    """After the cluster stage found other clusters than the run's experts were trained on: the run is no longer
    finished (DONE goes first), experts of cluster ids beyond ``n_clusters`` are dropped from the manifest and
    then from disk (a budget summed over the manifest, such as the baselines', would count them), and removals
    by `cbtm remove`, which named clusters of the earlier clustering, are cleared with a warning."""
    run.done_path.unlink(missing_ok=True)
    # Deleted by `cbtm remove --delete` (no files): under the new clusters that id is another expert to train.
    gone = sorted(int(c) for c, e in manifest.experts.items() if int(c) >= n_clusters or e.get("deleted"))
    for cid in gone:
        del manifest.experts[str(cid)]
    cleared, manifest.removed = manifest.removed, []
    run.write_manifest(manifest)  # no entry names the files removed below
    for cid in gone:
        shutil.rmtree(run.expert_dir(cid), ignore_errors=True)
        shutil.rmtree(run.checkpoint_dir(cid), ignore_errors=True)
    beyond = [c for c in gone if c >= n_clusters]
    if beyond:
        log.info("  cluster   %d cluster(s) now: expert(s) %s of the earlier clustering deleted", n_clusters,
                 ", ".join(map(str, beyond)))
    if cleared:
        log.warning("  cluster   expert(s) %s were removed from routing (`cbtm remove`) under the earlier "
                    "clustering; those ids now name other clusters, so every expert is routed to again: remove "
                    "again with `cbtm remove %s --cluster N` after this build", ", ".join(map(str, cleared)),
                    run.root)
