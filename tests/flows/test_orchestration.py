"""Retries, failures that keep the other experts, runner specs, and the same build on Ray as on threads."""
import os
import shutil
import signal

import numpy as np
import pyarrow.parquet as pq
import pytest

from experts.budget import expert_budget
from flows import pipeline, training
from flows.cli import main
from flows.runners import check_reachable, parse_spec
from ground import faults
from ground.errors import UserInputError
from tests.conftest import tiny_config


@pytest.fixture
def flaky_training(monkeypatch):
    """Make the training task fail for chosen clusters: ``fail[cid] = n`` fails its first n attempts."""
    original, fail, calls = training.train_task.fn, {}, []

    def flaky(cfg, seed_dir, corpus_path, assignments_path, cluster_id, out_dir, **kwargs):
        calls.append(cluster_id)
        if fail.get(cluster_id, 0) > 0:
            fail[cluster_id] -= 1
            raise RuntimeError(f"simulated crash of expert {cluster_id}")
        return original(cfg, seed_dir, corpus_path, assignments_path, cluster_id, out_dir, **kwargs)

    monkeypatch.setattr(training.train_task, "fn", flaky)
    return fail, calls


def test_a_task_that_fails_once_is_retried_and_the_flow_succeeds(built_run, slice_corpus, tmp_path,
                                                                  flaky_training):
    fail, calls = flaky_training
    run_dir = shutil.copytree(built_run, tmp_path / "run")
    shutil.rmtree(run_dir / "experts" / "0")
    fail[0] = 1
    pipeline.build(tiny_config(slice_corpus).to_dict(), str(run_dir))
    assert calls == [0, 0] and (run_dir / "experts" / "0" / "model.safetensors").exists()


def test_an_expert_failing_for_good_is_named_and_the_others_are_kept(built_run, slice_corpus, tmp_path,
                                                                     flaky_training):
    fail, calls = flaky_training
    run_dir = shutil.copytree(built_run, tmp_path / "run")
    cfg = tiny_config(slice_corpus).with_overrides(["train.steps=60"])  # every expert must retrain
    fail[1] = 99
    with pytest.raises(RuntimeError, match="expert 1"):
        pipeline.build(cfg.to_dict(), str(run_dir))
    assert calls.count(1) == 3  # first try + 2 retries
    manifest = pipeline.RunDir(run_dir).read_manifest()
    new = expert_budget(cfg.train, cfg.seed_tokens(), 3).steps  # 60 steps each, less the seed phase's share
    assert manifest.experts["0"]["steps"] == new and manifest.experts["2"]["steps"] == new
    assert manifest.experts["1"]["steps"] != new  # the old expert 1 is still there, untouched
    assert not (run_dir / "DONE").exists()


@pytest.mark.parametrize("spec", ["warp", "thread=x", "ray=", "process=host:1"])
def test_unknown_runner_specs(spec):
    with pytest.raises(UserInputError, match="unknown runner"):
        parse_spec(spec)


def test_unreachable_cluster_address_fails_fast_with_the_address():
    with pytest.raises(UserInputError, match="127.0.0.1:9"):
        check_reachable("ray", "127.0.0.1:9", timeout=2)
    assert main(["run", "--runner", "dask=127.0.0.1:9"]) == 2


def slice_corpus_copy_source(run_dir):
    """Any JSONL with a text field that is not the run's corpus file: the run's own documents, re-exported."""
    import json

    path = run_dir.parent / "reexported.jsonl"
    rows = pq.read_table(run_dir / "corpus" / "docs.parquet", columns=["text"]).to_pylist()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_run_directory_from_another_corpus_is_refused(built_run, tmp_path, capsys):
    run_dir = shutil.copytree(built_run, tmp_path / "run")
    other = shutil.copy(slice_corpus_copy_source(run_dir), tmp_path / "other.jsonl")
    assert main(["run", "--corpus", str(other), "--out", str(run_dir), "--clusters", "3"]) == 2
    assert "was built from corpus" in capsys.readouterr().err
    assert (run_dir / "DONE").exists()


@pytest.mark.slow
def test_ray_builds_the_same_clusters_and_experts_as_threads(built_run, slice_corpus, tmp_path):
    pytest.importorskip("prefect_ray")
    from flows.api_server import api_server
    from flows.runners import task_runner

    run_dir = tmp_path / "ray-run"
    with api_server():
        pipeline.build.with_options(task_runner=task_runner("ray"))(
            tiny_config(slice_corpus).to_dict(), str(run_dir), "assemble", None, "ray")
    for name in ("cluster_id", "train_cluster_id"):
        a = pq.read_table(built_run / "clusters" / "assignments.parquet")
        b = pq.read_table(run_dir / "clusters" / "assignments.parquet")
        if name in a.column_names:
            assert a.column(name).to_pylist() == b.column(name).to_pylist()
    from safetensors.numpy import load_file

    for cid in range(3):
        thread_w = load_file(built_run / "experts" / str(cid) / "model.safetensors")
        ray_w = load_file(run_dir / "experts" / str(cid) / "model.safetensors")
        for key, value in thread_w.items():
            np.testing.assert_allclose(ray_w[key], value, rtol=1e-4, atol=1e-5)


def test_a_failed_rerun_with_a_new_config_keeps_the_finished_runs_config(built_run, slice_corpus, tmp_path, capsys):
    run_dir = shutil.copytree(built_run, tmp_path / "run")
    before = (run_dir / "config.toml").read_text(), pipeline.RunDir(run_dir).read_manifest().config
    # The "domain" values are shorter than corpus.min_chars: ingestion fails after the run was reopened.
    assert main(["run", "--corpus", str(slice_corpus), "--out", str(run_dir), "--clusters", "4",
                 "--text-field", "domain"]) == 2
    assert "empty after cleaning" in capsys.readouterr().err
    after = (run_dir / "config.toml").read_text(), pipeline.RunDir(run_dir).read_manifest().config
    assert after == before and (run_dir / "DONE").exists()


@pytest.mark.parametrize("command,args,resumes", [("run", [], True), ("eval", ["RUN"], True),
                                                   ("query", ["RUN", "hello"], False), ("serve", ["RUN"], False)])
def test_an_interrupted_command_says_whether_rerunning_it_resumes(command, args, resumes, monkeypatch, capsys):
    import importlib

    from flows.cli import COMMANDS

    def interrupted(_args):
        raise KeyboardInterrupt

    module, name = COMMANDS[command]
    monkeypatch.setattr(importlib.import_module(module), name, interrupted)
    assert main([command, *args]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"cbtm {command}: interrupted" + ("; re-run the same command to resume" if resumes else "")


def test_ctrl_c_stops_an_expert_training_in_a_worker_thread_at_its_next_step(built_run, tmp_path, monkeypatch, capsys):
    """Ctrl-C reaches the main thread only; under the thread runner the expert trains in a worker thread, and the
    interrupted command used to wait for it to finish (README: What a long run can count on)."""
    run_dir = shutil.copytree(built_run, tmp_path / "run")
    steps = pipeline.RunDir(run_dir).read_manifest().experts["1"]["steps"]
    assert steps >= 6
    steps_after = []

    def point(name):  # the SIGINT a terminal sends, from inside expert 1's 2nd step, as `faults` would
        if name == "step:expert 1":
            steps_after.append(name)
            if len(steps_after) == 2:
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(faults, "point", point)
    # A terminal's Python has this handler; tests started as a background job (CI?) inherit SIGINT ignored.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["run", "--out", str(run_dir), "--force", "train"]) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the command put it back
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert "cbtm run: interrupted; re-run the same command to resume" in capsys.readouterr().err
    assert 2 <= len(steps_after) <= 3 < steps  # stopped at its next step, not after the rest of its steps

    # As it says, the same command resumes the forced build: it does not force what it already redid again.
    run = pipeline.RunDir(run_dir)
    redone = [run.tokenizer_dir / "tokenizer.json", run.seed_dir / "model.safetensors",
              run.expert_dir(0) / "model.safetensors"]
    if run.read_manifest().config["seed"]["pretrain_share"]:
        redone.append(run.pretrained_dir / "model.safetensors")
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in redone}
    monkeypatch.setattr(faults, "point", lambda name: None)
    assert main(["run", "--out", str(run_dir), "--force", "train"]) == 0
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in redone} == stamps
    assert "resuming the interrupted `--force train` build" in capsys.readouterr().err
    manifest = run.read_manifest()
    assert "run" not in manifest.jobs and (run_dir / "DONE").exists()
    assert not [r for r in [*manifest.stages.values(), *manifest.experts.values()] if r.get("forced")]
    assert run.expert_dir(1).joinpath("model.safetensors").stat().st_mtime_ns > stamps[redone[2]][1]


def test_force_reruns_a_stage_from_scratch_and_keeps_what_it_leaves_unchanged(built_run, tmp_path, capsys):
    """`--force embed`, the repair the errors name for damaged embeddings, used to keep every finished shard
    (and the tf-idf fit), and `--force assemble` was skipped as up to date."""
    run_dir = shutil.copytree(built_run, tmp_path / "run")
    run = pipeline.RunDir(run_dir)
    shard = run.embeddings_dir / "shard-00000.npy"
    vectors = np.load(shard)
    np.save(shard, np.full_like(vectors, np.nan))  # damaged in place: the same shape and dtype
    files = [shard, run.report_path, run.clusters_dir / "centroids.npy", run.expert_dir(0) / "model.safetensors"]
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    assert main(["run", "--out", str(run_dir), "--force", "embed", "--force", "assemble"]) == 0, capsys.readouterr()
    np.testing.assert_array_equal(np.load(shard), vectors)  # embedded again, as before the damage
    changed = [p for p in files if (p.stat().st_ino, p.stat().st_mtime_ns) != stamps[p]]
    assert changed == [shard, run.report_path]  # the same clusters: the experts were kept
    assert (run_dir / "DONE").exists() and not run.read_manifest().jobs
