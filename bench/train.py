"""Training throughput: the expert stage (`train_expert`) vs a bare, minimal PyTorch loop, same process.

Prepares, in a temporary directory: the BBC News training split (../shared/data/bbc_news/train.jsonl.gz)
ingested by the ingest stage, every document in one cluster, a byte-level BPE tokenizer trained on it and a
from-scratch seed of the chosen preset. Both paths train that seed with the same batch, sequence length,
optimizer (AdamW + clipping), precision and threads:

- stage: `train_expert` with its defaults for everything else: checkpoints every `train.checkpoint_every`
  (50) steps and at the end, held-out evaluation every `train.eval_every` (50) steps and at the end,
  metrics rows, progress bookkeeping.
- bare: ``x = random blocks; loss = model(x, labels=x).loss; backward; clip; AdamW step; zero_grad``.

The machine is shared with other processes, so the two are measured *interleaved*: the stage's ``on_step``
hook runs one bare step after each stage step, so both see the same load. Stage time per step is the wall
time between two hooks, bare time is the hook's own step. Load spikes of other processes hit single steps,
so the comparison uses medians of plain steps, plus the stage's own periodic work measured directly and
amortized: checkpoint writes and held-out evaluations (each call timed) and metrics rows (extra time of
those steps). Evaluations are shown with and without: the bare loop does no such work (its cost is set by
`train.eval_every`); the >= 0.95x target is about training. Raw totals are printed too, and with
``--sequential`` a whole `train_expert` call (model load, cached tokenization, final save, plot included)
against a bare run of the same steps, one after the other. Nothing is written outside the temporary
directory, which is removed at the end.

    python bench/train.py                              # preset 1m, batch 8 x 128, 100 steps, precision auto
    python bench/train.py --precision fp32             # what CPUs without native bf16 should train in
    python bench/train.py --preset 2m --sequential
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "bbc_news" / "train.jsonl.gz"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA,
                        help="gzip JSON Lines with id and text (default: %(default)s)")
    parser.add_argument("--preset", default="1m", help="seed preset (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--sequential", action="store_true",
                        help="also time a whole train_expert call vs a bare run one after the other "
                             "(meaningful only on an otherwise idle machine)")
    return parser.parse_args()


def prepare(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path, Path]:
    """(corpus parquet, assignments with every document in cluster 0, seed dir)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cluster.config import CorpusConfig
    from cluster.corpus import ingest_corpus, read_documents
    from experts.config import SeedConfig
    from experts.seed import build_seed
    from experts.tokenizer import train_tokenizer

    corpus = ingest_corpus(CorpusConfig(path=str(args.data), id_field="id"), tmp / "docs.parquet")
    docs = read_documents(corpus, columns=["id", "split"])
    assignments = tmp / "assignments.parquet"
    pq.write_table(pa.table({"id": docs.column("id"), "split": docs.column("split"),
                             "cluster_id": pa.array([0] * docs.num_rows, pa.int32())}), assignments)
    seed_cfg = SeedConfig(model=f"preset:{args.preset}", vocab_size=args.vocab_size,
                          max_position_embeddings=max(512, args.block_size))
    seed_dir = build_seed(seed_cfg, train_tokenizer(seed_cfg, corpus, tmp / "tokenizer"), tmp / "seed")
    return corpus, assignments, seed_dir


class BareLoop:
    """The minimal loop, one step per `step()` call, on random blocks of ``tokens``."""

    def __init__(self, cfg, seed_dir: Path, tokens):
        import numpy as np
        import torch

        from experts.models import load_causal_lm
        from ground.device import autocast_dtype, resolve_device

        self.torch, self.cfg = torch, cfg
        self.device = resolve_device(cfg.device)
        self.dtype = autocast_dtype(self.device, cfg.precision)
        torch.manual_seed(0)
        self.model = load_causal_lm(seed_dir).to(self.device).train()
        self.data = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        self.offsets = torch.arange(cfg.block_size)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(0.9, 0.95))

    def step(self) -> float:
        torch, cfg = self.torch, self.cfg
        starts = torch.randint(0, len(self.data) - cfg.block_size + 1, (cfg.batch_size,))
        x = self.data[starts[:, None] + self.offsets].to(self.device)
        with torch.autocast(self.device.split(":")[0], dtype=self.dtype or torch.float32,
                            enabled=self.dtype is not None):
            loss = self.model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())  # waits for the device, like the stage's logging does


def timing(calls: list):
    """Wrap a function so that each call's seconds are appended to ``calls``."""
    def wrap(fn):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                calls.append(time.perf_counter() - started)
        return timed
    return wrap


def interleaved(cfg, seed_dir, corpus, assignments, tokens, tmp) -> dict:
    """Per-step seconds of the stage and the bare loop, one bare step after each stage step, plus the seconds
    of each held-out evaluation and checkpoint write inside the stage, and the stage's summary."""
    import experts.train
    from experts.checkpoint import CheckpointStore
    from experts.train import train_expert

    bare = BareLoop(cfg, seed_dir, tokens)
    marks, bare_s, eval_s, ckpt_s = [], [], [], []
    evaluate, save = experts.train.evaluate, CheckpointStore.save

    def hook(step: int) -> None:
        entered = time.perf_counter()
        bare.step()
        left = time.perf_counter()
        bare_s.append(left - entered)
        marks.append((entered, left))

    # The loop calls the module's `evaluate` and the store's `save`: time each call.
    experts.train.evaluate, CheckpointStore.save = timing(eval_s)(evaluate), timing(ckpt_s)(save)
    try:
        summary = train_expert(cfg, seed_dir, corpus, assignments, 0, tmp / "expert-i", show_progress=False,
                               checkpoint_dir=tmp / "checkpoints", cache_dir=tmp / "cache", on_step=hook)
    finally:
        experts.train.evaluate, CheckpointStore.save = evaluate, save
    stage_s = [marks[i][0] - marks[i - 1][1] for i in range(1, len(marks))]  # steps 2..N
    return {"stage": stage_s, "bare": bare_s[1:], "eval": eval_s, "ckpt": ckpt_s, "summary": summary}


def sequential(cfg, seed_dir, corpus, assignments, tokens, tmp) -> tuple[float, float]:
    """(stage seconds for the whole call, bare seconds for the same steps incl. optimizer creation)."""
    from experts.train import train_expert

    started = time.perf_counter()
    train_expert(cfg, seed_dir, corpus, assignments, 0, tmp / "expert-s", show_progress=False,
                 checkpoint_dir=tmp / "checkpoints", cache_dir=tmp / "cache")
    stage = time.perf_counter() - started
    started = time.perf_counter()
    bare = BareLoop(cfg, seed_dir, tokens)
    for _ in range(cfg.steps):
        bare.step()
    return stage, time.perf_counter() - started


def main() -> None:
    args = parse_args()
    import torch

    from experts.config import TrainConfig
    from experts.data import token_stream, tokenize_corpus
    from experts.tokenizer import load_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="cbtm-bench-train-"))
    try:
        corpus, assignments, seed_dir = prepare(args, tmp)
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, block_size=args.block_size,
                          precision=args.precision)
        tok = load_tokenizer(seed_dir)
        tokens = token_stream(tokenize_corpus(tok, corpus, tmp / "cache"), assignments, 0, "train", len(tok),
                              tmp / "cache")
        warm = BareLoop(replace(cfg, steps=3), seed_dir, tokens)
        for _ in range(3):  # allocator, oneDNN kernels, page cache
            warm.step()
        runs = interleaved(cfg, seed_dir, corpus, assignments, tokens, tmp)
        seq = sequential(cfg, seed_dir, corpus, assignments, tokens, tmp) if args.sequential else None
        report(args, cfg, len(tokens), runs, seq, torch)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(args, cfg, n_tokens, runs: dict, seq, torch) -> None:
    from experts.train import LOG_EVERY

    tps, summary, n = cfg.tokens_per_step, runs["summary"], len(runs["stage"])
    print(f"\npreset {args.preset} ({summary['params'] / 1e6:.2f}M params), batch {cfg.batch_size} x {cfg.block_size}"
          f" tokens, {cfg.steps} steps, precision {cfg.precision} on {summary['device']}, "
          f"{torch.get_num_threads()} threads, {n_tokens:,} training tokens (BBC train); checkpoints every "
          f"{cfg.checkpoint_every} steps ({len(runs['ckpt'])} written, {sum(runs['ckpt']):.2f} s), held-out "
          f"evaluation every {cfg.eval_every} ({len(runs['eval'])} done, {sum(runs['eval']):.2f} s)")
    # Steps 2..N; step i+2's interval holds a metrics row, evaluation or checkpoint when those are due.
    plain = [s for i, s in enumerate(runs["stage"]) if (i + 2) % LOG_EVERY and (i + 2) % cfg.checkpoint_every]
    med_stage, med_bare = statistics.median(plain), statistics.median(runs["bare"])
    bare = tps / med_bare
    rows = [("median plain step (no metrics row, eval or checkpoint in it)", tps / med_stage),
            ("median step + checkpoint writes and metrics rows, amortized (the target)",
             n * tps / (n * med_stage + sum(runs["ckpt"]) + _row_extra(runs["stage"], med_stage, cfg, LOG_EVERY))),
            ("same + held-out evaluations, amortized",
             n * tps / (n * med_stage + sum(runs["ckpt"]) + _row_extra(runs["stage"], med_stage, cfg, LOG_EVERY)
                        + sum(runs["eval"])))]
    print("| measurement (bare loop: median step) | bare loop tok/s | stage tok/s | stage / bare |")
    print("|---|---:|---:|---:|")
    for name, stage in rows:
        print(f"| {name} | {bare:,.0f} | {stage:,.0f} | {stage / bare:.3f} |")
    # Each stage step and the bare step right after it ran under nearly the same load: pair them.
    paired = [b / s for i, (s, b) in enumerate(zip(runs["stage"], runs["bare"]))
              if (i + 2) % LOG_EVERY and (i + 2) % cfg.checkpoint_every]
    print(f"| median of paired plain-step ratios (bare step time / stage step time) | | | "
          f"{statistics.median(paired):.3f} |")
    total_b, total_s = len(runs["bare"]) * tps / sum(runs["bare"]), n * tps / sum(runs["stage"])
    print(f"| raw totals over steps 2..{cfg.steps} (sensitive to other processes' load spikes) | {total_b:,.0f} | "
          f"{total_s:,.0f} | {total_s / total_b:.3f} |")
    if seq:
        ss, sb = cfg.steps * tps / seq[0], cfg.steps * tps / seq[1]
        print(f"| sequential: whole `train_expert` call (+ model load, final save, plot) vs bare run | {sb:,.0f} | "
              f"{ss:,.0f} | {ss / sb:.3f} |")


def _row_extra(stage_s: list, med: float, cfg, log_every: int) -> float:
    """Seconds the metrics rows add: (median row step - median plain step) x rows, over steps without an
    evaluation or checkpoint (those are timed directly)."""
    due = [s for i, s in enumerate(stage_s) if not (i + 2) % log_every
           and (i + 2) % cfg.eval_every and (i + 2) % cfg.checkpoint_every]
    return max(0.0, statistics.median(due) - med) * (cfg.steps // log_every) if due else 0.0


if __name__ == "__main__":
    main()
