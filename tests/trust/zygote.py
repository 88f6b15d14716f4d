"""A process that imports cbtm's command modules once, then forks one child per `cbtm` command it is sent.

A `cbtm` subprocess spends most of a short command importing torch, scikit-learn and Prefect (6.2 s of 8.4 s
for a run killed after ingest, measured on 2026-12-02 with `python -X importtime`). The kill tests start two
dozen of them, so this process pays the imports once and forks: each child is a real process that runs
`flows.cli.main(args)` exactly as `python -m flows.cli` would (its own environment, cwd, stdout and stderr
files, exit code), reaches its fault point and is killed with a real SIGKILL. Nothing runs before the fork but
imports, and no Python thread exists then; the native threads that importing torch, pyarrow (jemalloc) and
scikit-learn start are the ones every `multiprocessing` fork and torch DataLoader worker copies, and those
libraries re-arm them after a fork.

Protocol: one JSON request per line on stdin ``{"args", "env", "cwd", "stdout", "stderr", "timeout"}``; one
line ``ZYGOTE {"returncode": int, "timed_out": bool}`` per request on stdout. EOF on stdin ends it.
"""
from __future__ import annotations

import atexit
import importlib
import json
import os
import signal
import sys
import threading
import time
import traceback

import flows.cli

REPLY = "ZYGOTE "


# What the commands import lazily, inside functions (measured: the modules a killed build's children import);
# the child imports anything missing itself, so this list only decides what is paid once.
LAZY = ["torch", "torch.nn", "torch.optim", "torch.utils.data", "datasets", "pyarrow.dataset", "pyarrow.json",
        "matplotlib.figure", "matplotlib.backends.backend_agg", "sklearn.cluster", "sklearn.decomposition",
        "sklearn.feature_extraction.text", "sklearn.linear_model", "sklearn.manifold", "sklearn.metrics",
        "sklearn.model_selection", "sklearn.preprocessing", "transformers"]
LAZY_ATTRS = {"transformers": ["AutoModelForCausalLM", "LlamaConfig", "LlamaForCausalLM", "PreTrainedTokenizerFast",
                               "GenerationConfig"]}


def _preload() -> None:
    for module in sorted({module for module, _ in flows.cli.COMMANDS.values()}) + LAZY:
        importlib.import_module(module)
    for module, names in LAZY_ATTRS.items():  # transformers resolves these lazily, on first access
        for name in names:
            getattr(sys.modules[module], name)
    if threading.active_count() != 1:  # a Python thread would be copied half-way through what it was doing
        raise RuntimeError(f"imports started Python threads, forking would not be safe: {threading.enumerate()}")


def _become(request: dict) -> None:
    """Take the request's process group, stdin (/dev/null), stdout and stderr files, cwd, environment, argv."""
    os.setpgid(0, 0)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [flows.cli.__file__, *request["args"]]
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _child(request: dict) -> None:
    """Become `cbtm ARGS` in a fresh process image of this one; exits as the interpreter would, never returns."""
    code = 1
    try:
        _become(request)
        code = flows.cli.main(request["args"])
    except SystemExit as exc:  # argparse and sys.exit
        code = exc.code
    except BaseException:  # noqa: BLE001 - reported like the interpreter would, exit status 1
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()  # what a normal interpreter exit runs (Prefect drains its workers here)
        if not isinstance(code, (int, type(None))):
            print(code, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 0 if code is None else 1)


def _serve(request: dict) -> dict:
    pid = os.fork()
    if pid == 0:
        _child(request)
    deadline = time.monotonic() + float(request["timeout"])
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"returncode": os.waitstatus_to_exitcode(status), "timed_out": False}
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"returncode": -signal.SIGKILL, "timed_out": True}
        time.sleep(0.02)


def main() -> None:
    sys.path[0] = os.getcwd()  # as under `python -m flows.cli` (the script's own folder is no package root)
    _preload()
    print(REPLY + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(REPLY + json.dumps(_serve(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
