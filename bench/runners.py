"""Benchmark the task runners: wall time of training 8 tiny experts, and each runner's fixed overhead.

    python bench/runners.py [--runners thread,process,ray,dask] [--steps 40]

One run directory is clustered once (k = 8 on the demo corpus, thread runner); every runner then trains the
8 experts of its own copy (`cbtm run`, ingest/embed/cluster already current), and runs the same command
again, when every stage is current: that second run is the runner's fixed overhead (API server, workers,
flow bookkeeping). Each `cbtm run` is a fresh process, timed from outside, as a user would see it.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cbtm(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runners", default="thread,process,ray,dask")
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    settings = ["--clusters", "8", "--set", "seed.model=preset:tiny", "--set", f"train.steps={args.steps}",
                "--set", "train.block_size=64"]
    work = Path(tempfile.mkdtemp(prefix="cbtm-runners-"))
    base = work / "base"
    prepare = cbtm("run", "--out", str(base), "--until", "cluster", *settings)
    print(f"prepared {base} (ingest, embed, cluster k=8) in {prepare:.1f}s; {args.steps} steps per expert")
    print(f"{'runner':<10} {'train 8 experts (s)':>20} {'fixed overhead (s)':>19}")
    for runner in args.runners.split(","):
        out = work / runner
        shutil.copytree(base, out)
        try:
            train = cbtm("run", "--out", str(out), "--runner", runner, *settings)
            overhead = cbtm("run", "--out", str(out), "--runner", runner, *settings)
        except subprocess.CalledProcessError as exc:
            print(f"{runner:<10} failed (exit {exc.returncode}); run it by hand with -v to see why")
            continue
        print(f"{runner:<10} {train:>20.1f} {overhead:>19.1f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
