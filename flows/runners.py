"""Task runners from a `--runner` spec, and one shared Prefect API server for runners that start processes."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from ensemble.rundir import UserInputError

log = logging.getLogger("cbtm")

RUNNERS = ("thread", "process")


def task_runner(spec: str):
    """The Prefect task runner for ``spec`` (thread | process)."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    if spec == "thread":
        return ThreadPoolTaskRunner()
    if spec == "process":
        return ProcessPoolTaskRunner()
    raise UserInputError(f"unknown runner {spec!r}: use one of {', '.join(RUNNERS)}")


@contextlib.contextmanager
def shared_api_server(spec: str) -> Iterator[None]:
    """For runners that start worker processes, start one API server and export its URL to the workers.

    Without it every worker process would start its own temporary server (seconds and ~150 MB each).
    Nothing is started for the thread runner or when PREFECT_API_URL is already set.
    """
    if spec == "thread" or os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start(timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")))
    os.environ["PREFECT_API_URL"] = server.api_url
    log.info("prefect API server for %s workers: %s", spec, server.api_url)
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
