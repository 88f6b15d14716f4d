"""Compute budget in tokens: how many optimizer steps each expert trains.

A total budget (``train.total_tokens``) is split across experts in proportion to their clusters' training
tokens (default) or equally, so that an ensemble and a dense model can be compared at equal compute: the
steps returned here always add up to ``total_tokens // tokens_per_step`` (the remainder, less than one step,
is not spent).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from experts.config import SeedConfig, TrainConfig
from experts.data import tokenize_corpus, train_token_counts
from experts.tokenizer import open_tokenizer
from ground.errors import UserInputError

log = logging.getLogger(__name__)


def steps_per_expert(cfg: TrainConfig, cluster_tokens: dict[int, int]) -> dict[int, int]:
    """Optimizer steps per cluster id for ``cluster_tokens`` (cluster id -> training tokens of that cluster).

    Without ``cfg.total_tokens`` every expert gets ``cfg.steps``. Clusters with fewer tokens than one block
    get 0 steps (`train_expert` skips them) and take no share of the budget. Otherwise every trainable expert
    gets at least one step, the rest is split by largest remainders. Raises UserInputError when the budget
    cannot give each trainable expert one step.
    """
    trainable = {c: int(n) for c, n in cluster_tokens.items() if n >= cfg.block_size}
    steps = {int(c): 0 for c in cluster_tokens}
    if cfg.total_tokens is None:
        return {c: (cfg.steps if c in trainable else 0) for c in steps}
    if not trainable:
        return steps
    total_steps = cfg.total_tokens // cfg.tokens_per_step
    if total_steps < len(trainable):
        need = len(trainable) * cfg.tokens_per_step
        raise UserInputError(f"train.total_tokens={cfg.total_tokens:,} is less than one step for each of the "
                             f"{len(trainable)} experts: give at least {need:,} tokens (one step is "
                             f"{cfg.tokens_per_step:,} tokens = batch_size x block_size x grad_accum)")
    if cfg.budget_split == "equal":
        weights = {c: 1.0 for c in trainable}
    else:
        weights = {c: float(n) for c, n in trainable.items()}
    steps.update(_largest_remainder(weights, total_steps - len(trainable), floor=1))
    log.info("budget: %s tokens -> %s steps (%s split)", f"{cfg.total_tokens:,}", dict(sorted(steps.items())),
             cfg.budget_split)
    return steps


def _largest_remainder(weights: dict[int, float], n: int, floor: int) -> dict[int, int]:
    """Split ``n`` units by ``weights`` (Hamilton's method), each share plus ``floor``; the shares sum to n."""
    total = sum(weights.values())
    exact = {c: n * w / total for c, w in weights.items()}
    out = {c: int(x) for c, x in exact.items()}
    left = n - sum(out.values())
    # Ties broken by cluster id so the split is deterministic.
    for c in sorted(exact, key=lambda c: (-(exact[c] - out[c]), c))[:left]:
        out[c] += 1
    return {c: k + floor for c, k in out.items()}


def seed_phase_tokens(seed: SeedConfig, train: TrainConfig, n_clusters: int) -> int:
    """Tokens of the seed phase, in whole steps: ``seed.pretrain_tokens`` when set, else ``seed.pretrain_share``
    of the training budget (``train.total_tokens``, or ``n_clusters`` x ``train.steps`` x tokens per step)."""
    total = train.total_tokens or n_clusters * train.steps * train.tokens_per_step
    tokens = seed.pretrain_tokens or int(seed.pretrain_share * total)
    if tokens >= total:
        raise UserInputError(f"the seed phase ({tokens:,} tokens) takes the whole training budget ({total:,}): "
                             "lower seed.pretrain_tokens or seed.pretrain_share, or raise the budget")
    return tokens // train.tokens_per_step * train.tokens_per_step


def expert_budget(train: TrainConfig, seed_tokens: int, n_clusters: int) -> TrainConfig:
    """The training settings the experts share once a seed phase of ``seed_tokens`` has taken its part of the
    budget: ``total_tokens`` minus the seed phase, or, without a total, ``steps`` lowered in proportion."""
    if not seed_tokens:
        return train
    if train.total_tokens is not None:
        return replace(train, total_tokens=train.total_tokens - seed_tokens)
    total = n_clusters * train.steps * train.tokens_per_step
    return replace(train, steps=max(1, round(train.steps * (total - seed_tokens) / total)))


def split_tokens(steps: dict[int, int], cfg: TrainConfig) -> dict[int, int]:
    """Tokens each expert will see (steps x tokens per step), for reports."""
    return {c: s * cfg.tokens_per_step for c, s in steps.items()}


def cluster_token_counts(seed_dir: Path, corpus_path: Path, assignments_path: Path, n_clusters: int,
                         cache_dir: Path | None = None) -> dict[int, int]:
    """Training tokens of every cluster 0..n_clusters-1 with the seed's tokenizer (0 for an empty cluster):
    the input of `steps_per_expert`. Tokenizes the corpus once (cached, shared with `train_expert`)."""
    counts = train_token_counts(tokenize_corpus(open_tokenizer(seed_dir), corpus_path, cache_dir), assignments_path)
    return {c: counts.get(c, 0) for c in range(n_clusters)}


def growth_steps(train: TrainConfig, old_steps: dict[int, int], old_tokens: dict[int, int],
                 grown_tokens: dict[int, int], new_ids: list[int], continued: list[int],
                 seed_steps: int = 0) -> dict[int, int]:
    """Steps of the experts a `cbtm add` trains, by the rule the run's own experts were trained with.

    Every new training token gets the compute an old one got, the seed phase's share included (``seed_steps``:
    the run's seed-phase steps, which saw all of its training tokens but none of the new ones). New clusters:
    with a proportional total budget, the run's steps (seed phase and experts) per training token times the new
    cluster's tokens; otherwise (an equal split, or ``train.steps`` per expert) the mean steps of the run's
    experts plus the seed phase's steps per token. A continued expert (``continued``) trains on its grown set
    for its own steps per token times the tokens it gained (its domain is already learnt). Clusters with fewer
    tokens than one block get 0 (skipped); a continued expert that gained nothing is left out.
    """
    trained = {c: s for c, s in old_steps.items() if s and old_tokens.get(c, 0) >= train.block_size}
    seen = sum(old_tokens[c] for c in trained)
    seed_rate = seed_steps / seen if seen else 0.0
    rate = None
    if train.total_tokens is not None and train.budget_split == "proportional" and trained:
        rate = sum(trained.values()) / seen + seed_rate
    mean_steps = round(sum(trained.values()) / len(trained)) if trained else train.steps
    out = {}
    for c in new_ids:
        n = grown_tokens.get(c, 0)
        out[c] = 0 if n < train.block_size else max(1, round(rate * n) if rate else mean_steps + round(seed_rate * n))
    for c in continued:
        gained = grown_tokens.get(c, 0) - old_tokens.get(c, 0)
        if gained > 0 and c in trained:
            out[c] = max(1, round(trained[c] * gained / old_tokens[c]))
    return out
