"""Token n-gram evidence for the prefix router: hashed unigram + bigram features and a per-cluster n-gram model.

The first 8-32 tokens of a document are too little text for a sentence embedding, but they often hold tokens its
cluster uses far more than others (a poster's address, a header, jargon). Two views of them:

- ``hashed_ngrams``: log-scaled counts of hashed unigrams and bigrams, one sparse row per text, learned from the
  router's (few thousand) training prefixes;
- ``NgramModel``: a multinomial naive-Bayes model per cluster over the same hashed keys, counted on up to
  ``MAX_DOCS`` training documents (much more text than the router's prefixes, and cheap: no embedding). Its
  posterior log-probabilities over the clusters are features of the router, so that the router learns how far
  to trust them at each prefix length. The documents the router itself trains on get cross-fitted posteriors
  (counts from the other folds only), or the router would learn to over-trust counts that include its own text.
"""
from __future__ import annotations

import numpy as np

N_HASHED = 1 << 16
MAX_TOKENS = 256   # tokens of each document counted: as long as the longest prefix the router is trained on
MAX_DOCS = 50_000  # training documents counted
FOLDS = 5
ALPHA = 0.1        # additive smoothing of the counts (chosen on 20 Newsgroups held-out prefixes: 0.1 > 0.5 > 1)
_PRIME = 1_000_003


def ngram_keys(ids) -> np.ndarray:
    """Hashed unigram and bigram keys int64 [<= 2 len(ids)] of a token sequence, in [0, N_HASHED)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2:
        return ids % N_HASHED
    return np.concatenate([ids % N_HASHED, (ids[:-1] * _PRIME + ids[1:] + 7) % N_HASHED])


def _count_rows(token_ids: list[list[int]], log_scale: bool):
    from scipy.sparse import csr_matrix

    rows, cols, vals = [], [], []
    for r, ids in enumerate(token_ids):
        uniq, counts = np.unique(ngram_keys(ids), return_counts=True)
        weights = counts.astype(np.float32)
        if log_scale:
            weights = np.log1p(weights)
            weights /= max(float(np.linalg.norm(weights)), 1e-12)
        rows.append(np.full(len(uniq), r))
        cols.append(uniq)
        vals.append(weights)
    if not rows:
        return csr_matrix((0, N_HASHED), dtype=np.float32)
    return csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(len(token_ids), N_HASHED), dtype=np.float32)


def hashed_ngrams(token_ids: list[list[int]]):
    """Hashed unigram + bigram counts of each token sequence, log-scaled, rows L2-normalised: a scipy CSR
    float32 [n, N_HASHED]."""
    return _count_rows(token_ids, log_scale=True)


def log_posteriors(log_probs: np.ndarray, counts) -> np.ndarray:
    """Naive-Bayes log-posteriors float32 [n, k] (uniform prior; each row log-normalised) of texts given as key
    counts (CSR [n, N_HASHED]) under per-cluster key log-probabilities ``log_probs`` float32 [k, N_HASHED]."""
    scores = np.asarray(counts @ log_probs.T, dtype=np.float64)
    scores -= scores.max(1, keepdims=True)
    return (scores - np.log(np.exp(scores).sum(1, keepdims=True))).astype(np.float32)


class NgramModel:
    """Per-cluster hashed n-gram counts of training documents, in FOLDS folds (for cross-fitting)."""

    def __init__(self, encoded: list[list[int]], labels: np.ndarray, n_clusters: int):
        """``encoded``: each document's token ids; ``labels`` int [n]: its cluster. Document i is in fold i % FOLDS."""
        self.counts = np.zeros((FOLDS, n_clusters, N_HASHED), dtype=np.float32)
        for i, (ids, label) in enumerate(zip(encoded, labels)):
            np.add.at(self.counts[i % FOLDS, int(label)], ngram_keys(ids[:MAX_TOKENS]), 1.0)

    @staticmethod
    def _log_probs(counts: np.ndarray) -> np.ndarray:
        total = counts.sum(1, keepdims=True)
        return (np.log(counts + ALPHA) - np.log(total + ALPHA * counts.shape[1])).astype(np.float32)

    def log_probs(self) -> np.ndarray:
        """Key log-probabilities float32 [k, N_HASHED] from every counted document (what the router is saved with)."""
        return self._log_probs(self.counts.sum(0))

    def cross_fitted(self, token_ids: list[list[int]], folds: np.ndarray) -> np.ndarray:
        """Log-posteriors float32 [n, k] of texts, each from the counts without its document's fold (``folds``
        int [n]; -1: a document that was not counted, scored with all counts)."""
        counts = _count_rows(token_ids, log_scale=False)
        out = np.zeros((len(token_ids), self.counts.shape[1]), dtype=np.float32)
        total = self.counts.sum(0)
        for fold in np.unique(folds):
            rows = np.flatnonzero(folds == fold)
            log_probs = self._log_probs(total if fold < 0 else total - self.counts[fold])
            out[rows] = log_posteriors(log_probs, counts[rows])
        return out


def ngram_posteriors(log_probs: np.ndarray, token_ids: list[list[int]]) -> np.ndarray:
    """Naive-Bayes log-posteriors float32 [n, k] of token sequences under a saved ``NgramModel.log_probs()``."""
    return log_posteriors(log_probs, _count_rows(token_ids, log_scale=False))
