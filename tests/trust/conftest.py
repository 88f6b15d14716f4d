"""Helpers of the fault-injection and bad-input suites: real `cbtm` subprocesses, file snapshots."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_config


def snapshot(root: Path, under: tuple[str, ...] = ("",)) -> dict[str, tuple[int, int, int]]:
    """{relative path: (inode, mtime_ns, size)} of every visible file below ``root / u`` for u in ``under``:
    a file rewritten with the same bytes still shows (training is deterministic)."""
    out = {}
    for u in under:
        base = Path(root) / u
        files = [base] if base.is_file() else base.rglob("*") if base.is_dir() else []
        for p in files:
            rel = p.relative_to(root).as_posix()
            if p.is_file() and not any(part.startswith(".") for part in Path(rel).parts):
                st = p.stat()
                out[rel] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


@pytest.fixture(scope="session")
def cli_env(prefect_harness) -> dict:
    """Environment of `cbtm` subprocesses: this session's Prefect API server (started once, shared)."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONWARNINGS="ignore",
               PREFECT_LOGGING_LEVEL="CRITICAL", PYTHONPATH=str(ROOT))
    env.pop("CBTM_FAULT", None)
    return env


class Zygote:
    """`tests/trust/zygote.py` started with one environment: it forks a `cbtm` child per command (see there)."""

    def __init__(self, env: dict):
        self.env = dict(env)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("zygote.py"))], env=self.env,
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._reply()  # ready: the imports are done

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("ZYGOTE "):
                return json.loads(line[len("ZYGOTE "):])
        raise RuntimeError(f"the zygote exited with {self.proc.wait()}")

    def run(self, args: list[str], env: dict, timeout: float, workdir: Path) -> subprocess.CompletedProcess:
        out, err = workdir / "stdout", workdir / "stderr"
        request = dict(args=args, env=env, cwd=str(ROOT), stdout=str(out), stderr=str(err), timeout=timeout)
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired(args, timeout, stdout, stderr)
        return subprocess.CompletedProcess(args, reply["returncode"], stdout, stderr)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


_ZYGOTES: dict[tuple, Zygote] = {}


@pytest.fixture(scope="session", autouse=True)
def _close_zygotes():
    yield
    while _ZYGOTES:
        _ZYGOTES.popitem()[1].close()


def cbtm(args: list[str], env: dict, fault: str | None = None, timeout: float = 300,
         fresh: bool = False) -> subprocess.CompletedProcess:
    """Run `cbtm ARGS` in a real subprocess (``fault``: CBTM_FAULT, a SIGKILL at that point): forked from a
    zygote that has the imports done, or (``fresh``) a new interpreter, `python -m flows.cli ARGS`."""
    run_env = dict(env, **({"CBTM_FAULT": fault} if fault else {}))
    if fresh:
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=run_env, capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT)
    key = tuple(sorted(env.items()))
    if key not in _ZYGOTES:
        _ZYGOTES[key] = Zygote(env)
    with tempfile.TemporaryDirectory(prefix="cbtm-") as workdir:
        return _ZYGOTES[key].run(args, run_env, timeout, Path(workdir))


@pytest.fixture(scope="session")
def fast_config(slice_corpus, tmp_path_factory) -> Path:
    """The tiny build as a TOML file, with the tf-idf embedder (seconds, no model to load) and checkpoints
    every 5 steps, for builds in subprocesses."""
    cfg = tiny_config(slice_corpus).with_overrides(['embed.kind="tfidf"', "embed.tfidf_dim=8",
                                                    "train.checkpoint_every=5"])
    path = tmp_path_factory.mktemp("config") / "fast.toml"
    path.write_text(cfg.to_toml())
    return path
