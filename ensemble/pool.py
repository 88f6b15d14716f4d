"""The experts of a run as an `Ensemble` sees them: pinned versions, verified once, loaded lazily and safely.

`PinnedExpert` opens an expert's model files when the `Ensemble` loads (or reloads) the run and keeps them
open: a `cbtm retrain` that replaces the expert directory meanwhile cannot change what this `Ensemble` loads
later (POSIX keeps a replaced file readable through an open descriptor). Sizes are checked against the manifest
at once, content hashes on first load, so a damaged expert is reported with the command that repairs it.

`ExpertPool` loads each expert at most once at a time (a lock per expert; model construction itself is
serialised by `experts.models.LOAD_LOCK`), keeps at most ``max_loaded`` HF models (least recently used are
released) and swaps versions atomically on `reload`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from experts.models import load_causal_lm
from ground.errors import IncompatibleRunError
from ground.files import MODEL_FILE_SUFFIXES, MODEL_JSON, hash_path

_FD_DIR = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"


class PinnedExpert:
    """One expert's model files held open at the version the manifest records."""

    def __init__(self, run_root: Path, cluster_id: int, entry: dict):
        self.cluster_id, self.path = int(cluster_id), Path(run_root) / entry["path"]
        self.version = entry.get("hash") or ""
        self._files = entry.get("files") or {}  # {name: {size, sha256}}; empty for schema-1 runs
        self._repair = f"retrain it with `cbtm retrain {run_root} --cluster {cluster_id}`"
        self._fds: dict[str, int] = {}
        self._verified = False
        self._lock = threading.Lock()
        if not (self.path / "config.json").exists():
            raise FileNotFoundError(f"expert {cluster_id} files are missing at {self.path}: {self._repair}")
        try:
            names = sorted(self._files) or sorted(p.name for p in self.path.iterdir() if p.is_file() and (
                p.name in MODEL_JSON or p.name.endswith(MODEL_FILE_SUFFIXES)))
            for name in names:
                self._fds[name] = os.open(self.path / name, os.O_RDONLY)
        except FileNotFoundError as exc:
            self.close()
            name = Path(exc.filename).name
            raise FileNotFoundError(f"expert {cluster_id}: {name} is missing: {self._repair}") from None
        for name, record in self._files.items():
            size = os.fstat(self._fds[name]).st_size
            if size != record["size"]:
                self.close()
                raise IncompatibleRunError(f"expert {cluster_id}: {name} is {size:,} bytes but the manifest recorded "
                                           f"{record['size']:,} (damaged or cut short): {self._repair}")
        self.config = json.loads(os.pread(self._fds["config.json"], 1 << 24, 0))

    def verify(self) -> None:
        """Check the pinned files' sha256 against the manifest, once (schema-1 runs: the directory's hash)."""
        with self._lock:
            if self._verified:
                return
            for name, record in self._files.items():
                if _fd_sha256(self._fds[name]) != record["sha256"]:
                    raise IncompatibleRunError(f"expert {self.cluster_id}: {name} does not match the sha256 the "
                                               f"manifest recorded (damaged): {self._repair}")
            if not self._files and self.version and hash_path(self.path) != self.version:
                raise IncompatibleRunError(f"expert {self.cluster_id} at {self.path} does not match the manifest's "
                                           f"hash (damaged or changed since the run was loaded): {self._repair}")
            self._verified = True

    @contextlib.contextmanager
    def directory(self):
        """A private directory that `from_pretrained` and safetensors can read: the pinned files, linked."""
        tmp = Path(tempfile.mkdtemp(prefix=f"cbtm-expert-{self.cluster_id}-"))
        try:
            for name, fd in self._fds.items():
                os.symlink(f"{_FD_DIR}/{fd}", tmp / name)
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def state_dict(self) -> dict:
        """The expert's tensors (Hugging Face names) read from the pinned safetensors files, on CPU."""
        from safetensors.torch import load_file

        self.verify()
        state = {}
        with self.directory() as tmp:
            for name in sorted(self._fds):
                if name.endswith(".safetensors"):
                    state.update(load_file(str(tmp / name)))
        return state

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = {}

    def __del__(self):
        self.close()


def _fd_sha256(fd: int) -> str:
    h, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


class ExpertPool:
    """Lazily loaded HF models of the pinned experts, thread-safe, at most ``max_loaded`` resident."""

    def __init__(self, pins: dict[int, PinnedExpert], device: str, max_loaded: int | None, vocab_size: int):
        self.device, self.max_loaded, self.vocab_size = device, max_loaded, vocab_size
        self._pins = dict(pins)
        self._models: OrderedDict[int, tuple[str, object]] = OrderedDict()  # cluster_id -> (version, model)
        self._lock = threading.Lock()
        self._expert_locks: dict[int, threading.Lock] = {c: threading.Lock() for c in pins}

    def pin(self, cluster_id: int) -> PinnedExpert:
        with self._lock:
            return self._pins[cluster_id]

    def version(self, cluster_id: int) -> str:
        return self.pin(cluster_id).version

    def loaded(self) -> set[int]:
        with self._lock:
            return {c for c, (v, _) in self._models.items() if self._pins.get(c) and self._pins[c].version == v}

    def model(self, cluster_id: int):
        """The HF model of ``cluster_id``'s pinned version, loaded on first use (once, whatever the threads)."""
        pin = self.pin(cluster_id)
        with self._lock:
            hit = self._models.get(cluster_id)
            if hit and hit[0] == pin.version:
                self._models.move_to_end(cluster_id)
                return hit[1]
            lock = self._expert_locks.setdefault(cluster_id, threading.Lock())
        with lock:
            with self._lock:
                hit = self._models.get(cluster_id)
                if hit and hit[0] == pin.version:
                    return hit[1]
            pin.verify()
            with pin.directory() as tmp:
                model = load_causal_lm(tmp).to(self.device).eval()
            if model.config.vocab_size != self.vocab_size:
                raise IncompatibleRunError(f"expert {cluster_id} has a vocabulary of {model.config.vocab_size}, the "
                                           f"seed {self.vocab_size}: every expert must branch from the run's seed")
            with self._lock:
                self._models[cluster_id] = (pin.version, model)
                self._models.move_to_end(cluster_id)
                while self.max_loaded and len(self._models) > self.max_loaded:
                    self._models.popitem(last=False)
            return model

    def load_state(self, cluster_id: int) -> tuple[str, dict]:
        """(version, CPU state dict) of ``cluster_id``'s pinned files, for the stacked backend."""
        pin = self.pin(cluster_id)
        return pin.version, pin.state_dict()

    def swap(self, pins: dict[int, PinnedExpert]) -> list[int]:
        """Adopt a new set of pinned experts (a reload); returns the cluster ids whose version changed. Models of
        changed experts are released here; requests in flight keep the objects they hold."""
        with self._lock:
            changed = [c for c, p in pins.items() if c not in self._pins or self._pins[c].version != p.version]
            self._pins = {**pins}  # replaced pins close their files once nothing holds them (a load in flight)
            for cid in list(self._models):
                if cid not in pins or self._models[cid][0] != pins[cid].version:
                    del self._models[cid]
            for cid in pins:
                self._expert_locks.setdefault(cid, threading.Lock())
        return changed
