"""kill -9 at every moment where work becomes durable; the same command then finishes without redoing it.

Each kill is a real SIGKILL of a real `cbtm` subprocess, sent by the process itself at a named point
(`ground.faults`), so that the moment is exact rather than guessed. The killed processes are forked from a
zygote that has the imports done (tests/trust/zygote.py; README, Development, has the time it saves); the run
that finishes the killed build is a new interpreter, as a user's rerun would be. After each kill the finished
artifacts are compared by inode and mtime, not only bytes: training is deterministic, so rewritten files would be equal.
"""
import json
import shutil
import signal
import time
from pathlib import Path

import pytest

from ensemble import Ensemble
from ground.rundir import RunDir
from tests.conftest import demo_records, write_jsonl
from tests.trust.conftest import cbtm, snapshot

pytestmark = pytest.mark.faults

KILLED = -signal.SIGKILL
BUILD_POINTS = ["stage:ingest", "stage:embed", "stage:cluster", "stage:tokenizer", "stage:seed",
                "step:seed phase@33", "stage:pretrain", "expert:run:0", "step:expert 1@6", "stage:train", "stage:tune",
                "stage:assemble"]


def finished(run: RunDir) -> list[str]:
    """The artifacts the manifest says are finished (stage outputs and recorded experts)."""
    if not run.exists():
        return []
    manifest = run.read_manifest()
    out = [run.stage_output(s).relative_to(run.root).as_posix() for s in manifest.stages
           if s not in ("train",) and run.stage_output(s).exists()]
    return out + [e["path"] for e in manifest.experts.values() if not e.get("skipped")]


@pytest.fixture(scope="module")
def killed_build(cli_env, fast_config, tmp_path_factory):
    """A build killed at every point in turn, each run resuming the previous one, then finished."""
    run = RunDir(tmp_path_factory.mktemp("kill") / "run")
    args = ["run", "--config", str(fast_config), "--out", str(run.root)]
    history = []
    for point in BUILD_POINTS:
        before = snapshot(run.root, tuple(finished(run)))
        result = cbtm(args, cli_env, fault=point)
        assert result.returncode == KILLED, (point, result.stderr[-2000:])
        history.append((point, before, snapshot(run.root, tuple(before))))
    before = snapshot(run.root, tuple(finished(run)))
    result = cbtm(args, cli_env, fresh=True)  # a new interpreter, as a user would rerun it
    assert result.returncode == 0, result.stderr[-2000:]
    history.append(("finish", before, snapshot(run.root, tuple(before))))
    return run, history


def test_after_every_kill_the_finished_artifacts_are_never_rewritten(killed_build):
    run, history = killed_build
    for point, before, after in history:
        assert after == before, f"after the kill at {point}, finished artifacts were rewritten"
    assert {p for p, _, _ in history} == {*BUILD_POINTS, "finish"}
    assert any("experts/0/model.safetensors" in before for _, before, _ in history[8:])  # expert 0 kept


def test_the_killed_build_finishes_and_answers(killed_build):
    run, _ = killed_build
    assert run.done_path.exists()
    manifest = run.read_manifest()
    assert set(manifest.experts) == {"0", "1", "2"} and not manifest.jobs
    assert manifest.routing["route_temperature"]["source"] == "auto"  # tuned once, kept across the kill after it
    assert manifest.experts["1"]["resumed_from"] == 5  # killed at step 6, resumed from its step-5 checkpoint
    seed = json.loads((run.pretrained_dir / "expert.json").read_text())
    assert seed["resumed_from"] == 30  # the seed phase too: killed at step 33, resumed from step 30
    assert not run.checkpoints_root.exists()
    ens = Ensemble.load(run.root)
    assert isinstance(ens.generate("Bread dough should rise", max_new_tokens=4), str)


def test_a_killed_retrain_retrains_only_what_it_had_not_finished(killed_build, cli_env, tmp_path):
    import shutil

    run = RunDir(shutil.copytree(killed_build[0].root, tmp_path / "run"))
    args = ["retrain", str(run.root), "--cluster", "0", "--cluster", "2"]
    assert cbtm(args, cli_env, fault="expert:run:0").returncode == KILLED
    assert run.read_manifest().jobs["retrain"] == {"clusters": [0, 2], "from_current": False, "done": [0]}
    kept, other = snapshot(run.root, ("experts/0",)), snapshot(run.root, ("experts/1", "experts/2"))
    assert cbtm(args, cli_env, fault="step:expert 2@7").returncode == KILLED  # killed again, mid-expert 2
    assert cbtm(args, cli_env, fault="stage:tune").returncode == KILLED  # and after both, before assembling
    assert run.read_manifest().jobs["retrain"]["done"] == [0, 2]  # the job ends with the assemble stage
    second = snapshot(run.root, ("experts/2",))
    result = cbtm(args, cli_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert snapshot(run.root, ("experts/0",)) == kept  # retrained once, not twice
    assert snapshot(run.root, ("experts/2",)) == second
    assert snapshot(run.root, ("experts/1",)) == {k: v for k, v in other.items() if k.startswith("experts/1/")}
    assert snapshot(run.root, ("experts/2",)) != {k: v for k, v in other.items() if k.startswith("experts/2/")}
    manifest = run.read_manifest()
    assert not manifest.jobs and manifest.experts["2"]["resumed_from"] == 5
    assert Ensemble.load(run.root).generate("The telescope", max_new_tokens=3, experts=[2])


def test_a_killed_evaluation_keeps_the_baseline_experts_it_trained(killed_build, cli_env, tmp_path):
    import shutil

    run = RunDir(shutil.copytree(killed_build[0].root, tmp_path / "run"))
    args = ["eval", str(run.root), "--baselines", "dense,random", "--limit", "3"]
    assert cbtm(args, cli_env, fault="expert:dense:0").returncode == KILLED
    dense = snapshot(run.root, ("baselines/dense/experts",))
    assert dense and not run.results_path.exists()
    result = cbtm(args, cli_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert snapshot(run.root, ("baselines/dense/experts",)) == dense
    assert {"dense", "random top-1", "top-1"} <= set(json.loads(run.results_path.read_text())["systems"])


def test_a_killed_add_resumes_and_never_touches_the_old_experts(killed_build, cli_env, tmp_path):
    run = RunDir(shutil.copytree(killed_build[0].root, tmp_path / "run"))
    new = write_jsonl(tmp_path / "new.jsonl", demo_records(24, ("law", "programming")))
    args = ["add", str(run.root), "--corpus", str(new), "--new-clusters", "2"]
    old = snapshot(run.root, ("experts",))
    before = (run.centroids_path.stat().st_ino, run.corpus_path.stat().st_ino)
    assert cbtm(args, cli_env, fault="expert:run:3").returncode == KILLED  # staged, one new expert recorded
    three = snapshot(run.root, ("experts/3",))
    job = run.read_manifest().jobs["add"]
    assert three and job["phase"] == "staged" and job["done"] == [3]
    assert (run.centroids_path.stat().st_ino, run.corpus_path.stat().st_ino) == before  # nothing swapped yet
    assert Ensemble.load(run.root).n_experts == 3  # the run still serves as it was
    assert cbtm(args, cli_env, fault="add:swap:embeddings").returncode == KILLED  # killed between two renames
    assert cbtm(args, cli_env, fault="stage:tune").returncode == KILLED  # swapped, tuned, not yet assembled
    assert run.read_manifest().jobs["add"] and not run.read_manifest().additions  # recorded with the assembly
    result = cbtm(args, cli_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert snapshot(run.root, ("experts/3",)) == three  # trained once, not twice
    assert {k: v for k, v in snapshot(run.root, ("experts",)).items() if k.split("/")[1] in "012"} == old
    manifest = run.read_manifest()
    assert not manifest.jobs and manifest.additions[0]["new_clusters"] == [3, 4] and manifest.n_clusters == 5
    assert len(manifest.additions) == 1  # recorded once, though the last phase ran twice
    assert not (run.root / ".cbtm-add").exists()
    assert Ensemble.load(run.root).n_experts == 5


def _children(pid: int) -> list[tuple[int, str]]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append((int(proc.name), cmd))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_the_prefect_server_of_a_killed_run_dies_with_it(fast_config, tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}  # the command starts its own
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(fast_config), "--out", str(tmp_path / "run"),
           "--set", "train.steps=100000"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, server = time.time() + 120, None
        while time.time() < deadline and server is None:
            server = next((pid for pid, c in _children(proc.pid) if "uvicorn" in c), None)
            time.sleep(0.2)
        assert server is not None, "no Prefect API server child appeared"
        while not (tmp_path / "run" / "manifest.json").exists() and time.time() < deadline:
            time.sleep(0.2)  # the server is in use
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.time() + 15
        while Path(f"/proc/{server}").exists() and time.time() < deadline:
            time.sleep(0.1)
        alive = Path(f"/proc/{server}").exists() and "Z" not in (Path(f"/proc/{server}/stat").read_text().split()[2])
        assert not alive, f"the Prefect server (pid {server}) outlived its killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_ctrl_c_stops_a_run_at_once_and_the_same_command_resumes_it(fast_config, cli_env, tmp_path):
    """Ctrl-C signals the terminal's whole process group (here sent from inside, in expert 1's 6th step). The
    Prefect server the command started died of it, and Prefect retried recording the interruption for ~70 s
    before the command failed with ConnectError; a process-pool worker died of it and the command then never
    exited. (The thread runner shares the first cause; the process runner, where both met, is tested.)"""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    # As a user's shell: no Prefect server or log level set (the command starts its own server), no warnings filter.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PREFECT_LOGGING", "PYTHONWARN"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(ROOT), CBTM_FAULT="step:expert 1@6",
               CBTM_FAULT_SIGNAL="SIGINT")
    args = ["run", "--config", str(fast_config), "--out", str(tmp_path / "run"), "--runner", "process"]
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,  # its own group
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's
    try:
        _, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert "cbtm run: interrupted; re-run the same command to resume" in err and "Error" not in err, err[-2000:]
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _environ_has(p, f"CBTM_PARENT_PID={proc.pid}")]
    assert not left, "the command's Prefect server outlived it"
    result = cbtm(args, cli_env)
    assert result.returncode == 0, result.stderr[-2000:]
    run = RunDir(tmp_path / "run")
    assert run.read_manifest().experts["1"]["resumed_from"] == 5 and run.done_path.exists()


def _environ_has(proc: Path, entry: str) -> bool:
    try:
        return entry.encode() in (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return False
