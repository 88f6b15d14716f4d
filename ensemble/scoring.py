"""Scoring under the c-BTM evaluation protocol: a token's weights come from the context before it.

Routing is recomputed once per window of ``route_window`` tokens from the embedding of (at most 256) tokens
preceding the window, so a text of n tokens costs n / route_window embeddings instead of one per prefix.
The first window has no preceding context: every expert scores it, weighted by its cluster's share of the
training documents (a top-k guess without evidence sends most texts to the wrong specialists, which costs
more than running all experts on one window); top-k applies from the second window on.
"""
from __future__ import annotations

import math

import numpy as np

from ensemble.router import route_weights

ROUTE_CONTEXT_TOKENS = 256  # at most this many preceding tokens are embedded to route a window


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


class WindowRouting:
    """Routing of every scoring window of a batch of tokenised texts; embeds each context once."""

    def __init__(self, ens, encoded: list[list[int]], vectors: np.ndarray | None = None):
        """``vectors``: the context embeddings of another `WindowRouting` over the same texts, tokenizer and
        window (another run derived from the same one), so that they are not computed twice."""
        from cluster.kmeans import squared_distances

        self.ens, self.encoded, self.window = ens, encoded, ens.route_window
        contexts, self.owners = [], []
        for ti, ids in enumerate(encoded):
            for c in range(1, math.ceil(len(ids) / self.window)):
                start = c * self.window
                contexts.append(ens.tokenizer.decode(ids[max(0, start - ROUTE_CONTEXT_TOKENS):start]))
                self.owners.append((ti, c))
        if vectors is None or len(vectors) != len(contexts):
            vectors = ens.embed(contexts) if contexts else None
        self.vectors = vectors  # float32 [n_contexts, dim]
        self.sq_distances = squared_distances(vectors, ens.centroids) if contexts else None

    def matrices(self, top_k: int, temperature: float) -> list[np.ndarray]:
        """Per text, dense weights float64 [n_tokens, n_clusters] (top_k non-zero per row, rows sum to 1)."""
        prior_ids, prior_w = self.ens.prior(self.ens.n_experts)
        mats = []
        for ids in self.encoded:
            m = np.zeros((len(ids), self.ens.n_clusters))
            m[:self.window, prior_ids[0]] = prior_w[0]
            mats.append(m)
        if self.sq_distances is not None:
            route_ids, route_w = route_weights(self.sq_distances[:, self.ens.active], temperature, top_k)
            route_ids = self.ens.active[route_ids]
            for (ti, c), row_ids, row_w in zip(self.owners, route_ids, route_w):
                mats[ti][c * self.window:(c + 1) * self.window, row_ids] = row_w
        return mats


def experts_logprobs(ens, encoded: list[list[int]], weights: list[np.ndarray]) -> list[dict[int, np.ndarray]]:
    """Per text, {expert: log-probs [n_tokens]} for every expert with a non-zero weight somewhere in it.

    Grouped by expert: each needed expert is loaded once and runs over every text that needs it.
    """
    needed = sorted({int(e) for m in weights for e in np.flatnonzero(m.any(axis=0))})
    per_text: list[dict[int, np.ndarray]] = [{} for _ in encoded]
    eos = ens.tokenizer.eos_token_id
    for expert in needed:
        model = ens.expert_model(expert)
        for ti, ids in enumerate(encoded):
            if weights[ti][:, expert].any():
                per_text[ti][expert] = expert_logprobs(model, [eos, *ids], ens.max_positions, ens.device)
    return per_text


def mix(weights: list[np.ndarray], per_text: list[dict[int, np.ndarray]]) -> list[np.ndarray]:
    """log sum_e w_e(t) p_e(token_t): the mixture's per-token log-probabilities (float64 [n_tokens])."""
    out = []
    for w, logps in zip(weights, per_text):
        experts = sorted(logps)
        stacked = np.stack([logps[e] for e in experts], axis=1)  # [n_tokens, n_used]
        with np.errstate(divide="ignore"):
            logw = np.log(w[:, experts])
        out.append(np.logaddexp.reduce(logw + stacked, axis=1))
    return out


def score_texts(ens, texts: list[str], top_k: int) -> list[np.ndarray]:
    """Per-token log-probabilities of each text under the routed top-k mixture (float64 [n_tokens])."""
    encoded = [ens.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    weights = WindowRouting(ens, encoded).matrices(top_k, ens.temperature)
    return mix(weights, experts_logprobs(ens, encoded, weights))


def tune_temperature(ens, texts: list[str], grid: list[float], top_k: int) -> dict:
    """Held-out perplexity for every temperature in ``grid``; the experts run once (the top-k set is the
    same for every T, only the weights change). Returns {"grid": [{temperature, perplexity}], "best": T}."""
    encoded = [ens.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    routing = WindowRouting(ens, encoded)
    per_text = experts_logprobs(ens, encoded, routing.matrices(top_k, grid[0]))
    rows = []
    for temperature in grid:
        flat = np.concatenate(mix(routing.matrices(top_k, temperature), per_text))
        rows.append({"temperature": float(temperature), "perplexity": float(np.exp(-flat.mean()))})
    best = min(rows, key=lambda r: r["perplexity"])["temperature"]
    return {"top_k": top_k, "grid": rows, "best": best}
