"""The prefix router: which expert should continue a text, learned from the first tokens of training documents.

Centroid routing needs an embedding with enough text behind it; on the first 8-32 tokens of a document it picks
the document's own cluster far less often than on 256 (SmallTalk LM, ICLR 2025, beat c-BTM's routing with small
routers trained on prefixes). This router is a multinomial logistic regression trained on prefixes of 8-256
tokens of the training documents, each labelled with the cluster the whole document is routed to. It starts
from centroid routing and corrects it where prefixes are short; its features:

- the prefix's routing embedding (the run's embedder) and its squared distances to the centroids, the
  distances also once per prefix-length bucket (so that it learns how far to trust them at each length);
- a per-cluster n-gram model's log-posteriors (`ensemble.prefix_ngrams.NgramModel`: unigrams, bigrams and
  trigrams counted on all the training documents), also once per length bucket;
- hashed unigrams and bigrams of the experts' own tokens (names, headers, jargon that short prefixes share).

Its temperature is fitted on held-out prefixes, so that its probabilities are calibrated. Then, per prefix-length
bucket, a gate g in [0, 1] blends it with calibrated centroid routing, (1 - g) router + g centroid, g chosen by
the held-out likelihood: where the router's many features overfit a small corpus (MASC at k = 32: held-out
agreement at 256 tokens 0.89 against centroid routing's 0.96) long prefixes fall back towards the centroids;
where it generalises (20 Newsgroups, DBpedia) g stays 0. Saved in the run's ``router/`` directory, open formats
only: settings.json, coef.npy (float32 [k, F]), intercept.npy (float32 [k]), and the n-gram model's counts as a
sparse [k, 2^22] matrix: ngram_data.npy, ngram_indices.npy, ngram_indptr.npy (version 4; version 3 had no gate,
version 2 kept dense unigram + bigram log-probabilities [k, 2^16] in ngram_log_probs.npy, version 1 had no n-gram
model; all are still read). A run of one cluster gets a trivial router (no features: nothing to decide), so that
a dense baseline embeds nothing.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq

from cluster.kmeans import squared_distances
from ensemble.prefix_ngrams import MAX_DOCS as NGRAM_DOCS
from ensemble.prefix_ngrams import NgramCounts, NgramModel, hashed_ngrams, read_ngram
from ground.arrays import load_npy
from ground.errors import IncompatibleRunError
from ground.files import atomic_dir, read_json
from ground.rundir import RunDir

log = logging.getLogger(__name__)

FORMAT = "cbtm-prefix-router"
VERSION = 4  # 1: no n-gram model; 2: a dense unigram + bigram one; 3: no gate (all still read)
PREFIX_LENGTHS = (8, 16, 32, 64, 128, 256)
PREFIX_CHARS = 4000  # characters of a document tokenized to cut its prefixes from (>= 256 tokens)
MAX_DOCS = 4000      # training documents the router learns from
PER_DOC = 4          # prefixes of different lengths per training document
CENTROID_T = 0.1     # the centroid routing the router starts from: -d^2 / CENTROID_T
L2_GRID = (1e-3, 1e-2, 1e-1)  # penalties tried; the one with the best held-out likelihood is kept
GATE_GRID = np.linspace(0.0, 1.0, 11)  # the centroid share tried per prefix-length bucket


def length_bucket(n_tokens: np.ndarray) -> np.ndarray:
    """Index of the nearest PREFIX_LENGTHS entry (on a log scale) of each length."""
    logs = np.log(np.asarray(PREFIX_LENGTHS, dtype=np.float64))
    return np.abs(np.log(np.maximum(np.asarray(n_tokens, dtype=np.float64), 1.0))[:, None] - logs[None]).argmin(1)


def _by_length(values: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    """[n, k] values once more per prefix-length bucket: [n, 6k], zero outside each row's own bucket."""
    onehot = np.eye(len(PREFIX_LENGTHS), dtype=np.float32)[buckets]
    return (values[:, :, None] * onehot[:, None, :]).reshape(len(values), -1)


def prefix_features(vectors: np.ndarray, centroids: np.ndarray, token_ids: list[list[int]],
                    ngram: np.ndarray | None = None):
    """The router's features of prefixes: [embedding, -d^2 to each centroid, -d^2 x length bucket, n-gram
    log-posteriors, the same x length bucket, hashed n-grams], a CSR float32 matrix
    [n, dim + 7k + 7k + N_HASHED]; ``ngram`` float32 [n, k]: the n-gram model's log-posteriors (None: a
    version-1 router, without those 7k columns)."""
    from scipy.sparse import csr_matrix, hstack

    d2 = -squared_distances(vectors, centroids)
    buckets = length_bucket([len(t) for t in token_ids])
    blocks = [vectors, d2, _by_length(d2, buckets)]
    if ngram is not None:
        blocks += [ngram, _by_length(ngram, buckets)]
    dense = np.hstack(blocks).astype(np.float32)
    return hstack([csr_matrix(dense), hashed_ngrams(token_ids)], format="csr")


def _documents(corpus_path: Path, assignments_path: Path, split: str, column: str, limit: int, rng,
               sample: bool = True):
    """(doc ids, texts cut to PREFIX_CHARS, labels) of up to ``limit`` documents of a split: a seeded sample,
    or (``sample=False``) the first ones."""
    docs = pq.read_table(corpus_path, columns=["id", "text", "split"], filters=[("split", "=", split)])
    assign = pq.read_table(assignments_path, columns=["id", column])
    label = dict(zip(assign.column("id").to_pylist(), assign.column(column).to_pylist()))
    ids, texts = docs.column("id").to_pylist(), docs.column("text").to_pylist()
    order = rng.permutation(len(ids))[:limit] if sample else np.arange(min(limit, len(ids)))
    return ([ids[i] for i in order], [texts[i][:PREFIX_CHARS] for i in order],
            [int(label[ids[i]]) for i in order])


def _prefixes(encoded: list[list[int]], labels: list[int], rng) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """PER_DOC prefixes per document, of lengths drawn from PREFIX_LENGTHS (a shorter document: its whole
    text); returns (prefixes, labels int64 [m], the index of each prefix's document int64 [m])."""
    out, y, owner = [], [], []
    for i, (ids, label) in enumerate(zip(encoded, labels)):
        for length in rng.choice(PREFIX_LENGTHS, size=PER_DOC, replace=False):
            if ids:
                out.append(ids[:length])
                y.append(label)
                owner.append(i)
    return out, np.asarray(y, dtype=np.int64), np.asarray(owner, dtype=np.int64)


def _ngram_model(corpus_path: Path, assignments_path: Path, k: int, encode) -> tuple[NgramModel, dict]:
    """The n-gram model of (up to NGRAM_DOCS) training documents, and each counted document's fold by id."""
    ids, texts, labels = _documents(corpus_path, assignments_path, "train", "cluster_id", NGRAM_DOCS, None,
                                    sample=False)
    model = NgramModel(encode(texts), np.asarray(labels), k)
    return model, {doc_id: i % len(model.folds) for i, doc_id in enumerate(ids)}


def fit_prefix_router(corpus_path: Path, assignments_path: Path, centroids: np.ndarray,
                      embed: Callable[[list[str]], np.ndarray], encode: Callable[[list[str]], list[list[int]]],
                      decode: Callable[[list[int]], str], out_dir: Path, seed: int = 0) -> dict:
    """Fit the router on prefixes of (at most MAX_DOCS) training documents, calibrate its temperature on
    held-out prefixes, and write it to ``out_dir`` (atomically). Returns its settings.json, which also gives the
    held-out top-1 agreement with each document's own cluster, per prefix length, for the router and for plain
    centroid routing."""
    rng = np.random.default_rng(seed)
    k = len(centroids)
    if k == 1:
        return _write_router(out_dir, np.zeros((1, 0), np.float32), np.zeros(1, np.float32), None,
                             {"n_features": 0, "n_clusters": 1, "temperature": 1.0, "trivial": True})
    # Labelled by each document's nearest centroid: what full-text routing picks (a balanced training
    # assignment moves documents to a farther cluster only to even out the experts' data).
    doc_ids, texts, labels = _documents(corpus_path, assignments_path, "train", "cluster_id", MAX_DOCS, rng)
    held_ids, held, held_labels = _documents(corpus_path, assignments_path, "heldout", "cluster_id",
                                             MAX_DOCS // 4, rng)
    if len(held) < 20:  # too few held-out documents: calibrate on a tenth of the training ones instead
        cut = max(1, len(texts) // 10)
        held_ids, held, held_labels = doc_ids[:cut], texts[:cut], labels[:cut]
        doc_ids, texts, labels = doc_ids[cut:], texts[cut:], labels[cut:]
    ngrams, fold_of = _ngram_model(corpus_path, assignments_path, k, encode)
    x_ids, y, owner = _prefixes(encode(texts), labels, rng)
    h_ids, hy, h_owner = _prefixes(encode(held), held_labels, rng)
    # Every prefix's n-gram posterior leaves out its own document's counts (held-out documents have none).
    folds = np.array([fold_of.get(doc_ids[i], -1) for i in owner], dtype=np.int64)
    h_folds = np.array([fold_of.get(held_ids[i], -1) for i in h_owner], dtype=np.int64)
    x = prefix_features(embed([decode(t) for t in x_ids]), centroids, x_ids, ngrams.cross_fitted(x_ids, folds))
    h_vectors = embed([decode(t) for t in h_ids])
    h_x = prefix_features(h_vectors, centroids, h_ids, ngrams.cross_fitted(h_ids, h_folds))
    d2_col = h_vectors.shape[1]
    fits = []
    # The penalty that predicts held-out prefixes best (calibrated log-likelihood) is kept.
    for l2, (coef, intercept) in zip(L2_GRID, fit_residual(x, y, k, L2_GRID, d2_col)):
        raw = _raw_logits(h_x, coef, intercept)
        tau, nll = _calibrate(raw, hy)
        fits.append((nll, l2, coef, intercept, raw, tau))
    _, l2, coef, intercept, raw, tau = min(fits, key=lambda f: f[0])
    buckets = length_bucket([len(t) for t in h_ids])
    lengths = np.asarray(PREFIX_LENGTHS)[buckets]
    d2 = -squared_distances(h_vectors, centroids).astype(np.float64)
    centroid_tau, gate = fit_gate(raw / tau, d2, hy, buckets)
    gated = gate_logits(raw / tau, d2, buckets, gate, centroid_tau)
    nearest = d2.argmax(1)
    info = {"n_features": int(x.shape[1]), "n_clusters": k, "temperature": tau, "l2": l2,
            "centroid_temperature": centroid_tau, "gate": gate,
            "heldout_nll": round(_nll(gated, hy), 4) if len(hy) else 0.0,
            "prefix_lengths": list(PREFIX_LENGTHS), "train_prefixes": len(x_ids),
            "heldout_prefixes": len(h_ids), "ngram_documents": len(fold_of),
            "heldout_top1_agreement": _agreement(gated.argmax(1), hy, lengths),
            "heldout_top1_agreement_centroid": _agreement(nearest, hy, lengths)}
    info = _write_router(out_dir, coef, intercept, ngrams.full(), info)
    _log_fit(info)
    return info


def fit_gate(router: np.ndarray, d2: np.ndarray, labels: np.ndarray,
             buckets: np.ndarray) -> tuple[float, list[float]]:
    """(centroid temperature, gate per PREFIX_LENGTHS bucket): the temperature calibrating centroid routing's
    logits ``d2`` float64 [n, k] (minus squared distances) on the held-out ``labels`` int64 [n], and per bucket
    the share g of GATE_GRID whose blend (1 - g) ``router`` + g ``d2`` / temperature (``router``: calibrated
    logits float64 [n, k]) has the best held-out likelihood; a bucket without held-out prefixes keeps g = 0."""
    centroid_tau, _ = _calibrate(d2, labels)
    gate = []
    for b in range(len(PREFIX_LENGTHS)):
        rows = buckets == b
        if not rows.any():
            gate.append(0.0)
            continue
        nlls = [_nll((1 - g) * router[rows] + g * d2[rows] / centroid_tau, labels[rows]) for g in GATE_GRID]
        gate.append(round(float(GATE_GRID[int(np.argmin(nlls))]), 4))  # ties: the smallest share
    return centroid_tau, gate


def gate_logits(router: np.ndarray, d2: np.ndarray, buckets: np.ndarray, gate, centroid_tau: float) -> np.ndarray:
    """(1 - g) ``router`` + g ``d2`` / ``centroid_tau`` row by row, g = ``gate[bucket]``: float64 [n, k]."""
    g = np.asarray(gate, dtype=np.float64)[np.asarray(buckets)][:, None]
    return (1 - g) * router + g * d2 / centroid_tau


def router_is_current(directory: Path) -> bool:
    """Whether ``directory`` holds a prefix router of this version (an older one is still read, not refitted)."""
    try:
        info = read_json(Path(directory) / "settings.json")
    except (OSError, ValueError):
        return False
    return info.get("format") == FORMAT and info.get("version") == VERSION


def _write_router(out_dir: Path, coef: np.ndarray, intercept: np.ndarray, ngram: NgramCounts | None,
                  info: dict) -> dict:
    info = {"format": FORMAT, "version": VERSION, **info}
    with atomic_dir(Path(out_dir)) as tmp:
        np.save(tmp / "coef.npy", coef)
        np.save(tmp / "intercept.npy", intercept)
        if ngram is not None:
            info["ngram"] = ngram.save(tmp)
        (tmp / "settings.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def fit_residual(x, y: np.ndarray, k: int, penalties, d2_col: int,
                 steps: int = 60) -> list[tuple[np.ndarray, np.ndarray]]:
    """Multinomial logistic regression on top of centroid routing: logits = -d^2 / T0 + x W + b, W and b
    L2-penalised, so that with no evidence the router is the centroid router (its d^2 columns are
    ``x[:, d2_col:d2_col + k]``). One fit per penalty in ``penalties``, the sparse products prepared once.
    Full-batch L-BFGS (torch; the products with the sparse ``x`` by scipy). Returns, per penalty, (coef float32
    [k, F] with the -d^2/T0 part folded into the d^2 columns, intercept float32 [k])."""
    import torch

    base = np.zeros((x.shape[1], k), np.float32)
    base[d2_col:d2_col + k] = np.eye(k, dtype=np.float32) / CENTROID_T
    # A column no prefix uses has no gradient from the data, so its weights stay at their start, 0, and the
    # optimum is the same without it: fitting only the used columns makes each step cost what the data holds
    # rather than the 2^16 hashed columns.
    x = x.tocsc()
    used = np.flatnonzero(np.diff(x.indptr))
    product = _sparse_product(x[:, used].astype(np.float32).tocsr())
    base_used = torch.as_tensor(base[used])
    target = torch.as_tensor(y, dtype=torch.long)
    seen = np.bincount(y, minlength=k) > 0
    out = []
    for l2 in penalties:
        w, b = _lbfgs(product, base_used, target, k, l2, steps)
        coef = base.copy()
        coef[used] += w
        b[~seen] = -30.0  # a cluster without training documents is never chosen
        out.append((coef.T.copy(), b))
    return out


def _lbfgs(product, base_used, target, k: int, l2: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(w float32 [F_used, k], b float32 [k]) minimising cross-entropy(product(base + w) + b) + l2 |w, b|^2."""
    import torch

    w = torch.zeros(base_used.shape[0], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = product(base_used + w) + b
        loss = torch.nn.functional.cross_entropy(logits, target) + l2 * (w.pow(2).sum() + b.pow(2).sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach().numpy(), b.detach().numpy().astype(np.float32)


def _sparse_product(x):
    """``w -> x @ w`` as a torch function of w float32 [F, k], for a fixed scipy CSR x [n, F]; its gradient is
    x^T @ grad. Both products are scipy's: forward and backward together ~9x faster than torch.sparse.mm's
    (7 ms against 64 ms at 1,532 prefixes and 1.2M non-zeros)."""
    import torch

    x_t = x.T.tocsr()

    class Product(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            return torch.from_numpy(np.asarray(x @ w.detach().numpy(), dtype=np.float32))

        @staticmethod
        def backward(ctx, grad):
            return torch.from_numpy(np.asarray(x_t @ grad.detach().numpy(), dtype=np.float32))

    return Product.apply


def _log_fit(info: dict) -> None:
    """One log line: the fitted router's held-out agreement per prefix length beside centroid routing's."""
    def row(agreement: dict) -> str:
        return "/".join(f"{agreement[str(n)]:.2f}" if str(n) in agreement else "-" for n in PREFIX_LENGTHS)

    log.info("router: prefix router on %d prefixes, temperature %.3f; held-out top-1 agreement at %s tokens: %s "
             "(centroid routing %s); the gate's centroid share %s", info["train_prefixes"], info["temperature"],
             "/".join(map(str, PREFIX_LENGTHS)), row(info["heldout_top1_agreement"]),
             row(info["heldout_top1_agreement_centroid"]), "/".join(f"{g:g}" for g in info["gate"]))


def _agreement(predicted: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> dict:
    return {str(n): round(float((predicted[lengths == n] == labels[lengths == n]).mean()), 4)
            for n in PREFIX_LENGTHS if (lengths == n).any()}


def _raw_logits(x, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    return np.asarray(x @ coef.T, dtype=np.float64) + intercept[None, :]


def _nll(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits - logits.max(1, keepdims=True)
    return float(-(z[np.arange(len(z)), labels] - np.log(np.exp(z).sum(1))).mean())


def _calibrate(raw: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(tau, its negative log-likelihood): the temperature minimising the held-out NLL of softmax(raw / tau)."""
    if not len(labels):
        return 1.0, 0.0
    best, best_nll = 1.0, np.inf
    for tau in np.exp(np.linspace(np.log(0.05), np.log(20.0), 61)):
        nll = _nll(raw / tau, labels)
        if nll < best_nll:
            best, best_nll = float(tau), nll
    return best, best_nll


class PrefixRouter:
    """Routing by the fitted prefix classifier: a text's logits are its calibrated log-probabilities per cluster
    (up to a constant), so that ``route_temperature`` 1 gives the calibrated probabilities."""

    kind = "prefix"
    default_temperature = 1.0
    context_tokens = 256  # a text is routed by its last this many tokens
    early_starts = (8, 16)  # scoring: weighs the first window's experts after 8 and 16 tokens already

    def __init__(self, directory: Path, centroids: np.ndarray, embed: Callable[[list[str]], np.ndarray],
                 encode: Callable[[str], list[int]], decode: Callable[[list[int]], str]):
        directory = Path(directory)

        def damaged(exc: Exception) -> IncompatibleRunError:  # the router directory sits in its run's root
            return IncompatibleRunError(f"the prefix router in {directory} is missing or damaged "
                                        f"({type(exc).__name__}): {RunDir(directory.parent).repair_hint()}")

        try:
            self.info = read_json(directory / "settings.json")
            self.coef = load_npy(directory / "coef.npy")
            self.intercept = load_npy(directory / "intercept.npy")
        except (OSError, ValueError) as exc:
            raise damaged(exc) from exc
        if self.info.get("format") != FORMAT or self.coef.shape != (len(centroids), self.info["n_features"]):
            raise IncompatibleRunError(f"the prefix router in {directory} does not fit this run's clusters: rebuild "
                                       f"it with `cbtm run --out {directory.parent} --force cluster`")
        try:
            self.ngram = read_ngram(directory, self.info, len(centroids))
        except (OSError, ValueError, KeyError) as exc:
            raise damaged(exc) from exc
        self.centroids, self.embed, self.encode, self.decode = np.asarray(centroids, np.float32), embed, encode, decode
        self.tau = float(self.info["temperature"])

    def vectors(self, texts: list[str]):
        """The router's features of each text's last `context_tokens` tokens (CSR float32 [n, n_features])."""
        if self.info.get("trivial"):  # one cluster: nothing to decide, nothing to embed
            from scipy.sparse import csr_matrix
            return csr_matrix((len(texts), 0), dtype=np.float32)
        ids = [self.encode(t)[-self.context_tokens:] for t in texts]
        ngram = None if self.ngram is None else self.ngram.log_posteriors(ids)
        return prefix_features(self.embed([self.decode(t) for t in ids]), self.centroids, ids, ngram)

    def logits(self, vectors, columns: np.ndarray) -> np.ndarray:
        """Calibrated logits float64 [n, len(columns)] of each text over the listed clusters (gated with
        centroid routing per prefix-length bucket, version 4)."""
        logits = _raw_logits(vectors, self.coef[columns], self.intercept[columns]) / self.tau
        gate = self.info.get("gate")
        if not gate or not any(gate) or vectors.shape[0] == 0:
            return logits
        k, dim = self.centroids.shape
        d2 = vectors[:, dim:dim + k].toarray().astype(np.float64)  # the features' own -d^2 columns
        # Each row's length bucket: the one block of its by-length -d^2 columns ([k, buckets]) that is non-zero.
        by_length = np.abs(vectors[:, dim + k:dim + k * (1 + len(PREFIX_LENGTHS))].toarray())
        buckets = by_length.reshape(len(d2), k, len(PREFIX_LENGTHS)).sum(1).argmax(1)
        return gate_logits(logits, d2[:, columns], buckets, gate, float(self.info["centroid_temperature"]))
