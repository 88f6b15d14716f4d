"""Read one .npy file from many threads at once, in a process of its own, and print how many threads failed.

    python -m tests.trust.npy_stress numpy|ground PATH

The interpreter switches threads every microsecond and the garbage collector runs finalizers (Python code,
where another thread can take over) in the middle of a header parse: with plain `numpy.load` CPython 3.11 then
fails with ``SystemError: AST constructor recursion depth mismatch`` (python/cpython#106905).
"""
import gc
import sys
import threading

import numpy as np

from ground.arrays import load_npy


class _Finalised:
    def __del__(self):
        sum(range(50))


def failed_threads(load, path: str, threads: int = 8, rounds: int = 1000) -> int:
    errors = []

    def work():
        for _ in range(rounds):
            cycle = [_Finalised()]
            cycle.append(cycle)
            try:
                load(path)
            except SystemError as exc:
                errors.append(exc)
                return

    sys.setswitchinterval(1e-6)
    gc.set_threshold(5, 1, 1)
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return len(errors)


if __name__ == "__main__":
    print(failed_threads({"numpy": np.load, "ground": load_npy}[sys.argv[1]], sys.argv[2]))
