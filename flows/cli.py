"""`cbtm`: run the pipeline, retrain one expert, grow a run, query, serve and evaluate it.

Bad input exits with code 2 and one line on stderr saying what is wrong and what to do.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import warnings
from typing import Iterator

from flows.cli_args import parser
from ground import interrupt

log = logging.getLogger("cbtm")
PACKAGE_LOGGERS = ("cbtm", "cluster", "experts", "ensemble", "flows", "ground")
# command -> (module, function). A command imports only what it needs: `cbtm query` never loads Prefect,
# `cbtm --help` loads neither Prefect nor torch.
COMMANDS = {"run": ("flows.commands", "cmd_run"), "retrain": ("flows.commands", "cmd_retrain"),
            "eval": ("flows.commands", "cmd_eval"), "clusters": ("flows.commands", "cmd_clusters"),
            "query": ("flows.query_commands", "cmd_query"),
            "tune-temperature": ("flows.query_commands", "cmd_tune_temperature"),
            "serve": ("flows.serve_command", "cmd_serve"), "add": ("flows.grow_commands", "cmd_add"),
            "remove": ("flows.grow_commands", "cmd_remove"), "restore": ("flows.grow_commands", "cmd_restore")}

RESUMABLE = {"run", "retrain", "eval", "add"}  # they record finished work as they go (README: What a long run ...)


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is at the time of each message (not the one at setup)."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


def _setup_logging(verbose: bool) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "CRITICAL")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in PACKAGE_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
    if not verbose:
        for noisy in ("transformers", "sentence_transformers", "datasets", "huggingface_hub", "lm_eval", "httpx",
                      "prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.server", "uvicorn"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL if noisy.startswith(("prefect", "uvicorn"))
                                              else logging.ERROR)
        # ... and where huggingface_hub is imported later, which sets its level from this: its retries of an
        # unreachable hub were a dozen warning lines, each twice, before the one-line error.
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
        warnings.filterwarnings("ignore")
        # ... in the processes the command starts too: workers, and multiprocessing's resource tracker, which
        # warned of "leaked semaphore objects" after Ctrl-C had stopped the process runner's workers.
        os.environ.setdefault("PYTHONWARNINGS", "ignore")


def _on_interrupt(signum, frame) -> None:
    interrupt.request()  # for work in other threads; then as Python's own handler, in this one
    signal.default_int_handler(signum, frame)


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Ctrl-C stops work in every thread of the command (`ground.interrupt`), not only the main one. Left alone
    where SIGINT is ignored (a background job) or cannot be handled (not the main thread)."""
    interrupt.clear()
    install = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    previous = signal.signal(signal.SIGINT, _on_interrupt) if install else None
    try:
        yield
    finally:
        if install:
            signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _setup_logging(args.verbose)
    with _interruptible():
        return _run(args)


def _run(args) -> int:
    module, name = COMMANDS[args.command]
    try:
        return getattr(importlib.import_module(module), name)(args)
    except (ValueError, FileNotFoundError, PermissionError) as exc:  # UserInputError is a ValueError
        if args.verbose:
            raise
        print(f"cbtm {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = "; re-run the same command to resume" if args.command in RESUMABLE else ""
        print(f"cbtm {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        print(f"cbtm {args.command}: failed: {type(exc).__name__}: {_one_line(exc)} (re-run with --verbose for "
              "details)", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
