"""Runs derived from a finished run: the same corpus, embeddings, tokenizer and seed, other clusters.

The evaluation baselines (`cbtm eval --baselines dense,random`) are derived runs under ``RUN/baselines/NAME``,
trained by the same `train_expert` at the same total token budget as the run's experts:

- ``dense``: one cluster holding every training document (k = 1, the model c-BTM competes with);
- ``random``: clusters of the run's training sizes with documents drawn at random.

A derived run is a complete run directory (`Ensemble.load` and `cbtm query` open it); it is cached like a
stage: its clusters and each expert are rebuilt only when their inputs change. Its route temperature is tuned
on the parent's held-out documents as the parent's was (`flows.tuning`), so that each system is compared at
its own best. Nothing here imports Prefect.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq

from cluster.fixed import fixed_clusters, random_train_labels
from ensemble.prefix_router import router_is_current
from experts.budget import cluster_token_counts, steps_per_expert
from experts.config import TrainConfig
from experts.train import train_expert
from flows.config import PipelineConfig
from flows.routing_stage import train_router
from flows.stages import expert_is_current, record_expert
from flows.tuning import tune_inputs, tune_stage
from ground.errors import UserInputError
from ground.files import atomic_write_text, hash_json, hash_path, read_json
from ground.rundir import Manifest, RunDir, hashed_settings

log = logging.getLogger("cbtm")
BASELINES = ("dense", "random")


@dataclass
class DerivedPlan:
    """What training a derived run needs: its directory, budget split and the experts still to train."""

    parent: RunDir
    run: RunDir
    manifest: Manifest
    train: TrainConfig
    branch_dir: Path
    steps: dict[int, int]
    inputs: dict[int, str]
    todo: list[int]
    seed_tokens: int  # the parent's shared seed phase, which every expert here branches after (0: none)

    def train_kwargs(self, cluster_id: int) -> dict:
        """Keyword arguments of `experts.train.train_expert` for one expert of this run."""
        return dict(cfg=self.train, seed_dir=self.branch_dir, corpus_path=self.parent.corpus_path,
                    assignments_path=self.run.clusters_dir / "assignments.parquet", cluster_id=cluster_id,
                    out_dir=self.run.expert_dir(cluster_id), steps=self.steps[cluster_id],
                    checkpoint_dir=self.run.checkpoint_dir(cluster_id), cache_dir=self.parent.token_cache)


def parse_baselines(spec: str | list[str] | None) -> list[str]:
    """``"dense,random"`` (or a list) -> validated names, in the given order without repeats."""
    names = spec.split(",") if isinstance(spec, str) else list(spec or [])
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    bad = [n for n in names if n not in BASELINES]
    if bad:
        raise UserInputError(f"unknown baseline {bad[0]!r}: use any of {','.join(BASELINES)} (comma-separated)")
    return names


def finished_parent(parent: RunDir) -> tuple[Manifest, PipelineConfig]:
    """The parent run's manifest and config; raises naming the experts that are not trained."""
    manifest = parent.read_manifest()
    cfg = PipelineConfig.from_dict(manifest.config)
    if "cluster" not in manifest.stages:
        raise UserInputError(f"run {parent.root} has no clusters yet: finish it with `cbtm run --out {parent.root}`")
    missing = [c for c in range(cfg.cluster.n_clusters)
               if c not in manifest.removed  # opted out (`cbtm remove`, its files perhaps deleted): not routed to
               and not (manifest.experts.get(str(c), {}).get("skipped")
                        or (parent.expert_dir(c) / "config.json").exists() and str(c) in manifest.experts)]
    if missing:
        raise UserInputError(f"run {parent.root} has no trained expert for cluster(s) {missing}: train them with "
                             f"`cbtm run --out {parent.root}` (or `cbtm retrain {parent.root} --cluster N`); "
                             "nothing was evaluated")
    return manifest, cfg


def spent_tokens(manifest: Manifest, cfg: PipelineConfig) -> int:
    """Training tokens the run's experts were given: the sum of their steps x tokens per step."""
    return sum(int(e.get("steps") or 0) for e in manifest.experts.values()) * cfg.train.tokens_per_step


def seed_phase_tokens_trained(parent: RunDir, cfg: PipelineConfig) -> int:
    """Tokens the parent's shared seed phase trained on (0 without one): the ensemble's and every baseline's."""
    summary = parent.pretrained_dir / "expert.json"
    return int(read_json(summary).get("tokens") or 0) if cfg.seed_tokens() and summary.exists() else 0


def baseline_labels(parent: RunDir, kind: str, seed: int = 0) -> tuple[np.ndarray, int]:
    """(training assignment int32 [n_train] in corpus order, number of clusters) of a baseline."""
    table = pq.read_table(parent.clusters_dir / "assignments.parquet", columns=["split", "train_cluster_id"])
    train = np.array(table.column("split").to_pylist()) == "train"
    labels = table.column("train_cluster_id").to_numpy()[train].astype(np.int32)
    if kind == "dense":
        return np.zeros_like(labels), 1
    return random_train_labels(labels, seed), int(labels.max()) + 1


def plan_derived(parent: RunDir, root: Path, name: str, clusters_key: dict, n_clusters: int,
                 make_clusters: Callable[[Path], object], total_tokens: int | None = None,
                 cluster_overrides: dict | None = None) -> DerivedPlan:
    """Prepare (or reuse) the derived run at ``root`` and work out which experts still need training.

    ``make_clusters(out_dir)`` writes the clusters (the files of `cluster.kmeans.cluster_corpus`);
    ``clusters_key`` identifies them for caching. ``total_tokens`` (default: what the parent's experts were
    given) is split over the new clusters as the parent's budget was.
    """
    pm, cfg = finished_parent(parent)
    total = spent_tokens(pm, cfg) if total_tokens is None else total_tokens
    up = lambda s: (pm.stages.get(s) or {}).get("outputs")  # noqa: E731
    key = hash_json({"clusters": clusters_key, "ingest": up("ingest"), "embed": up("embed")})
    train = dataclasses.replace(cfg.train.branched(bool(cfg.seed_tokens())), total_tokens=total)
    if total < train.tokens_per_step:  # before any file of the derived run is written
        raise UserInputError(f"{name}: train.total_tokens={total:,} is less than one step: give at least "
                             f"{train.tokens_per_step:,} tokens (batch_size x block_size x grad_accum)")
    run = RunDir(root)
    manifest = _derived_manifest(parent, pm, cfg, run, key, n_clusters, cluster_overrides or {}, make_clusters)
    branch = parent.branch_dir(bool(cfg.seed_tokens()))
    steps = _steps(parent, branch, run, train, n_clusters, name)
    inputs = {c: hash_json({"train": hashed_settings(train), "seed": up("seed"), "pretrain": up("pretrain"),
                            "clusters": key, "cluster_id": c, "steps": steps[c]}) for c in range(n_clusters)}
    todo = [c for c in range(n_clusters) if not expert_is_current(run, manifest, c, inputs[c])]
    if todo:
        run.done_path.unlink(missing_ok=True)
    log.info("  %-9s %d expert(s) to train, %d up to date (%s tokens)", name, len(todo), n_clusters - len(todo),
             f"{total:,}")
    return DerivedPlan(parent, run, manifest, train, branch, steps, inputs, todo,
                       seed_phase_tokens_trained(parent, cfg))


def _derived_manifest(parent: RunDir, pm: Manifest, cfg: PipelineConfig, run: RunDir, key: str, n_clusters: int,
                      cluster_overrides: dict, make_clusters: Callable[[Path], object]) -> Manifest:
    """The derived run's manifest; (re)writes its clusters and shared files when they are not current."""
    if run.exists():
        manifest = run.read_manifest()
        record = manifest.stages.get("cluster") or {}
        if record.get("inputs") == key and hash_path(run.clusters_dir) == record.get("outputs"):
            if cfg.ensemble.router == "prefix" and not router_is_current(run.router_dir):  # cbtm's router changed
                _fit_router(parent, cfg, run)
            return manifest
        shutil.rmtree(run.root)
    derived_cfg = cfg.to_dict()
    derived_cfg["cluster"] = {**derived_cfg["cluster"], **cluster_overrides, "n_clusters": n_clusters}
    routing = {k: v for k, v in pm.routing.items() if v.get("source") != "auto"}  # tuned for its own experts
    routing["top_k"] = {"value": min(pm.routing_value("top_k") or 1, n_clusters), "source": "config"}
    manifest = Manifest(config=derived_cfg, embedder=pm.embedder, routing=routing, n_clusters=n_clusters)
    run.root.mkdir(parents=True, exist_ok=True)
    make_clusters(run.clusters_dir)
    # Routing and loading read these from the run directory itself; the seed's weights stay in the parent.
    shutil.copytree(parent.tokenizer_dir, run.tokenizer_dir, dirs_exist_ok=True)
    run.seed_dir.mkdir(exist_ok=True)
    for f in parent.seed_dir.glob("*.json"):
        shutil.copy2(f, run.seed_dir / f.name)
    if (parent.embeddings_dir / "tfidf").is_dir():
        shutil.copytree(parent.embeddings_dir / "tfidf", run.embeddings_dir / "tfidf", dirs_exist_ok=True)
    if cfg.ensemble.router == "prefix":  # its own clusters: its own router
        _fit_router(parent, cfg, run)
    run.record_stage(manifest, "cluster", key, hash_path(run.clusters_dir))
    return manifest


def _fit_router(parent: RunDir, cfg: PipelineConfig, run: RunDir) -> None:
    train_router(parent.corpus_path, run.clusters_dir, run.tokenizer_dir, cfg.embed, parent.embeddings_dir,
                 run.router_dir, parent.router_cache)


def _steps(parent: RunDir, branch: Path, run: RunDir, train: TrainConfig, n_clusters: int, name: str) -> dict:
    counts = cluster_token_counts(branch, parent.corpus_path, run.clusters_dir / "assignments.parquet", n_clusters,
                                  parent.root / ".cache" / "tokens")
    try:
        steps = steps_per_expert(train, counts)
    except UserInputError as exc:
        raise UserInputError(f"{name}: {exc}") from None
    if not any(steps.values()):
        raise UserInputError(f"{name}: the budget of {train.total_tokens:,} tokens trains no expert (every cluster "
                             f"has fewer than train.block_size={train.block_size} tokens)")
    return steps


def record_derived_expert(plan: DerivedPlan, cluster_id: int, summary: dict) -> None:
    record_expert(plan.run, plan.manifest, cluster_id, plan.inputs[cluster_id], summary)


def finish_derived(plan: DerivedPlan) -> RunDir:
    """Mark the derived run complete (train and assemble stages, DONE last) once every expert is recorded."""
    run, manifest = plan.run, plan.manifest
    hashes = {c: manifest.experts.get(str(c), {}).get("hash") for c in sorted(plan.inputs)}
    run.record_stage(manifest, "train", hash_json(plan.inputs), hash_json(hashes))
    run.record_stage(manifest, "assemble", hash_json(hashes), None)
    shutil.rmtree(run.checkpoints_root, ignore_errors=True)
    parent = plan.parent.read_manifest()
    manifest.config["ensemble"] = dict(parent.config["ensemble"])  # routing settings (tune_docs) as the parent's
    cfg = PipelineConfig.from_dict(manifest.config)
    router = hash_path(run.router_dir) if cfg.ensemble.router == "prefix" else None
    ingest = (parent.stages.get("ingest") or {}).get("outputs")
    tune_stage(run, manifest, cfg, plan.parent.corpus_path, tune_inputs(cfg, manifest, router, ingest))
    atomic_write_text(run.done_path, time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
    return run


def build_derived(plan: DerivedPlan, show_progress: bool = True) -> RunDir:
    """Train the plan's experts one after another in this process, then finish the run."""
    for cid in plan.todo:
        record_derived_expert(plan, cid, train_expert(**plan.train_kwargs(cid), show_progress=show_progress))
    return finish_derived(plan)


def plan_baseline(parent: RunDir, kind: str, seed: int = 0) -> DerivedPlan:
    """The ``dense`` or ``random`` baseline of ``parent`` under ``parent/baselines/KIND``."""
    parse_baselines([kind])
    finished_parent(parent)
    labels, k = baseline_labels(parent, kind, seed)
    pm = parent.read_manifest()
    return plan_derived(parent, parent.baseline_dir(kind), f"baseline {kind}",
                        {"kind": kind, "seed": seed,
                         "cluster": (pm.stages.get("cluster") or {}).get("outputs") if kind == "random" else None},
                        k, lambda out: fixed_clusters(parent.corpus_path, parent.embeddings_dir, labels, k, out),
                        cluster_overrides={"balanced": False})
