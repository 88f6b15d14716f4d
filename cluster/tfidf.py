"""tf-idf + truncated SVD + L2 normalisation: the c-BTM paper's document embedder, saved in open formats.

Fitted on a seeded random sample of the training split, then applied to every document. The fitted
parameters live in one directory, no pickles::

    settings.json      format, vectorizer settings, dim, sample size, seed, scikit-learn version
    vocabulary.json    the terms, in column order (a list of str, length V)
    idf.npy            float32 [V], the inverse document frequencies
    components.npy     float32 [dim, V], the SVD projection (rows: right singular vectors)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ground.arrays import load_npy
from ground.errors import UserInputError
from ground.files import atomic_dir

log = logging.getLogger(__name__)

FORMAT = "cbtm-tfidf"
SEED = 0  # the sample and the SVD are seeded: the same corpus gives the same embedder
MAX_FEATURES = 100_000
# Everything TfidfVectorizer needs to rebuild the same transform (JSON-serialisable).
VECTORIZER = {"lowercase": True, "token_pattern": r"(?u)\b\w\w+\b", "ngram_range": [1, 1], "stop_words": "english",
              "strip_accents": None, "sublinear_tf": True, "smooth_idf": True, "norm": "l2"}


def _vectorizer(settings: dict, **extra):
    from sklearn.feature_extraction.text import TfidfVectorizer

    kwargs = dict(settings, ngram_range=tuple(settings["ngram_range"]))
    return TfidfVectorizer(dtype=np.float32, **kwargs, **extra)


class TfidfEmbedder:
    """tf-idf -> truncated SVD -> L2: ``encode`` maps texts to float32 [n, dim], unit rows (a text with no
    known term maps to the zero vector)."""

    name = "tfidf"
    chunk_size = 4096  # documents per transform call in the embed stage

    def __init__(self, vectorizer, components: np.ndarray, info: dict):
        self.vectorizer = vectorizer
        self.components = np.ascontiguousarray(components, dtype=np.float32)  # [dim, V]
        self.info = info
        self.dim = int(self.components.shape[0])

    @classmethod
    def fit(cls, texts: list[str], dim: int, seed: int = SEED) -> "TfidfEmbedder":
        """Fit the vocabulary, idf and a ``dim``-component SVD on ``texts`` (clamped below the vocabulary size)."""
        from sklearn.decomposition import TruncatedSVD

        min_df = 2 if len(texts) >= 1000 else 1  # a term seen once in a large sample is noise
        vectorizer = _vectorizer(VECTORIZER, min_df=min_df, max_features=MAX_FEATURES)
        try:
            x = vectorizer.fit_transform(texts)
        except ValueError as exc:  # "empty vocabulary" and the like
            raise UserInputError(f"tf-idf embedder cannot be fitted on {len(texts)} training documents ({exc}): "
                                 "use a larger corpus or embed.kind=sentence-transformers") from exc
        n_terms = x.shape[1]
        if min(n_terms, len(texts)) < 3:
            raise UserInputError(f"tf-idf embedder needs at least 3 training documents and terms, found {len(texts)} "
                                 f"and {n_terms}: use a larger corpus or embed.kind=sentence-transformers")
        top = min(n_terms, len(texts)) - 1  # ARPACK finds at most min(shape) - 1 components
        if dim > top:
            log.warning("tf-idf: embed.tfidf_dim=%d is more than %d terms/documents allow; using %d", dim, top, top)
            dim = top
        # ARPACK (seeded start vector): exact, and faster than the randomized solver at these sizes
        svd = TruncatedSVD(n_components=dim, algorithm="arpack", random_state=seed).fit(x)
        settings = dict(VECTORIZER, min_df=min_df, max_features=MAX_FEATURES)
        info = {"format": FORMAT, "version": 1, "vectorizer": settings, "dim": dim, "n_terms": n_terms,
                "n_fit_docs": len(texts), "seed": seed, "sklearn": _sklearn_version(),
                "explained_variance": float(svd.explained_variance_ratio_.sum())}
        log.info("tf-idf: fitted on %d documents, %d terms -> %d dims (%.0f%% of the variance)", len(texts),
                 n_terms, dim, 100 * info["explained_variance"])
        return cls(vectorizer, svd.components_, info)

    def encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        """Return float32 [len(texts), dim], L2-normalised rows.

        A text with none of the fitted terms (say, only rare words or digits) has no tf-idf direction: it
        gets the first SVD axis, which for uncentred tf-idf is closest to the corpus's mean direction, so
        it is clustered and routed like a typical document instead of failing as an all-zero vector.
        """
        if not len(texts):
            return np.zeros((0, self.dim), np.float32)
        x = self.vectorizer.transform(list(texts))  # sparse float32 [n, V]
        z = np.asarray(x @ self.components.T, dtype=np.float32)
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        out = np.divide(z, norms, out=np.zeros_like(z), where=norms > 0)
        out[norms[:, 0] == 0, 0] = 1.0
        return out

    def save(self, directory: Path) -> Path:
        """Write the fitted parameters into ``directory`` (atomically, replacing it)."""
        vocab = sorted(self.vectorizer.vocabulary_, key=self.vectorizer.vocabulary_.__getitem__)
        with atomic_dir(Path(directory)) as tmp:
            (tmp / "settings.json").write_text(json.dumps(self.info, indent=2) + "\n", encoding="utf-8")
            (tmp / "vocabulary.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
            np.save(tmp / "idf.npy", np.asarray(self.vectorizer.idf_, dtype=np.float32))
            np.save(tmp / "components.npy", self.components)
        return Path(directory)

    @classmethod
    def load(cls, directory: Path) -> "TfidfEmbedder":
        """Rebuild the fitted embedder from ``directory`` (written by `save`)."""
        directory = Path(directory)
        try:
            info = json.loads((directory / "settings.json").read_text(encoding="utf-8"))
            vocab = json.loads((directory / "vocabulary.json").read_text(encoding="utf-8"))
            idf = load_npy(directory / "idf.npy")
            components = load_npy(directory / "components.npy")
        except (OSError, ValueError) as exc:
            raise UserInputError(f"tf-idf embedder at {directory} is missing or corrupt ({type(exc).__name__}): "
                                 "re-run the embed stage (cbtm run --force embed)") from exc
        if info.get("format") != FORMAT or components.shape[1] != len(vocab) or idf.shape != (len(vocab),):
            raise UserInputError(f"tf-idf embedder at {directory} is inconsistent: re-run the embed stage "
                                 "(cbtm run --force embed)")
        settings = {k: v for k, v in info["vectorizer"].items() if k not in ("min_df", "max_features")}
        vectorizer = _vectorizer(settings, vocabulary=vocab)
        vectorizer.idf_ = idf
        return cls(vectorizer, components, info)


def training_sample(corpus_path: Path, size: int, seed: int = SEED) -> list[str]:
    """A seeded random sample of at most ``size`` training-split texts of the ingested corpus (Parquet).

    Two streamed passes (count the training rows, then take the chosen ones), so memory is the sample
    plus one row group, whatever the corpus size. Uses every document when none is in training.
    """
    parquet = pq.ParquetFile(corpus_path)
    # Row group by row group (the ingest stage writes them <= 10,000 rows): unlike iter_batches, this
    # does not leave each decoded batch's memory with the allocator.
    groups = lambda cols: (parquet.read_row_group(g, columns=cols) for g in range(parquet.num_row_groups))  # noqa
    n_train = sum(pc.sum(pc.equal(t.column("split"), "train")).as_py() or 0 for t in groups(["split"]))
    everything = n_train == 0
    total = parquet.metadata.num_rows if everything else n_train
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=min(size, total), replace=False))
    texts, seen = [], 0  # seen: candidate rows (training rows, or all) before this row group
    for table in groups(["split", "text"]):
        rows = (np.arange(table.num_rows) if everything
                else np.flatnonzero(pc.equal(table.column("split"), "train").to_numpy(zero_copy_only=False)))
        lo, hi = np.searchsorted(chosen, [seen, seen + len(rows)])
        if hi > lo:
            texts += table.column("text").take(rows[chosen[lo:hi] - seen]).to_pylist()
        seen += len(rows)
        del table
        pa.default_memory_pool().release_unused()
    return texts


def fit_tfidf(corpus_path: Path, dim: int, sample_size: int, directory: Path) -> TfidfEmbedder:
    """Fit on a seeded training sample of ``corpus_path`` and save into ``directory``."""
    embedder = TfidfEmbedder.fit(training_sample(corpus_path, sample_size), dim)
    embedder.info.update(requested_dim=dim, sample_size=sample_size)
    embedder.save(directory)
    return embedder


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__
