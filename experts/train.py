"""Per-cluster expert training: branch from the seed, train on the cluster's documents only, survive kills.

`train_expert` is the stage; `run_training` is the loop shared with the seed phase (`experts.seed.pretrain_seed`):
AdamW, linear warmup + cosine decay, gradient accumulation and clipping, bf16 autocast (CPU and CUDA, unless
``precision="fp32"``), optional `torch.compile`, resumable checkpoints (`experts.checkpoint`), metrics.jsonl
and a loss-curve PNG. Seeded: on CPU the same config, seed and data give bit-identical weights, also across a
kill and resume (the data position, optimizer, scheduler and RNG states are all checkpointed).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from experts.checkpoint import CheckpointStore
from experts.config import TrainConfig
from experts.data import BlockSampler, gather, token_stream, tokenize_corpus
from experts.models import load_causal_lm, read_vocab_size
from experts.tokenizer import open_tokenizer
from ground import faults, interrupt
from ground.device import autocast_dtype, resolve_device
from ground.errors import UserInputError
from ground.files import atomic_dir, check_writable, hash_json, hash_path
from ground.loading import quiet_transformers
from ground.plots import figure, save_figure
from ground.progress import progress
from ground.rundir import hashed_settings

log = logging.getLogger(__name__)

LOG_EVERY = 10
MAX_VAL_BLOCKS = 32  # evenly spread held-out blocks per evaluation: ~3% of training time at eval_every=50


def train_expert(cfg: TrainConfig, seed_dir: Path, corpus_path: Path, assignments_path: Path,
                 cluster_id: int, out_dir: Path, show_progress: bool = True, *,
                 checkpoint_dir: Path | None = None, steps: int | None = None, init_dir: Path | None = None,
                 device: str | None = None, cache_dir: Path | None = None,
                 on_step: Callable[[int], None] | None = None) -> dict:
    """Train the expert of ``cluster_id`` from the seed in ``seed_dir``; write it to ``out_dir`` atomically.

    The expert sees only its cluster's training documents (``train_cluster_id`` when the assignments have
    it, else ``cluster_id``), packed into blocks of ``cfg.block_size`` tokens, and is validated on its
    cluster's held-out documents. ``steps`` overrides ``cfg.steps`` (the budget's share, 0: skip);
    ``init_dir`` starts from that model (e.g. the current expert, for ``retrain --continue``) instead of the
    seed; ``checkpoint_dir`` enables resumable checkpoints every ``cfg.checkpoint_every`` steps (the same call
    after a kill resumes); ``device`` overrides ``cfg.device`` (one expert per GPU); ``cache_dir`` holds the
    tokenized corpus; ``on_step(step)`` is called after every optimizer step (tests use it to interrupt).

    Returns the summary also written to ``out_dir/expert.json``: cluster_id, steps, tokens, train_loss,
    val_loss, seconds, device, tokens_per_s, resumed_from, skipped (False). A cluster with fewer training
    tokens than one block, or 0 budgeted steps, is skipped with a warning: nothing is written and the summary
    has skipped=True and a reason (the run should route nothing to it).
    """
    device = resolve_device(device or cfg.device)
    if steps is not None:
        cfg = replace(cfg, steps=max(int(steps), 1))
    tokenizer = open_tokenizer(seed_dir)
    tokens = tokenize_corpus(tokenizer, corpus_path, cache_dir)
    train = token_stream(tokens, assignments_path, cluster_id, "train", len(tokenizer), cache_dir)
    val = token_stream(tokens, assignments_path, cluster_id, "heldout", len(tokenizer), cache_dir)
    base = {"cluster_id": cluster_id, "device": device, "train_tokens_available": int(len(train)),
            "heldout_tokens": int(len(val))}
    reason = None
    if len(train) < cfg.block_size:
        reason = (f"{len(train)} training tokens, fewer than one block of {cfg.block_size}: use fewer clusters "
                  "or a smaller train.block_size")
    elif steps == 0:
        reason = "the compute budget gives it no step"
    if reason:
        log.warning("expert %d skipped: %s", cluster_id, reason)
        return {**base, "skipped": True, "reason": reason, "steps": 0, "tokens": 0, "train_loss": None,
                "val_loss": None, "seconds": 0.0}
    if init_dir is not None:
        _check_same_vocab(Path(init_dir), Path(seed_dir))
    check_writable(Path(out_dir).parent, f"expert {cluster_id}")  # before hours of training, not after
    if checkpoint_dir is not None and cfg.checkpoint_every:
        check_writable(Path(checkpoint_dir), f"the checkpoints of expert {cluster_id}")
    summary = run_training(cfg, Path(init_dir or seed_dir), tokenizer, train, val, out_dir, device=device,
                           name=f"expert {cluster_id}", key=(cfg.seed, cluster_id + 1),
                           checkpoint_dir=checkpoint_dir, show_progress=show_progress, on_step=on_step,
                           extra={**base, "init": "expert" if init_dir is not None else "seed"})
    return summary


def run_training(cfg: TrainConfig, init_dir: Path, tokenizer, train_tokens: np.ndarray, val_tokens: np.ndarray,
                 out_dir: Path, *, device: str, name: str, key: tuple[int, ...], checkpoint_dir: Path | None = None,
                 show_progress: bool = True, on_step: Callable[[int], None] | None = None,
                 extra: dict | None = None) -> dict:
    """Train the model in ``init_dir`` for ``cfg.steps`` steps on blocks of ``train_tokens`` (int [n]) and
    write it, the tokenizer, metrics.jsonl, loss.png and expert.json (the returned summary) to ``out_dir``.

    ``key`` seeds the data order; checkpoints go to ``checkpoint_dir/<fingerprint>`` so a changed config
    or init model never resumes from another run's state.
    """
    import torch

    torch.manual_seed(cfg.seed + key[-1])
    model = load_causal_lm(init_dir).to(device)
    # The budget (total_tokens, budget_split) is already resolved into cfg.steps: only the steps count.
    settings = hashed_settings(replace(cfg, total_tokens=None, budget_split="proportional"))
    fingerprint = hash_json({"cfg": settings,
                             "init": hash_path(init_dir), "key": key,
                             "data": [_data_id(train_tokens), _data_id(val_tokens)]})[:16]
    store = None
    if checkpoint_dir is not None and cfg.checkpoint_every:
        store = CheckpointStore(Path(checkpoint_dir) / fingerprint)
        _warn_other_checkpoints(Path(checkpoint_dir), fingerprint)
    started = time.perf_counter()
    state = _train_loop(cfg, model, train_tokens, val_tokens, name=name, key=key, device=device, store=store,
                        show_progress=show_progress, on_step=on_step)
    metrics = state.metrics
    wall = time.perf_counter() - started
    summary = {**(extra or {}), "steps": cfg.steps, "tokens": cfg.steps * cfg.tokens_per_step,
               "train_loss": metrics[-1]["train_loss"], "val_loss": metrics[-1]["val_loss"],
               "seconds": round(state.seconds, 2), "device": device, "skipped": False,
               "tokens_per_s": round((cfg.steps - state.resumed_from) * cfg.tokens_per_step / max(wall, 1e-9), 1),
               "resumed_from": state.resumed_from or None,
               "params": sum(p.numel() for p in model.parameters()), "fingerprint": fingerprint}
    with atomic_dir(out_dir) as tmp:
        with quiet_transformers():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
        (tmp / "expert.json").write_text(json.dumps(summary, indent=2))
        plot_metrics(metrics, tmp / "loss.png", title=name)
    if store is not None:
        store.clear()
        with contextlib.suppress(OSError):
            Path(checkpoint_dir).rmdir()  # only when no other run's checkpoints are left in it
    log.info("%s: %d steps, train loss %.3f, val loss %s, %.1fs", name, cfg.steps, summary["train_loss"],
             _fmt(summary["val_loss"]), summary["seconds"])
    return summary


@dataclass
class _State:
    """What a checkpoint carries besides tensors: enough to continue the metrics exactly where they were."""

    step: int = 0
    metrics: list = field(default_factory=list)
    window_loss: float = 0.0      # sum of micro-batch losses since the last metrics row
    window_micro: int = 0         # micro-batches in that sum
    seconds: float = 0.0          # training wall time over every attempt
    sampler: dict = field(default_factory=dict)
    resumed_from: int = 0


def _train_loop(cfg: TrainConfig, model, train_tokens, val_tokens, *, name, key, device, store,
                show_progress, on_step) -> _State:
    """AdamW steps on packed blocks of ``train_tokens``, resuming from ``store``'s newest checkpoint."""
    import torch

    dtype = autocast_dtype(device, cfg.precision)
    optimizer, scheduler = _optimizer(cfg, model, device)
    sampler = BlockSampler(len(train_tokens), cfg.block_size, key)
    state = _resume(store, model, optimizer, scheduler, sampler, name)
    forward = torch.compile(model) if cfg.compile else model
    model.train()
    window = torch.tensor(state.window_loss, dtype=torch.float32, device=device)
    clock = _Clock(state.seconds)
    bar = progress(total=cfg.steps, initial=state.step, desc=name, unit="step", disable=not show_progress)
    for step in range(state.step, cfg.steps):
        for _ in range(cfg.grad_accum):
            batch = torch.from_numpy(gather(train_tokens, sampler.next(cfg.batch_size), cfg.block_size))
            batch = batch.to(device, non_blocking=True)
            with _autocast(device, dtype):
                loss = forward(input_ids=batch, labels=batch).loss
            (loss if cfg.grad_accum == 1 else loss / cfg.grad_accum).backward()
            window += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step, state.window_micro = step + 1, state.window_micro + cfg.grad_accum
        if state.step % LOG_EVERY == 0 or state.step % cfg.eval_every == 0 or state.step == cfg.steps:
            row = _metrics_row(cfg, state, float(window), clock.lap(), scheduler.get_last_lr()[0], name)
            if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
                since = time.perf_counter()
                row["val_loss"] = evaluate(model, val_tokens, cfg.block_size, device, dtype)
                clock.exclude(since)  # tokens/s measures training, not evaluation
            state.metrics.append(row)
            window.zero_()
            state.window_micro = 0
            _append_live(store, row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}", refresh=False)
        if store is not None and (state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps):
            _checkpoint(store, model, optimizer, scheduler, sampler, state, float(window), clock, name)
        bar.update(1)
        faults.point(f"step:{name}")
        interrupt.check()  # Ctrl-C reaches the main thread only; this loop may run in a runner's worker thread
        if on_step is not None:
            on_step(state.step)
    bar.close()
    state.seconds = clock.total()
    return state


def _optimizer(cfg: TrainConfig, model, device: str):
    import torch

    # fused AdamW is one kernel per step on CUDA; on CPU the default (foreach) is the fastest measured.
    fused = {"fused": True} if device.startswith("cuda") else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.95), **fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    return optimizer, scheduler


def _resume(store, model, optimizer, scheduler, sampler: BlockSampler, name: str) -> _State:
    """The saved `_State` of the newest loadable checkpoint (restoring every tensor and RNG), or a fresh one."""
    restored = store.load_latest(model, optimizer, scheduler) if store is not None else None
    if restored is None:
        return _State()
    state = _State(**restored["state"])
    state.resumed_from = restored["step"]
    sampler.load_state_dict(state.sampler)
    _rewrite_live(store, state.metrics)
    log.info("%s: resumed from the checkpoint of step %d", name, state.step)
    return state


def _checkpoint(store, model, optimizer, scheduler, sampler, state: _State, window: float, clock, name) -> None:
    if not math.isfinite(window):
        raise FloatingPointError(f"{name}: training loss is {window} at step {state.step}; not checkpointing it "
                                 "(lower train.lr or raise train.warmup_steps)")
    state.window_loss, state.sampler, state.seconds = window, sampler.state_dict(), clock.total()
    saved = {k: v for k, v in asdict(state).items() if k != "resumed_from"}
    since = time.perf_counter()
    store.save(state.step, model, optimizer, scheduler, saved)
    clock.exclude(since)  # the checkpoint write is not training throughput either


def _metrics_row(cfg: TrainConfig, state: _State, window: float, seconds: float, lr: float, name: str) -> dict:
    """One metrics.jsonl row: step, tokens, train_loss (mean since the previous row), val_loss, lr, tokens_per_s."""
    loss = window / max(state.window_micro, 1)
    if not math.isfinite(loss):
        raise FloatingPointError(f"{name}: training loss is {loss} at step {state.step} "
                                 "(lower train.lr or raise train.warmup_steps)")
    tokens = state.window_micro * cfg.batch_size * cfg.block_size
    return {"step": state.step, "tokens": state.step * cfg.tokens_per_step, "train_loss": round(loss, 4),
            "val_loss": None, "lr": lr, "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}


class _Clock:
    """Training wall time in laps, minus the time spent in `exclude`d work (evaluation, checkpoint writes)."""

    def __init__(self, previous: float = 0.0):
        self._previous, self._start = previous, time.perf_counter()
        self._lap, self._excluded = self._start, 0.0

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self._lap, self._excluded = now - self._lap - self._excluded, now, 0.0
        return seconds

    def exclude(self, since: float) -> None:
        self._excluded += time.perf_counter() - since

    def total(self) -> float:
        return self._previous + time.perf_counter() - self._start


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to ``cfg.min_lr_ratio`` at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    done = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))


def evaluate(model, tokens: np.ndarray, block_size: int, device: str, dtype,
             max_blocks: int = MAX_VAL_BLOCKS) -> float | None:
    """Mean next-token loss over at most ``max_blocks`` non-overlapping blocks spread evenly over ``tokens``
    (int [n]); None if fewer than 2 tokens."""
    import torch

    if len(tokens) < 2:
        return None
    size = min(block_size, len(tokens))
    n_all = len(tokens) // size
    starts = np.unique(np.linspace(0, n_all - 1, min(max_blocks, n_all)).round().astype(np.int64)) * size
    blocks = torch.from_numpy(gather(tokens, starts, size)).to(device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), _autocast(device, dtype):
        for start in range(0, len(blocks), 16):
            batch = blocks[start:start + 16]
            total += float(model(input_ids=batch, labels=batch).loss) * len(batch)
            count += len(batch)
    model.train(was_training)
    return total / count


def _autocast(device: str, dtype):
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def training_devices(device: str = "auto") -> list[str]:
    """Devices to train experts on at once, one expert each: every visible GPU for "auto"/"cuda", else
    ``[device]`` (on CPU one expert at a time, using every core)."""
    import torch

    resolved = resolve_device(device)
    if resolved in ("cuda",) and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [resolved]


def plot_metrics(metrics: list[dict], path: Path, title: str = "") -> Path:
    """Loss curve PNG: train loss (line) and held-out loss (dots) against training tokens."""
    fig = figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.plot([r["tokens"] for r in metrics], [r["train_loss"] for r in metrics], label="train")
    val = [(r["tokens"], r["val_loss"]) for r in metrics if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o", label="held-out")
    ax.set(xlabel="training tokens", ylabel="loss (nats/token)", title=title)
    ax.legend()
    return save_figure(fig, path, dpi=80)


def _check_same_vocab(init_dir: Path, seed_dir: Path) -> None:
    vocab = {where: read_vocab_size(where) for where in (init_dir, seed_dir)}
    if vocab[init_dir] != vocab[seed_dir]:
        raise UserInputError(f"{init_dir} has a vocabulary of {vocab[init_dir]}, the seed {vocab[seed_dir]}: "
                             "every expert must share the seed's tokenizer; retrain from the seed instead")


def _data_id(tokens: np.ndarray) -> str:
    filename = getattr(tokens, "filename", None)  # a cached stream's name already encodes its content
    if filename:
        return Path(filename).name
    return hash_json([len(tokens), np.asarray(tokens[:4096]).tolist(), np.asarray(tokens[-4096:]).tolist()])


def _warn_other_checkpoints(checkpoint_dir: Path, fingerprint: str) -> None:
    others = [p.name for p in checkpoint_dir.iterdir() if p.is_dir() and p.name != fingerprint] \
        if checkpoint_dir.is_dir() else []
    if others:
        log.warning("ignoring checkpoints of other settings in %s (%s); delete them to free the space",
                    checkpoint_dir, ", ".join(others))


def _append_live(store, row: dict) -> None:
    """Metrics while training, in the checkpoint directory: `tail -f` them during a long run."""
    if store is not None:
        store.root.mkdir(parents=True, exist_ok=True)
        with open(store.root / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")


def _rewrite_live(store, rows: list[dict]) -> None:
    (store.root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def read_metrics(expert_dir: Path) -> list[dict]:
    path = Path(expert_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
