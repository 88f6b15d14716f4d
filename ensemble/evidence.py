"""Evidence: the routed experts reweighted by how well each predicted the last few tokens. Pure numpy.

The router decides which experts serve a stretch of text from an embedding of the context; within that
choice, the experts' own probabilities of the tokens just seen say which of them fits *here* — Branch-Train-
Merge's posterior over domains, kept short so that it follows the text as it moves. For a token t with routing
weights w_e(t) over its routed experts,

    w'_e(t) ∝ w_e(t) · exp(weight · S_e(t)),   S_e(t) = Σ_{j=1..EVIDENCE_TOKENS} decay^(j-1) · log p_e(x_{t-j})

where p_e(x_s) is expert e's probability of token s given the tokens before it. S_e(t) reads only tokens before
t, so a token's weights still come only from the context before it (the c-BTM protocol). Experts outside the
routed set keep weight 0: evidence reorders, it never adds an expert. ``weight`` 0 leaves the routing weights
as they are. The window is finite so that scoring (whole texts), generation (a prompt's last tokens, then each
new token) and lm-eval's requests (a context's tail) all compute exactly the same weights.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

EVIDENCE_TOKENS = 32  # tokens of evidence at most; decay**32 is 8e-4 at the default decay


@dataclass(frozen=True)
class Evidence:
    """``weight`` (>= 0; 0: off) scales the experts' summed log-probabilities of the last tokens, each token
    ``decay`` (in [0, 1]) times the weight of the one after it."""

    weight: float = 0.0
    decay: float = 0.8

    def __post_init__(self) -> None:
        for name, lo, hi in (("weight", 0.0, math.inf), ("decay", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                    or not lo <= value <= hi:
                bound = ">= 0" if hi == math.inf else "between 0 and 1"
                raise ValueError(f"evidence {name} must be a finite number {bound}, got {value!r}")

    @property
    def on(self) -> bool:
        return self.weight > 0

    def kernel(self) -> np.ndarray:
        """float64 [EVIDENCE_TOKENS]: the factor of the token j + 1 back, decay**j."""
        return self.decay ** np.arange(EVIDENCE_TOKENS, dtype=np.float64)

    def scores(self, logps: np.ndarray) -> np.ndarray:
        """S float64 [n_tokens, n_experts] from the experts' log-probabilities of a text's tokens float
        [n_tokens, n_experts]: row t sums rows t-1, t-2, ... (at most EVIDENCE_TOKENS of them); row 0 is 0."""
        lp = np.asarray(logps, dtype=np.float64)
        out = np.zeros_like(lp)
        for j, factor in enumerate(self.kernel()[: max(len(lp) - 1, 0)]):
            out[j + 1:] += factor * lp[: len(lp) - j - 1]
        return out

    def score_of(self, recent) -> float:
        """S for the next token from one expert's log-probabilities of the tokens before it, oldest first
        (only the last EVIDENCE_TOKENS count). Plain Python: generation calls it per expert per token."""
        score, factor = 0.0, 1.0
        for logp in reversed(list(recent)[-EVIDENCE_TOKENS:]):
            score += factor * logp
            factor *= self.decay
        return score

    def reweigh(self, weights: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Rows of ``weights`` float [n, k] (rows sum to 1) times exp(weight · ``scores`` [n, k]), renormalised
        over their non-zero entries; float64."""
        w = np.asarray(weights, dtype=np.float64)
        if not self.on:
            return w
        kept = w > 0
        with np.errstate(divide="ignore"):
            logw = np.where(kept, np.log(np.where(kept, w, 1.0)) + self.weight * np.asarray(scores), -np.inf)
        logw -= logw.max(axis=1, keepdims=True)
        out = np.exp(logw)
        return out / out.sum(axis=1, keepdims=True)

    def reweigh_one(self, weights: dict[int, float], recent: dict[int, list[float]]) -> dict[int, float]:
        """`reweigh` for one position: routing weights {cluster_id: w} and each expert's log-probabilities of the
        tokens before it (`score_of`); same keys, in the same order. Plain Python (a row's few experts, once per
        generated token: numpy's call overhead would dominate)."""
        if not self.on:
            return dict(weights)
        logw = {e: math.log(w) + self.weight * self.score_of(recent.get(e, ())) for e, w in weights.items() if w > 0}
        top = max(logw.values())
        scaled = {e: math.exp(v - top) for e, v in logw.items()}
        total = sum(scaled.values())
        return {e: scaled[e] / total if e in scaled else 0.0 for e in weights}
