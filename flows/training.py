"""Training experts as Prefect tasks: one task per expert, each recorded in the manifest the moment it is done.

On a local CPU the experts train one after another (one expert uses every core); on GPUs or a remote cluster
the runner spreads them. Either way an expert enters the manifest as soon as its task returns, so a run killed
while the k-th expert trains keeps the k - 1 finished ones and trains only the rest when it is started again.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from experts.budget import cluster_token_counts, expert_budget, steps_per_expert
from experts.train import train_expert
from flows.config import PipelineConfig
from flows.runners import expert_task_options, is_remote
from flows.stages import expert_is_current, record_expert, stage_inputs
from ground import faults
from ground.device import resolve_device
from ground.errors import UserInputError
from ground.files import hash_json, user_fixable
from ground.rundir import Manifest, RunDir

log = logging.getLogger("cbtm")


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect retry condition: a failure the user must fix (bad input, permissions) is not retried."""
    try:
        state.result()
    except UserInputError:
        return False
    except Exception as exc:
        return not user_fixable(exc)
    return True


train_task = task(train_expert, name="train-expert", cache_policy=NO_CACHE, retries=2,
                  retry_condition_fn=retry_unless_user_error, task_run_name="train-expert-{cluster_id}")


def run_expert_tasks(jobs: dict[int, dict], runner: str, device: str, retries: int,
                     on_done, description: str) -> None:
    """Submit one `train_task` per ``jobs[cluster_id]`` (keyword arguments of `train_expert`) and call
    ``on_done(cluster_id, summary)`` as each finishes (in the flow's thread: the only manifest writer).

    Raises the first UserInputError at once; other failures are collected and raised together at the end,
    naming the experts, after every other expert was recorded.
    """
    sequential = resolve_device(device) == "cpu" and not is_remote(runner)
    artifact = create_progress_artifact(0.0, key="cbtm-training", description=description)
    task_ = train_task.with_options(retries=retries)
    failed, done = {}, 0

    def collect(cid, future):
        nonlocal done
        try:
            on_done(cid, future.result())
        except UserInputError:
            raise
        except Exception as exc:  # keep every other expert; name the failed ones at the end
            if user_fixable(exc):  # permissions, a full disk: retrying cannot help, the user must act
                raise UserInputError(f"expert {cid}: {exc.strerror}: {exc.filename}: fix it, then run the same "
                                     "command again") from exc
            failed[cid] = f"{type(exc).__name__}: {exc}"
        done += 1
        update_progress_artifact(artifact, 100.0 * done / len(jobs))

    pending = {}
    for cid, kwargs in jobs.items():
        with expert_task_options(runner):
            future = task_.submit(**kwargs)
        if sequential:
            future.wait()
            collect(cid, future)
        else:
            pending[future] = cid
    for future in as_completed(list(pending)):
        collect(pending[future], future)
    if failed:
        names = "; ".join(f"expert {c}: {msg}" for c, msg in failed.items())
        raise RuntimeError(f"{len(failed)} expert(s) failed for good ({names}); the others are kept; "
                           "re-run the same command to retry only these")


def train_experts(cfg: PipelineConfig, run: RunDir, manifest: Manifest, cluster_ids: list[int], force: bool,
                  keep_done: bool = False, runner: str = "thread", from_current: bool = False,
                  job: str | None = None, steps: dict[int, int] | None = None,
                  data: tuple[Path, Path] | None = None) -> list[int]:
    """Train the experts of ``cluster_ids`` that are not current; returns the ids that were trained.

    Steps come from the token budget (split over all clusters) unless ``steps`` gives them; ``keep_done``: the
    run stays usable meanwhile (retrain swaps complete experts one by one); ``from_current``: continue from the
    current experts; ``job``: the manifest job each finished expert is marked done in; ``data``: (corpus,
    assignments) to train on instead of the run's (`cbtm add` trains on the grown run before it is swapped in).
    """
    seed_tokens = cfg.seed_tokens()
    branch = run.branch_dir(bool(seed_tokens))
    corpus_path, assignments_path = data or (run.corpus_path, run.assignments_path)
    if steps is None:
        counts = cluster_token_counts(branch, corpus_path, assignments_path, cfg.cluster.n_clusters, run.token_cache)
        steps = steps_per_expert(expert_budget(cfg.train, seed_tokens, cfg.cluster.n_clusters), counts)
    todo = {}
    for cid in cluster_ids:
        inputs = stage_inputs(cfg, manifest, "expert", cid, steps[cid])
        if force or not expert_is_current(run, manifest, cid, inputs):
            todo[cid] = inputs
    log.info("  train     %d expert(s) to train, %d up to date", len(todo), len(cluster_ids) - len(todo))
    if todo and not keep_done:
        run.done_path.unlink(missing_ok=True)
    jobs = {cid: dict(cfg=cfg.train.branched(bool(seed_tokens)), seed_dir=branch, corpus_path=corpus_path,
                      assignments_path=assignments_path, cluster_id=cid, out_dir=run.expert_dir(cid),
                      checkpoint_dir=run.checkpoint_dir(cid), steps=steps[cid], cache_dir=run.token_cache,
                      init_dir=run.expert_dir(cid) if from_current else None) for cid in todo}

    def on_done(cid: int, summary: dict) -> None:
        if summary.get("skipped"):
            log.warning("  expert %d skipped: %s; routing excludes it", cid, summary.get("reason"))
        record_expert(run, manifest, cid, todo[cid], summary, job=job)

    run_expert_tasks(jobs, runner, cfg.train.device, cfg.train.retries, on_done, f"experts of {run.root}")
    run.record_stage(manifest, "train", stage_inputs(cfg, manifest, "train"),
                     hash_json({cid: e.get("hash") for cid, e in sorted(manifest.experts.items())}))
    faults.point("stage:train")
    with contextlib.suppress(OSError):
        run.checkpoints_root.rmdir()  # only when empty: checkpoints of failed experts are kept
    return list(todo)


def default_corpus() -> Path:
    """The embedded demo corpus shipped with the project."""
    return Path(__file__).resolve().parent.parent / "data" / "demo"
