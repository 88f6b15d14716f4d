"""Per-cluster expert training: branch from the seed, train on the cluster's documents only."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ensemble.device import autocast_dtype, resolve_device
from ensemble.progress import progress
from ensemble.rundir import UserInputError, atomic_dir
from experts.config import TrainConfig
from experts.seed import load_causal_lm
from experts.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

LOG_EVERY = 10
MAX_VAL_BLOCKS = 64


def cluster_texts(corpus_path: Path, assignments_path: Path, cluster_id: int, split: str) -> list[str]:
    """Texts of one split ("train" | "heldout") assigned to ``cluster_id``, in corpus order."""
    assign = pq.read_table(assignments_path, columns=["id", "split", "cluster_id"])
    mask = pc.and_(pc.equal(assign["cluster_id"], cluster_id), pc.equal(assign["split"], split))
    wanted = set(assign.filter(mask).column("id").to_pylist())
    docs = pq.read_table(corpus_path, columns=["id", "text"], filters=[("split", "=", split)])
    return [t for i, t in zip(docs.column("id").to_pylist(), docs.column("text").to_pylist()) if i in wanted]


def pack(tokenizer, texts: list[str]) -> np.ndarray:
    """Token ids (int64 [n_tokens]) of the texts, each followed by the eos separator."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int64)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to ``cfg.min_lr_ratio`` at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    done = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))


def evaluate(model, tokens: np.ndarray, block_size: int, device: str, dtype) -> float | None:
    """Mean next-token loss over non-overlapping blocks of ``tokens`` (None if fewer than 2 tokens)."""
    import torch

    if len(tokens) < 2:
        return None
    size = min(block_size, len(tokens))
    n_blocks = min(MAX_VAL_BLOCKS, len(tokens) // size)
    blocks = torch.from_numpy(tokens[: n_blocks * size].reshape(n_blocks, size)).to(device)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), _autocast(device, dtype):
        for start in range(0, n_blocks, 16):
            batch = blocks[start:start + 16]
            loss = model(input_ids=batch, labels=batch).loss
            total += float(loss) * len(batch)
            count += len(batch)
    model.train()
    return total / count


def _autocast(device: str, dtype):
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def train_expert(cfg: TrainConfig, seed_dir: Path, corpus_path: Path, assignments_path: Path,
                 cluster_id: int, out_dir: Path, show_progress: bool = True) -> dict:
    """Train the expert of ``cluster_id`` from the seed in ``seed_dir``; write it to ``out_dir`` atomically.

    The expert sees only its cluster's training documents, packed into blocks of ``cfg.block_size`` tokens
    sampled at random offsets (seeded), and is validated on its cluster's held-out documents. Returns the
    summary also written to ``out_dir/expert.json`` (steps, tokens, final train/val loss, seconds).
    """
    import torch

    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(seed_dir)
    train_tokens = pack(tokenizer, cluster_texts(corpus_path, assignments_path, cluster_id, "train"))
    val_tokens = pack(tokenizer, cluster_texts(corpus_path, assignments_path, cluster_id, "heldout"))
    if len(train_tokens) < cfg.block_size + 1:
        raise UserInputError(f"cluster {cluster_id} has {len(train_tokens)} training tokens, fewer than one block "
                             f"of {cfg.block_size}: use fewer clusters or a smaller train.block_size")
    torch.manual_seed(cfg.seed + cluster_id)
    model = load_causal_lm(seed_dir).to(device)
    started = time.perf_counter()
    metrics = _train_loop(cfg, model, train_tokens, val_tokens, cluster_id, device, show_progress)
    summary = {"cluster_id": cluster_id, "steps": cfg.steps, "tokens": cfg.steps * cfg.batch_size * cfg.block_size,
               "train_tokens_available": int(len(train_tokens)), "heldout_tokens": int(len(val_tokens)),
               "train_loss": metrics[-1]["train_loss"], "val_loss": metrics[-1]["val_loss"],
               "seconds": round(time.perf_counter() - started, 2), "device": device}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
        (tmp / "expert.json").write_text(json.dumps(summary, indent=2))
    log.info("expert %d: %d steps, train loss %.3f, val loss %s, %.1fs", cluster_id, cfg.steps,
             summary["train_loss"], _fmt(summary["val_loss"]), summary["seconds"])
    return summary


def _train_loop(cfg: TrainConfig, model, train_tokens: np.ndarray, val_tokens: np.ndarray, cluster_id: int,
                device: str, show_progress: bool) -> list[dict]:
    """AdamW steps on random blocks of ``train_tokens``; returns the metrics rows (one per LOG_EVERY steps)."""
    import torch

    dtype = autocast_dtype(device, cfg.precision)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + cluster_id)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    data, offsets = torch.from_numpy(train_tokens), torch.arange(cfg.block_size)
    metrics, window_loss, window_steps, window_start = [], 0.0, 0, time.perf_counter()
    bar = progress(range(cfg.steps), desc=f"expert {cluster_id}", unit="step", disable=not show_progress)
    for step in bar:
        starts = torch.randint(0, len(data) - cfg.block_size + 1, (cfg.batch_size,), generator=gen)
        batch = data[starts[:, None] + offsets].to(device)
        with _autocast(device, dtype):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_loss += float(loss.detach())
        window_steps += 1
        done = step + 1
        if done % LOG_EVERY and done != cfg.steps and done % cfg.eval_every:
            continue
        tok_s = window_steps * cfg.batch_size * cfg.block_size / max(time.perf_counter() - window_start, 1e-9)
        evaluate_now = done % cfg.eval_every == 0 or done == cfg.steps
        metrics.append({"step": done, "tokens": done * cfg.batch_size * cfg.block_size,
                        "train_loss": round(window_loss / window_steps, 4),
                        "val_loss": evaluate(model, val_tokens, cfg.block_size, device, dtype) if evaluate_now else None,
                        "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(tok_s, 1)})
        bar.set_postfix(loss=f"{metrics[-1]['train_loss']:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    bar.close()
    return metrics


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def read_metrics(expert_dir: Path) -> list[dict]:
    path = Path(expert_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
