"""`cbtm add | remove | restore`: grow a finished run, or take experts out of routing and put them back."""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from cluster.config import CorpusConfig, GrowConfig
from cluster.corpus import check_corpus
from flows.api_server import api_server
from flows.commands import print_summary
from flows.config import PipelineConfig
from flows.grow import add
from flows.runners import task_runner
from ground.arrays import load_npy
from ground.errors import UserInputError
from ground.files import hash_path
from ground.rundir import RunDir

log = logging.getLogger("cbtm")


def parse_new_clusters(value: str) -> int | None:
    """``--new-clusters``: "auto" -> None, else a whole number >= 0."""
    if value == "auto":
        return None
    if not value.isdigit():
        raise UserInputError(f"--new-clusters {value!r} must be auto or a whole number >= 0")
    return int(value)


def cmd_add(args) -> int:
    run = RunDir(args.run_dir)
    manifest = run.read_manifest()
    cfg = PipelineConfig.from_dict(manifest.config)
    new_clusters = parse_new_clusters(args.new_clusters)
    GrowConfig(join_percentile=args.join_percentile, new_clusters=new_clusters)  # validated before Prefect starts
    if not Path(args.corpus).exists():
        raise UserInputError(f"corpus {args.corpus} does not exist: pass --corpus with a JSONL, Parquet or CSV "
                             "file or a directory of them")
    corpus = dataclasses.replace(cfg.corpus, path=str(Path(args.corpus).resolve()),
                                 text_field=args.text_field or cfg.corpus.text_field)
    CorpusConfig(**dataclasses.asdict(corpus))  # validated before Prefect starts
    if not manifest.jobs.get("add"):
        check_corpus(corpus)  # opens, has the text field, is not empty
    runner = task_runner(args.runner)
    with api_server():
        summary = add.with_options(task_runner=runner)(str(run.root), corpus.path, corpus.text_field, new_clusters,
                                                       args.join_percentile, args.from_current, args.runner)
    a = summary["addition"]
    print(f"Added {a['documents']} document(s) from {a['corpus']} ({a['already_in_run']} already in the run): "
          f"{sum(a['joined'].values())} training document(s) joined cluster(s) "
          f"{', '.join(a['joined']) or 'none'} (within their {a['join_percentile']:g}th percentile of distances); "
          f"new cluster(s) {', '.join(map(str, a['new_clusters'])) or 'none'}"
          + (f"; continued expert(s) {', '.join(map(str, a['continued']))}" if a["continued"] else ""))
    print_summary(summary)
    return 0


def _check_ids(run: RunDir, ids: list[int]) -> None:
    n = len(_centroid_count(run))
    bad = [c for c in ids if not 0 <= c < n]
    if bad:
        raise UserInputError(f"cluster(s) {bad} do not exist: run {run.root} has clusters 0..{n - 1}")


def _centroid_count(run: RunDir) -> range:
    if not run.centroids_path.exists():
        raise UserInputError(f"run {run.root} has no clusters: finish it with `cbtm run --out {run.root}`")
    return range(len(load_npy(run.centroids_path, mmap_mode="r")))


def cmd_remove(args) -> int:
    run = RunDir(args.run_dir)
    ids = sorted(set(args.cluster))
    with run.writing("remove"):
        manifest = run.read_manifest()
        _check_ids(run, ids)
        again = [c for c in ids if c in manifest.removed]
        if again:
            raise UserInputError(f"cluster(s) {again} are already removed: `cbtm restore {run.root} --cluster N` "
                                 "brings one back")
        untrained = [c for c in ids if not (manifest.experts.get(str(c)) or {}).get("hash")]
        if untrained:
            raise UserInputError(f"cluster(s) {untrained} have no trained expert: nothing to remove")
        left = [c for c in _centroid_count(run) if c not in {*manifest.removed, *ids}
                and (manifest.experts.get(str(c)) or {}).get("hash")]
        if not left:
            raise UserInputError(f"removing {ids} would leave run {run.root} no expert to route to: keep one")
        manifest.removed = sorted({*manifest.removed, *ids})
        if args.delete:
            for c in ids:
                manifest.experts[str(c)]["deleted"] = True
        run.write_manifest(manifest)  # routing stops first, then the files go
        if args.delete:
            for c in ids:
                shutil.rmtree(run.expert_dir(c), ignore_errors=True)
    what = "removed and deleted" if args.delete else "removed (files kept; `cbtm restore` brings them back)"
    print(f"Expert(s) {', '.join(map(str, ids))} of {run.root} {what}. Routing uses expert(s) "
          f"{', '.join(map(str, left))}; a running server picks this up on POST /v1/reload or SIGHUP.")
    return 0


def cmd_restore(args) -> int:
    run = RunDir(args.run_dir)
    ids = sorted(set(args.cluster))
    with run.writing("restore"):
        manifest = run.read_manifest()
        _check_ids(run, ids)
        active = [c for c in ids if c not in manifest.removed]
        if active:
            raise UserInputError(f"cluster(s) {active} are not removed: nothing to restore")
        for c in ids:
            entry = manifest.experts.get(str(c)) or {}
            if not run.expert_dir(c).exists() or hash_path(run.expert_dir(c)) != entry.get("hash"):
                why = "were deleted (--delete)" if entry.get("deleted") else "are missing or changed"
                raise UserInputError(f"expert {c}'s files {why}: train it again with `cbtm retrain {run.root} "
                                     f"--cluster {c}`, then restore it")
        manifest.removed = [c for c in manifest.removed if c not in ids]
        run.write_manifest(manifest)
    print(f"Expert(s) {', '.join(map(str, ids))} of {run.root} restored: routed to again (a running server: "
          "POST /v1/reload or SIGHUP).")
    return 0
