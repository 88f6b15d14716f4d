"""Scoring under the c-BTM evaluation protocol: a token's weights come from the context before it.

Routing is recomputed once per window of ``route_window`` tokens from the embedding of (at most 256) tokens
preceding the window, so a text of n tokens costs n / route_window embeddings instead of one per prefix.
The first window has no preceding context; it uses the prior weights (the clusters' training sizes).
"""
from __future__ import annotations

import math

import numpy as np

from ensemble.api import ROUTE_CONTEXT_TOKENS


def expert_logprobs(model, ids: list[int], max_positions: int, device: str) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t = 1..len(ids)-1 (float64 [len(ids)-1]) in segments of max_positions."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, max_positions - 1):
            seg = torch.tensor([ids[start:start + max_positions]], device=device)
            logits = model(input_ids=seg).logits[0, :-1].float()
            lp = torch.log_softmax(logits, dim=-1).gather(1, seg[0, 1:, None])[:, 0]
            out.append(lp.double().cpu().numpy())
    return np.concatenate(out)


def routing_matrix(ens, encoded: list[list[int]], top_k: int) -> list[np.ndarray]:
    """Per text, dense weights float64 [n_tokens, n_experts] (top_k non-zero per row, rows sum to 1)."""
    window = ens.route_window
    contexts, owners = [], []
    for ti, ids in enumerate(encoded):
        for c in range(1, math.ceil(len(ids) / window)):
            start = c * window
            contexts.append(ens.tokenizer.decode(ids[max(0, start - ROUTE_CONTEXT_TOKENS):start]))
            owners.append((ti, c))
    prior_ids, prior_w = ens.prior(top_k)
    mats = []
    for ids in encoded:
        m = np.zeros((len(ids), ens.n_experts))
        m[:window, prior_ids[0]] = prior_w[0]
        mats.append(m)
    if contexts:
        route_ids, route_w = ens._route_arrays(contexts, top_k)
        for (ti, c), row_ids, row_w in zip(owners, route_ids, route_w):
            mats[ti][c * window:(c + 1) * window, row_ids] = row_w
    return mats


def score_texts(ens, texts: list[str], top_k: int) -> list[np.ndarray]:
    """Per-token log-probabilities of each text under the routed mixture (float64 [n_tokens])."""
    tok = ens.tokenizer
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    weights = routing_matrix(ens, encoded, top_k)
    # Group by expert: each selected expert runs once over every text that needs it.
    needed = sorted({int(e) for m in weights for e in np.flatnonzero(m.any(axis=0))})
    per_text: list[dict[int, np.ndarray]] = [{} for _ in texts]
    for expert in needed:
        model = ens.expert_model(expert)
        for ti, ids in enumerate(encoded):
            if weights[ti][:, expert].any():
                per_text[ti][expert] = expert_logprobs(model, [tok.eos_token_id, *ids], ens.max_positions,
                                                       ens.device)
    out = []
    for ti in range(len(texts)):
        experts = sorted(per_text[ti])
        logp = np.stack([per_text[ti][e] for e in experts], axis=1)  # [n_tokens, n_used]
        with np.errstate(divide="ignore"):
            logw = np.log(weights[ti][:, experts])
        out.append(np.logaddexp.reduce(logw + logp, axis=1))
    return out
