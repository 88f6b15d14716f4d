"""Scoring under the c-BTM evaluation protocol: a token's weights come from the context before it.

Routing is recomputed once per window of ``route_window`` tokens from the embedding of (at most 256) tokens
preceding the window, so a text of n tokens costs n / route_window embeddings of bounded length (linear in n)
instead of one per prefix. The first window is scored by every expert: weighted by its cluster's share of the
training documents where there is no context yet, and by the router from its early starts on (a router that
decides from a few tokens: `ensemble.prefix_router`). A top-k guess from so little sends many texts to the
wrong specialists, which costs more than running all experts on one window (`bench/routing.py` measures both);
top-k applies from the second window on. Everything here takes explicit inputs: token ids, routing scores, a
backend that scores (expert, ids).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ensemble.evidence import Evidence
from ensemble.router import top_k_softmax

ROUTE_CONTEXT_TOKENS = 256  # at most this many preceding tokens are embedded to route a window
VECTOR_CHUNK = 256  # contexts embedded per call when progress is reported


def window_starts(n_tokens: int, window: int, early: tuple[int, ...] = ()) -> list[int]:
    """Where routing is recomputed in a text of ``n_tokens``: every ``window`` tokens, and at the ``early``
    positions inside the first window (a router that decides from a few tokens: `ensemble.prefix_router`)."""
    starts = {s for s in early if 0 < s < min(window, n_tokens)} | set(range(window, n_tokens, window))
    return sorted(starts)


def window_contexts(encoded: list[list[int]], window: int, decode: Callable[[list[int]], str],
                    early: tuple[int, ...] = ()):
    """(contexts, owners): the text before each routing span but the first of each tokenised text (at most
    ROUTE_CONTEXT_TOKENS tokens), and the span (text index, first token, end) it routes."""
    contexts, owners = [], []
    for ti, ids in enumerate(encoded):
        starts = window_starts(len(ids), window, early)
        for start, end in zip(starts, [*starts[1:], len(ids)]):
            contexts.append(decode(ids[max(0, start - ROUTE_CONTEXT_TOKENS):start]))
            owners.append((ti, start, end))
    return contexts, owners


def context_vectors(router, contexts: list[str], on_progress: Callable[[int, int], object] | None = None):
    """``router.vectors(contexts)`` (float32 [n, d], or CSR [n, F] for the prefix router); with
    ``on_progress(done, total)``, in chunks of VECTOR_CHUNK contexts, reported after each (embedding the
    contexts is most of a scoring pass: minutes for a few hundred documents on a CPU)."""
    if on_progress is None:
        return router.vectors(contexts)
    on_progress(0, len(contexts))
    parts = []
    for lo in range(0, len(contexts), VECTOR_CHUNK):
        parts.append(router.vectors(contexts[lo:lo + VECTOR_CHUNK]))
        on_progress(min(lo + VECTOR_CHUNK, len(contexts)), len(contexts))
    if hasattr(parts[0], "tocsr"):
        from scipy.sparse import vstack

        return vstack(parts, format="csr")
    return np.concatenate(parts)


def window_weights(lengths: list[int], n_clusters: int, owners: list[tuple[int, int, int]],
                   logits: np.ndarray | None, top_k: int, columns: np.ndarray,
                   prior: tuple[np.ndarray, np.ndarray], every_expert_before: int = 0) -> list[np.ndarray]:
    """Per text, dense weights float64 [n_tokens, n_clusters] (rows sum to 1).

    ``logits`` float [n_contexts, len(columns)]: routing logits of each span's context over the cluster ids
    ``columns`` (the experts that may serve), top ``top_k`` kept; a span that starts before token
    ``every_expert_before`` (the first window's early spans) keeps every column. Tokens before a text's first
    span take ``prior`` (ids, weights).
    """
    prior_ids, prior_w = prior
    mats = []
    for n in lengths:
        m = np.zeros((n, n_clusters))
        m[:, prior_ids] = prior_w
        mats.append(m)
    if logits is not None and len(owners):
        top = top_k_softmax(logits, top_k)
        every = top_k_softmax(logits, logits.shape[1]) if every_expert_before > 0 else top
        for i, (ti, start, end) in enumerate(owners):
            ids, weights = every if start < every_expert_before else top
            mats[ti][start:end] = 0.0
            mats[ti][start:end, columns[ids[i]]] = weights[i]
    return mats


def experts_logprobs(backend, eos: int, encoded: list[list[int]],
                     weights: list[np.ndarray]) -> list[dict[int, np.ndarray]]:
    """Per text, {cluster_id: log-probs float64 [n_tokens]} for every expert with a non-zero weight in it;
    one backend call for all (expert, text) pairs."""
    jobs, owners = [], []
    for ti, (ids, m) in enumerate(zip(encoded, weights)):
        for expert in np.flatnonzero(m.any(axis=0)):
            jobs.append((int(expert), [eos, *ids]))
            owners.append((ti, int(expert)))
    per_text: list[dict[int, np.ndarray]] = [{} for _ in encoded]
    for (ti, expert), lp in zip(owners, backend.logprobs(jobs)):
        per_text[ti][expert] = lp
    return per_text


def mix(weights: list[np.ndarray], per_text: list[dict[int, np.ndarray]],
        evidence: Evidence | None = None) -> list[np.ndarray]:
    """log sum_e w_e(t) p_e(token_t): the mixture's per-token log-probabilities (float64 [n_tokens]); with
    ``evidence`` on, each token's routed weights are first reweighted by the experts' log-probabilities of the
    tokens before it (`ensemble.evidence`)."""
    out = []
    for w, logps in zip(weights, per_text):
        experts = sorted(logps)
        stacked = np.stack([logps[e] for e in experts], axis=1)  # [n_tokens, n_used]
        used = w[:, experts]
        if evidence is not None and evidence.on:
            used = evidence.reweigh(used, evidence.scores(stacked))
        with np.errstate(divide="ignore"):
            logw = np.log(used)
        out.append(np.logaddexp.reduce(logw + stacked, axis=1))
    return out


def mix_probs(probs: list, targets: list[int], weights: np.ndarray, evidence: Evidence | None = None):
    """The mixture's next-token probabilities (torch float32 [n, vocab]) at n positions from each used expert's
    (``probs[j]``: float32 [n, vocab], predicting ``targets`` [n]) and their routing weights float [n, len(probs)];
    with ``evidence`` on, the weights are first reweighted as `mix` does, from the experts' probabilities of
    ``targets`` (so row t reads targets before t only)."""
    import torch

    device = probs[0].device
    if evidence is not None and evidence.on:
        target = torch.tensor(targets, device=device)[:, None]
        own = np.stack([torch.log(p.gather(1, target)[:, 0].double().clamp_min(1e-300)).cpu().numpy()
                        for p in probs], axis=1)
        weights = evidence.reweigh(weights, evidence.scores(own))
    mixed = None
    for j, p in enumerate(probs):
        term = torch.as_tensor(weights[:, j], dtype=p.dtype, device=device)[:, None] * p
        mixed = term if mixed is None else mixed + term
    return mixed
