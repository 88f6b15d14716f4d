"""Resumable training checkpoints, written atomically, verified on load, newest two kept.

One checkpoint is a directory ``step-NNNNNNNN/`` holding::

    model.safetensors      the model's parameters (tied weights stored once)
    optimizer.safetensors  the optimizer's per-parameter tensors ("state.<i>.<name>")
    rng.safetensors        torch CPU and (the model's GPU) CUDA RNG states, numpy's MT19937 keys
    state.json             step, optimizer param groups, scheduler, python RNG, the caller's state
                           (data position, metrics so far), and the sha256 of each file above

It is written into a temporary sibling, fsynced and renamed into place, so a kill -9 at any moment leaves
either the complete checkpoint or none. Open formats only (safetensors + JSON): no pickles are loaded.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np

from ground.errors import UserInputError
from ground.files import atomic_dir, file_sha256

log = logging.getLogger(__name__)

FORMAT = "cbtm-checkpoint/1"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CorruptCheckpoint(Exception):
    """A checkpoint directory that cannot be loaded (missing file, bad hash, unreadable JSON)."""


class CheckpointStore:
    """The checkpoints of one training run in ``root``; ``keep`` newest complete ones survive pruning.

    ``keep`` is at least 2 so that a checkpoint found corrupt on load (a disk fault, a copy cut short)
    still has a predecessor to fall back to.
    """

    def __init__(self, root: Path, keep: int = 2):
        self.root, self.keep = Path(root), max(2, keep)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)))

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def save(self, step: int, model, optimizer, scheduler, state: dict) -> Path:
        """Write the checkpoint of ``step`` atomically, then prune all but the newest ``keep``."""
        from safetensors.torch import save_file, save_model

        final = self.path(step)
        with atomic_dir(final) as tmp:
            save_model(model, str(tmp / "model.safetensors"))
            tensors, groups = _optimizer_tensors(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            rng_tensors, rng_json = _capture_rng(next(model.parameters()).device)
            save_file(rng_tensors, str(tmp / "rng.safetensors"))
            meta = {"format": FORMAT, "step": step, "param_groups": groups,
                    "scheduler": scheduler.state_dict(), "python_rng": rng_json, "state": state,
                    "sha256": {name: file_sha256(tmp / name) for name in FILES}}
            (tmp / "state.json").write_text(json.dumps(meta))
            _fsync_dir(tmp)
        _fsync_dir(self.root)
        self.prune()
        return final

    def prune(self) -> None:
        for step in self.steps()[:-self.keep]:
            shutil.rmtree(self.path(step), ignore_errors=True)

    def load_latest(self, model, optimizer, scheduler) -> dict | None:
        """Restore the newest loadable checkpoint into model/optimizer/scheduler and the RNGs.

        Returns ``{"step": int, "state": dict}`` or None when there is no checkpoint. A corrupt checkpoint is
        renamed ``step-N.corrupt-<time>`` (kept, not deleted) with a warning and the previous one is tried; raises
        UserInputError when every checkpoint is corrupt, leaving them in place.
        """
        steps = self.steps()
        errors = []
        for step in reversed(steps):
            try:
                meta = self._verified_meta(step)
                self._restore(step, meta, model, optimizer, scheduler)
            except CorruptCheckpoint as exc:
                errors.append(f"step {step}: {exc}")
                log.warning("checkpoint %s is corrupt (%s); falling back to the previous one", self.path(step), exc)
                continue
            for bad in steps:  # newer corrupt ones must not shadow the checkpoints written from here on
                if bad > step:
                    os.replace(self.path(bad), self.root / f"step-{bad:08d}.corrupt-{time.time_ns()}")
            return {"step": step, "state": meta["state"]}
        if errors:
            raise UserInputError(f"every checkpoint in {self.root} is corrupt ({'; '.join(errors)}): delete that "
                                 "directory to train this expert from the start")
        return None

    def _verified_meta(self, step: int) -> dict:
        path = self.path(step)
        try:
            meta = json.loads((path / "state.json").read_text())
        except (OSError, ValueError) as exc:
            raise CorruptCheckpoint(f"state.json unreadable: {type(exc).__name__}") from exc
        if meta.get("format") != FORMAT or meta.get("step") != step:
            raise CorruptCheckpoint(f"state.json is not a {FORMAT} checkpoint of step {step}")
        for name in FILES:
            if not (path / name).is_file() or file_sha256(path / name) != meta["sha256"].get(name):
                raise CorruptCheckpoint(f"{name} is missing or does not match its sha256")
        return meta

    def _restore(self, step: int, meta: dict, model, optimizer, scheduler) -> None:
        from safetensors.torch import load_file, load_model

        path = self.path(step)
        device = next(model.parameters()).device
        try:
            missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False,
                                             device=str(device))
            if missing or unexpected:
                raise CorruptCheckpoint(f"model.safetensors does not fit this model ({len(missing)} missing, "
                                        f"{len(unexpected)} unexpected tensors)")
            optimizer.load_state_dict(_optimizer_state(load_file(str(path / "optimizer.safetensors")),
                                                       meta["param_groups"]))
            scheduler.load_state_dict(meta["scheduler"])
            _restore_rng(load_file(str(path / "rng.safetensors")), meta["python_rng"], device)
        except CorruptCheckpoint:
            raise
        except Exception as exc:  # safetensors/torch raise many types for a damaged file
            raise CorruptCheckpoint(f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}") from exc

    def clear(self) -> None:
        """Delete every checkpoint of this run (once its final model is safely written)."""
        shutil.rmtree(self.root, ignore_errors=True)


def _optimizer_tensors(optimizer) -> tuple[dict, list]:
    """The optimizer state dict as flat tensors ``state.<param index>.<name>`` + JSON-able param groups."""
    import torch

    sd = optimizer.state_dict()
    tensors = {}
    for index, values in sd["state"].items():
        for name, value in values.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
    return tensors, sd["param_groups"]


def _optimizer_state(tensors: dict, groups: list) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def _capture_rng(device) -> tuple[dict, dict]:
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if device.type == "cuda":  # only this expert's GPU: experts on other GPUs keep their own streams
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    version, internal, gauss_next = random.getstate()
    return tensors, {"python": [version, list(internal), gauss_next],
                     "numpy": [kind, int(pos), int(has_gauss), float(gauss)]}


def _restore_rng(tensors: dict, state: dict, device) -> None:
    import torch

    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["cuda"], device)
    kind, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _fsync_dir(path: Path) -> None:
    """fsync every file in ``path`` and the directory itself: a checkpoint must survive a power cut too."""
    for child in [*(p for p in path.iterdir() if p.is_file()), path]:
        fd = os.open(child, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
