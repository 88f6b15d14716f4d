"""The Prefect API server a `cbtm` command talks to, started so that it dies with the command.

Prefect's own temporary server is a uvicorn child process that outlives a `kill -9` of its parent (it is
re-parented to PID 1 and keeps listening). cbtm starts that server itself, through a tiny wrapper that asks
the kernel to SIGKILL it when its parent dies (Linux ``PR_SET_PDEATHSIG``), and shares it with every worker a
process, Ray or Dask runner starts (one server instead of one per worker). It runs in its own session, so that
Ctrl-C stops the command, not the server the command needs to record that it was interrupted. A server already
configured (PREFECT_API_URL from the environment, a profile or a test harness) is used as it is.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from typing import Iterator

import prefect
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

log = logging.getLogger("cbtm")

# Run as `python -c DIE_WITH_PARENT -m uvicorn ...`: set the parent-death signal, then become uvicorn.
DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "    pass  # not Linux: the server is stopped by the command when it exits normally\n"
    "if os.getppid() != int(os.environ['CBTM_PARENT_PID']):\n"
    "    sys.exit(0)  # the parent died before the signal was set\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n")


def child_server(port: int):
    """Prefect's subprocess API server on ``port``, started so that the kernel kills it when its parent dies."""
    # Imported here, not at the top: the server module takes ~3.5 s to import, and a command given a server
    # (PREFECT_API_URL: every worker, every test subprocess, a user with a profile) never needs it.
    from prefect.server.api.server import SubprocessASGIServer

    class ChildServer(SubprocessASGIServer):
        def _run_uvicorn_command(self):
            env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1", "CBTM_PARENT_PID": str(os.getpid()),
                   **get_current_settings().to_environment_variables(exclude_unset=True)}
            args = [sys.executable, "-c", DIE_WITH_PARENT, "-m", "uvicorn", "--app-dir",
                    str(prefect.__module_path__.parent), "--factory", "prefect.server.api.server:create_app",
                    "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
            # Its own session: Ctrl-C in a terminal signals the whole foreground process group, and a server
            # killed with the command left Prefect retrying its last state change for ~70 s before the command
            # failed with ConnectError. The command stops it on the way out; the kernel, if the command dies.
            return subprocess.Popen(args, env=env, start_new_session=True)

    return ChildServer(port=port)


@contextlib.contextmanager
def api_server() -> Iterator[str]:
    """The URL of the Prefect API for this command: the configured one, or a `child_server` on a free port
    (stopped on exit; killed by the kernel if this process is killed). Workers inherit it."""
    server, url = None, PREFECT_API_URL.value()
    if not url:
        server = child_server(_free_port())  # servers are per-port singletons: this one is ours to stop
        server.start(timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")))
        url = server.api_url
        log.debug("prefect API server: %s (pid %s)", url, server.server_process.pid)
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        if server is not None:
            _drain_prefect_workers()
            server.stop()


def _drain_prefect_workers(timeout: float = 10.0) -> None:
    """Send the events and logs Prefect still queues (a process runner's workers forward theirs late) before
    the server stops; otherwise each failed send printed an EventsWorker error after the command's last line."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (EventsWorker, APILogWorker):
        try:
            worker.drain_all(timeout=timeout)
        except Exception:  # noqa: BLE001 - best effort on the way out: never hide the command's own outcome
            log.debug("draining %s failed", worker.__name__, exc_info=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
