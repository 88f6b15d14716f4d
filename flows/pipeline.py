"""Prefect flows: `build` (the whole pipeline) and `retrain` (one or more experts).

Each stage is a plain function from the `cluster`, `experts` or `ensemble` packages wrapped thinly as a
task; artifacts move as files in the run directory, tasks return only small summaries. The flow body is
the only writer of ``manifest.json``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.cache_policies import NO_CACHE

from cluster.choose_k import choose_k
from cluster.corpus import ingest_corpus
from cluster.config import EmbedConfig
from cluster.embed import embed_shard, load_embedder, plan_shards, stage_embedder, write_embeddings_meta
from cluster.kmeans import cluster_corpus, read_clusters
from cluster.report import clusters_table
from ensemble.device import resolve_device
from ensemble.progress import progress
from ensemble.report import write_report
from ensemble.rundir import (STAGES, Manifest, RunDir, UserInputError, atomic_write_text, clean_stale_temporaries,
                             hash_json)
from experts.budget import cluster_token_counts, steps_per_expert
from experts.seed import build_seed, pretrain_seed
from experts.tokenizer import train_tokenizer
from experts.train import train_expert
from flows.config import PipelineConfig
from flows.runners import expert_task_options, is_remote
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
train_task = task(train_expert, name="train-expert", cache_policy=NO_CACHE, retries=2,
                  retry_condition_fn=_no_retry_on_user_error, task_run_name="train-expert-{cluster_id}")
report_task = task(write_report, name="assemble", cache_policy=NO_CACHE)
choose_k_task = task(choose_k, name="choose-k", cache_policy=NO_CACHE)
pretrain_task = task(pretrain_seed, name="pretrain-seed", cache_policy=NO_CACHE)


def open_run(run: RunDir, cfg: PipelineConfig, force: set[str] = frozenset()) -> Manifest:
    """Create the run directory or reopen it.

    A run directory built from another corpus is refused unless ``ingest`` is forced. The config of an
    existing run is replaced only when a build with the new one succeeds (`record_config`), so a failed
    re-run never leaves a finished run describing a config it was not built with.
    """
    manifest = run.read_manifest() if run.exists() else Manifest()
    corpus = str(Path(cfg.corpus.path).resolve())
    previous = (manifest.config.get("corpus") or {}).get("path")
    if previous and previous != corpus and "ingest" not in force:
        raise UserInputError(f"run directory {run.root} was built from corpus {previous}, not {corpus}: "
                             "pass another --out, or --force ingest to rebuild it from this corpus")
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
    import pyarrow.parquet as pq

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


def _branch_dir(cfg: PipelineConfig, run: RunDir) -> Path:
    """Where experts branch from: the pretrained seed when there is a seed phase, else the seed."""
    return run.root / "pretrained" if cfg.seed.pretrain_tokens else run.seed_dir


def _token_cache(run: RunDir) -> Path:
    return run.root / ".cache" / "tokens"  # hidden: not part of any stage's content hash


def _train_experts(cfg: PipelineConfig, run: RunDir, manifest: Manifest, cluster_ids: list[int],
                   force: bool, keep_done: bool = False, runner: str = "thread", from_current: bool = False) -> list[int]:
    """Train the experts of ``cluster_ids`` that are not current; returns the ids that were trained.

    Steps come from the token budget (split over all clusters); ``keep_done``: the run stays usable meanwhile
    (retrain swaps complete experts one by one); ``from_current``: continue from the current experts.
    """
    assignments, branch = run.clusters_dir / "assignments.parquet", _branch_dir(cfg, run)
    counts = cluster_token_counts(branch, run.corpus_path, assignments, cfg.cluster.n_clusters, _token_cache(run))
    steps = steps_per_expert(cfg.train, counts)
    todo = []
    for cid in cluster_ids:
        inputs = stage_inputs(cfg, manifest, "expert", cid, steps[cid])
        if force or not expert_is_current(run, manifest, cid, inputs):
            todo.append((cid, inputs))
    log.info("  train     %d expert(s) to train, %d up to date", len(todo), len(cluster_ids) - len(todo))
    if todo and not keep_done:
        run.done_path.unlink(missing_ok=True)
    # On CPU one expert at a time uses every core; on GPUs (or a remote cluster) the runner spreads them.
    sequential = resolve_device(cfg.train.device) == "cpu" and not is_remote(runner)
    futures, artifact = {}, create_progress_artifact(0.0, key="cbtm-training", description=f"experts of {run.root}")
    task_ = train_task.with_options(retries=cfg.train.retries)
    for cid, inputs in todo:
        with expert_task_options(runner):
            futures[cid] = (task_.submit(cfg.train, branch, run.corpus_path, assignments, cid, run.expert_dir(cid),
                                         checkpoint_dir=run.root / "checkpoints" / str(cid), steps=steps[cid],
                                         cache_dir=_token_cache(run),
                                         init_dir=run.expert_dir(cid) if from_current else None), inputs)
        if sequential:
            futures[cid][0].wait()
    _collect_experts(run, manifest, futures, artifact)
    run.record_stage(manifest, "train", stage_inputs(cfg, manifest, "train"),
                     hash_json({cid: e.get("hash") for cid, e in sorted(manifest.experts.items())}))
    with contextlib.suppress(OSError):
        (run.root / "checkpoints").rmdir()  # only when empty: checkpoints of failed experts are kept
    return [cid for cid, _ in todo]


def _collect_experts(run: RunDir, manifest: Manifest, futures: dict, progress) -> None:
    """Record every finished expert; raise naming the experts that failed for good (the others are kept)."""
    failed = {}
    for done, (cid, (future, inputs)) in enumerate(futures.items(), start=1):
        try:
            summary = future.result()
            if summary.get("skipped"):
                log.warning("  expert %d skipped: %s; routing excludes it", cid, summary.get("reason"))
            record_expert(run, manifest, cid, inputs, summary)
        except UserInputError:
            raise
        except Exception as exc:  # keep every other expert; name the failed ones at the end
            failed[cid] = f"{type(exc).__name__}: {exc}"
        update_progress_artifact(progress, 100.0 * done / len(futures))
    if failed:
        names = "; ".join(f"expert {c}: {msg}" for c, msg in failed.items())
        raise RuntimeError(f"{len(failed)} expert(s) failed for good ({names}); the others are kept; "
                           "re-run the same command to retry only these")


def _assemble(cfg: PipelineConfig, run: RunDir, manifest: Manifest) -> None:
    manifest.temperature = manifest.temperature or cfg.ensemble.temperature
    manifest.top_k = cfg.ensemble.top_k
    inputs = stage_inputs(cfg, manifest, "assemble")
    ran = run_stage(run, manifest, "assemble", inputs, lambda: report_task(run, manifest, label_field(cfg, run)))
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
                        for cid, e in manifest.experts.items()}}


def label_field(cfg: PipelineConfig, run: RunDir) -> str | None:
    """The corpus column reports compare clusters with: corpus.label_field, else "label" or "domain"."""
    import pyarrow.parquet as pq

    names = pq.read_schema(run.corpus_path).names
    if cfg.corpus.label_field:
        if cfg.corpus.label_field not in names:
            raise UserInputError(f"corpus has no label field {cfg.corpus.label_field!r}; its fields are "
                                 f"{', '.join(names)}: fix corpus.label_field")
        return cfg.corpus.label_field
    return next((name for name in ("label", "domain") if name in names), None)


def _choose_k(cfg: PipelineConfig, run: RunDir, manifest: Manifest, force: bool) -> None:
    """`--clusters auto`: score every k of cluster.auto_k, keep the best silhouette as cluster.n_clusters."""
    out = run.root / "choose_k"
    run_stage(run, manifest, "choose_k", stage_inputs(cfg, manifest, "choose_k"),
              lambda: choose_k_task(run.embeddings_dir, run.corpus_path, cfg.cluster.auto_k, cfg.cluster.sample_size,
                                    cfg.cluster.seed, out), force=force)
    best = json.loads((out / "choose_k.json").read_text())["best_k"]
    log.info("  choose_k  best silhouette at k=%d (of %s)", best, cfg.cluster.auto_k)
    cfg.cluster.n_clusters = best  # recorded with the rest of the config when the build succeeds


@flow(name="build", log_prints=False, validate_parameters=False)
def build(config: dict, run_dir: str, until: str = "assemble", force: list[str] | None = None,
          runner: str = "thread") -> dict:
    """The whole pipeline: ingest -> embed -> cluster -> tokenizer/seed + one expert per cluster -> assemble.

    Stages whose inputs and outputs are unchanged are skipped; ``until`` stops after a stage;
    ``force`` re-runs the named stages; ``runner`` is the `--runner` spec the flow's task runner was made
    from (it decides per-task resources such as one GPU per expert on Ray).
    """
    if until not in STAGES:
        raise UserInputError(f"--until {until!r} is not a stage: use one of {', '.join(STAGES)}")
    cfg = PipelineConfig.from_dict(config)
    run = RunDir(run_dir)
    manifest = open_run(run, cfg, set(force or []))
    log.info("run directory %s", run.root)
    _build_stages(cfg, run, manifest, until, set(force or []), runner)
    record_config(cfg, run, manifest)
    return summarize(run)


def _build_stages(cfg: PipelineConfig, run: RunDir, manifest: Manifest, until: str, force: set[str],
                  runner: str) -> None:
    """Run (or skip) every stage up to and including ``until``."""
    for stage, work in [("ingest", lambda: ingest_task(cfg.corpus, run.corpus_path)),
                        ("embed", lambda: _embed(cfg, run, runner))]:
        run_stage(run, manifest, stage, stage_inputs(cfg, manifest, stage), work, force=stage in force)
        if until == stage:
            return
    if cfg.cluster.auto_k:
        _choose_k(cfg, run, manifest, force="cluster" in force)
    labels = label_field(cfg, run)
    run_stage(run, manifest, "cluster", stage_inputs(cfg, manifest, "cluster"),
              lambda: cluster_task(cfg.cluster, run.corpus_path, run.embeddings_dir, run.clusters_dir, labels),
              force="cluster" in force)
    if until == "cluster":
        return
    run_stage(run, manifest, "tokenizer", stage_inputs(cfg, manifest, "tokenizer"),
              lambda: tokenizer_task(cfg.seed, run.corpus_path, run.tokenizer_dir), force="train" in force)
    run_stage(run, manifest, "seed", stage_inputs(cfg, manifest, "seed"),
              lambda: seed_task(cfg.seed, run.tokenizer_dir, run.seed_dir), force="train" in force)
    if cfg.seed.pretrain_tokens:  # Branch-Train-Merge seed phase: train the seed on everything first
        run_stage(run, manifest, "pretrain", stage_inputs(cfg, manifest, "pretrain"),
                  lambda: pretrain_task(cfg.seed, cfg.train, run.seed_dir, run.corpus_path, run.root / "pretrained",
                                        checkpoint_dir=run.root / "checkpoints" / "seed",
                                        cache_dir=_token_cache(run)), force="train" in force)
    _train_experts(cfg, run, manifest, list(range(cfg.cluster.n_clusters)), force="train" in force, runner=runner)
    if until == "train":
        return
    _assemble(cfg, run, manifest)


@flow(name="retrain", log_prints=False, validate_parameters=False)
def retrain(run_dir: str, cluster_ids: list[int], runner: str = "thread", from_current: bool = False) -> dict:
    """Retrain the experts of ``cluster_ids`` from the seed (``from_current``: continue from the current
    expert); every other expert's files stay untouched.

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
    if from_current:
        absent = [c for c in cluster_ids if not (run.expert_dir(c) / "config.json").exists()]
        if absent:
            raise UserInputError(f"--continue needs the current expert(s) {absent}, which do not exist: "
                                 "retrain them without --continue")
    _train_experts(cfg, run, manifest, list(cluster_ids), force=True, keep_done=True, runner=runner,
                   from_current=from_current)
    if "assemble" in manifest.stages:
        _assemble(cfg, run, manifest)
    return summarize(run)


def default_corpus() -> Path:
    """The embedded demo corpus shipped with the project."""
    return Path(__file__).resolve().parent.parent / "data" / "demo"
