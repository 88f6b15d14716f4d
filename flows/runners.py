"""Task runners from a `--runner` spec, and one shared Prefect API server for runners that start processes.

Specs: ``thread`` (default), ``process``, ``ray`` (a local Ray), ``ray=ADDRESS``, ``dask`` (a local Dask
cluster), ``dask=ADDRESS``.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import socket
from typing import Iterator
from urllib.parse import urlparse

from ground.errors import UserInputError

log = logging.getLogger("cbtm")

KINDS = ("thread", "process", "ray", "dask")
RAY_OBJECT_STORE_BYTES = 256 * 1024**2  # experts and shards move as files: Ray's object store stays small


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"ray=host:port"`` -> ("ray", "host:port"); raises UserInputError for an unknown kind."""
    kind, _, address = spec.partition("=")
    if kind not in KINDS or (address == "" and "=" in spec) or (address and kind in ("thread", "process")):
        raise UserInputError(f"unknown runner {spec!r}: use thread, process, ray, ray=ADDRESS, dask or dask=ADDRESS")
    return kind, address or None


def check_reachable(kind: str, address: str, timeout: float = 3.0) -> None:
    """Fail within seconds, naming the address, when nothing listens there."""
    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    default_port = {"ray": 10001 if address.startswith("ray://") else 6379, "dask": 8786}[kind]
    host, port = parsed.hostname, parsed.port or default_port
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        raise UserInputError(f"{kind} cluster at {address} is unreachable ({exc.strerror or exc}): start it or "
                             "check the address") from exc


def task_runner(spec: str):
    """The Prefect task runner for a ``--runner`` spec."""
    kind, address = parse_spec(spec)
    if address:
        check_reachable(kind, address)
    if kind == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner()
    if kind == "process":
        return _process_runner()
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise UserInputError("the ray runner needs the ray extra: pip install 'cbtm[ray]'") from exc
        init = {"include_dashboard": False, "object_store_memory": RAY_OBJECT_STORE_BYTES, "log_to_driver": False}
        return RayTaskRunner(address=address, init_kwargs={} if address else init)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise UserInputError("the dask runner needs prefect-dask: pip install prefect-dask") from exc
    return DaskTaskRunner(address=address) if address else DaskTaskRunner(
        cluster_kwargs={"n_workers": 1, "threads_per_worker": 1, "processes": True, "dashboard_address": None})


def _process_runner():
    """Prefect's process pool, whose workers ignore Ctrl-C and are killed when it interrupts the flow.

    Ctrl-C signals the terminal's whole process group. A worker interrupted by it returned its KeyboardInterrupt,
    Prefect's done-callback re-raised it inside the pool's manager thread, which died of it, and the interpreter
    then waited forever at exit to join workers no one would stop (`cbtm run --runner process`, Prefect 3.8.8).
    Killing them is safe: an expert is recorded only when complete, and its checkpoints resume it.
    """
    from prefect.task_runners import ProcessPoolTaskRunner

    class InterruptibleProcessPoolTaskRunner(ProcessPoolTaskRunner):
        def __exit__(self, exc_type, exc_value, traceback) -> None:
            if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
                for child in multiprocessing.active_children():
                    log.debug("interrupted: killing task worker %s", child.pid)
                    child.kill()
                    child.join(10)
            super().__exit__(exc_type, exc_value, traceback)

    return InterruptibleProcessPoolTaskRunner(initializer=_ignore_interrupts)


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def is_remote(spec: str) -> bool:
    """True when tasks run on other machines (experts may then train concurrently on CPU too)."""
    return parse_spec(spec)[1] is not None


@contextlib.contextmanager
def expert_task_options(spec: str) -> Iterator[None]:
    """Resources for one expert task: one GPU on a Ray cluster that has GPUs, nothing otherwise.

    Asking Ray for a GPU that no node has would leave the task pending forever, so the cluster's resources
    are checked first.
    """
    if parse_spec(spec)[0] != "ray":
        yield
        return
    import ray
    from prefect_ray.context import remote_options

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if gpus >= 1:
        with remote_options(num_gpus=1):
            yield
    else:
        yield
