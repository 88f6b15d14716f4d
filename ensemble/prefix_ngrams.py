"""Token n-gram evidence for the prefix router: hashed n-gram features and a per-cluster n-gram model.

The first 8-32 tokens of a document are too little text for a sentence embedding, but they often hold tokens its
cluster uses far more than others (a poster's address, a header, jargon). Two views of them:

- ``hashed_ngrams``: log-scaled counts of hashed unigrams and bigrams (``N_HASHED`` columns), one sparse row per
  text, learned from the router's (few thousand) training prefixes;
- ``NgramModel``: a multinomial naive-Bayes model per cluster over hashed unigrams, bigrams and trigrams, counted
  on up to ``MAX_DOCS`` training documents (much more text than the router's prefixes, and cheap: no embedding).
  Its posterior log-probabilities over the clusters are features of the router, so that the router learns how
  far to trust them at each prefix length. The documents the router itself trains on get cross-fitted posteriors
  (counts from the other folds only), or the router would learn to over-trust counts that include its own text.
  Its counts are kept sparse (``NgramCounts``), so that its key space can be wide: on 20 Newsgroups, 2^16 keys
  merged so many n-grams that its cross-validated top-1 agreement at 16 tokens was 0.55; with 2^22 keys and
  trigrams it is 0.66 (an email address is several tokens long).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix

from ground.arrays import load_npy

N_HASHED = 1 << 16      # columns of the router's own hashed unigram + bigram features
MODEL_HASHED = 1 << 22  # key space of the n-gram model (sparse counts: its size costs nothing)
MODEL_ORDER = 3         # the n-gram model counts unigrams, bigrams and trigrams
MAX_TOKENS = 256        # tokens of each document counted: as long as the longest prefix the router is trained on
MAX_DOCS = 50_000       # training documents counted
FOLDS = 5
# Additive smoothing of the counts, chosen by 5-fold cross-validated agreement on 20 Newsgroups training
# documents (0.03 >= 0.1 > 0.3 at 8-64 tokens with trigrams and 2^22 keys).
ALPHA = 0.03
_PRIME = 1_000_003
_MOD = 1 << 40          # rolling hash modulus: h * _PRIME stays below 2^63


def ngram_keys(ids, order: int = 2, n_hashed: int = N_HASHED) -> np.ndarray:
    """Hashed keys int64 in [0, n_hashed) of every n-gram, n = 1..order, of a token sequence
    (at most ``order * len(ids)`` keys; n-grams are order-sensitive)."""
    ids = np.asarray(ids, dtype=np.int64)
    keys, rolling = [ids % n_hashed], ids
    for n in range(2, order + 1):
        if len(ids) < n:
            break
        rolling = (rolling[:-1] * _PRIME + ids[n - 1:] + 7 * (n - 1)) % _MOD
        keys.append(rolling % n_hashed)
    return np.concatenate(keys)


def key_counts(token_ids: list[list[int]], order: int = 2, n_hashed: int = N_HASHED, log_scale: bool = False):
    """Counts of each sequence's n-gram keys, a CSR float32 [n, n_hashed]; ``log_scale``: log1p of the counts,
    each row L2-normalised."""
    rows, cols = [], []
    for r, ids in enumerate(token_ids):
        keys = ngram_keys(ids, order, n_hashed)
        rows.append(np.full(len(keys), r))
        cols.append(keys)
    if not rows:
        return csr_matrix((0, n_hashed), dtype=np.float32)
    cols = np.concatenate(cols)
    out = csr_matrix((np.ones(len(cols), np.float32), (np.concatenate(rows), cols)),
                     shape=(len(token_ids), n_hashed), dtype=np.float32)
    out.sum_duplicates()
    if log_scale:
        out.data = np.log1p(out.data)
        norms = np.sqrt(np.asarray(out.multiply(out).sum(1)).ravel())
        out.data /= np.repeat(np.maximum(norms, 1e-12), np.diff(out.indptr)).astype(np.float32)
    return out


def hashed_ngrams(token_ids: list[list[int]]):
    """Hashed unigram + bigram counts of each token sequence, log-scaled, rows L2-normalised: a scipy CSR
    float32 [n, N_HASHED]."""
    return key_counts(token_ids, log_scale=True)


def _log_normalise(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(1, keepdims=True)
    return (scores - np.log(np.exp(scores).sum(1, keepdims=True))).astype(np.float32)


@dataclass(frozen=True)
class NgramCounts:
    """How often each cluster's documents hold each hashed n-gram key: ``counts`` CSR float32 [k, n_hashed]."""

    counts: csr_matrix
    order: int = MODEL_ORDER
    n_hashed: int = MODEL_HASHED
    alpha: float = ALPHA

    @cached_property
    def _scoring(self) -> tuple[csr_matrix, np.ndarray]:
        """(log1p(count / alpha) CSR float32 [n_hashed, k], the log-probability of an unseen key float64 [k]):
        log P(key | c) = log(count + alpha) - log(total_c + alpha * n_hashed) = log1p(count / alpha) + unseen_c,
        so that only the keys a cluster has seen cost anything. Computed once per model (a server routes with
        it on every request)."""
        seen = self.counts.astype(np.float32, copy=True)
        seen.data = np.log1p(seen.data / self.alpha)
        totals = np.asarray(self.counts.sum(1), dtype=np.float64).ravel()
        return seen.T.tocsr(), np.log(self.alpha) - np.log(totals + self.alpha * self.n_hashed)

    def log_posteriors(self, token_ids: list[list[int]]) -> np.ndarray:
        """Naive-Bayes log-posteriors float32 [n, k] (uniform prior, rows log-normalised) of token sequences."""
        seen_t, unseen = self._scoring
        x = key_counts(token_ids, self.order, self.n_hashed)
        scores = np.asarray((x @ seen_t).todense(), dtype=np.float64)
        return _log_normalise(scores + np.asarray(x.sum(1), dtype=np.float64) * unseen[None, :])

    def save(self, directory: Path) -> dict:
        """Write the counts as ngram_data.npy (int32 [nnz]), ngram_indices.npy (int32 [nnz]) and
        ngram_indptr.npy (int64 [k + 1]); returns the settings that read them back."""
        np.save(directory / "ngram_data.npy", self.counts.data.astype(np.int32))
        np.save(directory / "ngram_indices.npy", self.counts.indices.astype(np.int32))
        np.save(directory / "ngram_indptr.npy", self.counts.indptr.astype(np.int64))
        return {"order": self.order, "n_hashed": self.n_hashed, "alpha": self.alpha}

    @classmethod
    def load(cls, directory: Path, settings: dict, n_clusters: int) -> "NgramCounts":
        """Read what ``save`` wrote; raises OSError/ValueError on a missing or inconsistent file."""
        data, indices, indptr = (load_npy(Path(directory) / f"ngram_{name}.npy")
                                 for name in ("data", "indices", "indptr"))
        n_hashed = int(settings["n_hashed"])
        counts = csr_matrix((data.astype(np.float32), indices, indptr), shape=(n_clusters, n_hashed))
        counts.check_format(full_check=True)
        return cls(counts, int(settings["order"]), n_hashed, float(settings["alpha"]))


class DenseNgram:
    """A version-2 router's n-gram model: key log-probabilities float32 [k, N_HASHED] of unigrams and bigrams."""

    def __init__(self, log_probs: np.ndarray):
        self.log_probs = log_probs

    def log_posteriors(self, token_ids: list[list[int]]) -> np.ndarray:
        """Naive-Bayes log-posteriors float32 [n, k] of token sequences."""
        return _log_normalise(np.asarray(key_counts(token_ids) @ self.log_probs.T, dtype=np.float64))


def _by_cluster(encoded: list[list[int]], labels: np.ndarray, n_clusters: int) -> csr_matrix:
    """Key counts CSR float32 [k, MODEL_HASHED] of documents (their first MAX_TOKENS tokens) by cluster."""
    docs = key_counts([ids[:MAX_TOKENS] for ids in encoded], MODEL_ORDER, MODEL_HASHED)
    onehot = csr_matrix((np.ones(len(labels), np.float32), (np.asarray(labels, np.int64), np.arange(len(labels)))),
                        shape=(n_clusters, len(labels)))
    return (onehot @ docs).tocsr()


class NgramModel:
    """Per-cluster n-gram key counts of training documents, in FOLDS folds (for cross-fitting)."""

    def __init__(self, encoded: list[list[int]], labels: np.ndarray, n_clusters: int):
        """``encoded``: each document's token ids; ``labels`` int [n]: its cluster. Document i is in fold i % FOLDS."""
        labels = np.asarray(labels, dtype=np.int64)
        fold = np.arange(len(encoded)) % FOLDS
        self.folds = [_by_cluster([encoded[i] for i in np.flatnonzero(fold == f)], labels[fold == f], n_clusters)
                      for f in range(FOLDS)]
        self.total = sum(self.folds[1:], self.folds[0]).tocsr()

    def full(self) -> NgramCounts:
        """The counts of every counted document (what the router is saved with)."""
        return NgramCounts(self.total)

    def cross_fitted(self, token_ids: list[list[int]], folds: np.ndarray) -> np.ndarray:
        """Log-posteriors float32 [n, k] of texts, each from the counts without its document's fold (``folds``
        int [n]; -1: a document that was not counted, scored with all counts)."""
        out = np.zeros((len(token_ids), self.total.shape[0]), dtype=np.float32)
        for fold in np.unique(folds):
            rows = np.flatnonzero(folds == fold)
            counts = self.total if fold < 0 else (self.total - self.folds[fold]).tocsr()
            counts.eliminate_zeros()
            out[rows] = NgramCounts(counts).log_posteriors([token_ids[i] for i in rows])
        return out


def read_ngram(directory: Path, info: dict, n_clusters: int) -> NgramCounts | DenseNgram | None:
    """The n-gram model a router directory holds (None: a version-1 or trivial router has none)."""
    if info.get("trivial") or info.get("version", 1) < 2:
        return None
    if info["version"] == 2:
        log_probs = load_npy(Path(directory) / "ngram_log_probs.npy")
        if log_probs.shape != (n_clusters, N_HASHED):
            raise ValueError(f"ngram_log_probs.npy has shape {log_probs.shape}")
        return DenseNgram(log_probs)
    return NgramCounts.load(directory, info["ngram"], n_clusters)

