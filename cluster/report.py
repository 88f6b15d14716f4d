"""Human-readable cluster descriptions: distinctive words (class-based tf-idf), sizes, nearest documents, plots."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def distinctive_words(texts: list[str], labels: np.ndarray, n_clusters: int, n_words: int = 10) -> list[list[str]]:
    """Class-based tf-idf: per cluster, the ``n_words`` words most over-represented in its documents.

    A word's score in cluster c is tf(c) * log(1 + mean words per cluster / total frequency of the word).
    """
    from sklearn.feature_extraction.text import CountVectorizer

    if not texts:
        return [[] for _ in range(n_clusters)]
    vectorizer = CountVectorizer(stop_words="english", token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b",
                                 max_features=50_000)
    try:
        counts = vectorizer.fit_transform(texts)
    except ValueError:  # only stop words
        return [[] for _ in range(n_clusters)]
    vocab = np.array(vectorizer.get_feature_names_out())
    per_cluster = np.zeros((n_clusters, counts.shape[1]), dtype=np.float64)
    for c in range(n_clusters):
        rows = np.flatnonzero(labels == c)
        if len(rows):
            per_cluster[c] = np.asarray(counts[rows].sum(0)).ravel()
    tf = per_cluster / np.maximum(per_cluster.sum(1, keepdims=True), 1)
    avg_words = per_cluster.sum() / n_clusters
    idf = np.log1p(avg_words / np.maximum(per_cluster.sum(0), 1))
    scores = tf * idf[None, :]
    out = []
    for c in range(n_clusters):
        order = np.argsort(-scores[c])[:n_words]
        out.append([str(w) for w, s in zip(vocab[order], scores[c][order]) if s > 0])
    return out


def describe_clusters(texts: list[str], labels: np.ndarray, distance: np.ndarray, train: np.ndarray,
                      n_clusters: int, n_words: int = 10, n_nearest: int = 3) -> list[dict]:
    """Per cluster: id, training/held-out sizes, distinctive words and the documents nearest the centroid."""
    train_texts = [t for t, keep in zip(texts, train) if keep]
    words = distinctive_words(train_texts, labels[train], n_clusters, n_words)
    out = []
    for c in range(n_clusters):
        members = np.flatnonzero((labels == c) & train)
        nearest = members[np.argsort(distance[members])[:n_nearest]]
        out.append({"cluster_id": c, "size_train": int(len(members)),
                    "size_heldout": int(((labels == c) & ~train).sum()), "keywords": words[c],
                    "nearest": [texts[i][:200] for i in nearest]})
    return out


def plot_cluster_sizes(summary: list[dict], path: Path) -> Path:
    """Bar chart of training documents per cluster, labelled with each cluster's top keywords."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(summary) + 2), 3.5))
    sizes = [c["size_train"] for c in summary]
    labels = [f"{c['cluster_id']}\n" + "\n".join(c["keywords"][:2]) for c in summary]
    ax.bar(range(len(sizes)), sizes, color="tab:blue")
    ax.set_xticks(range(len(sizes)), labels, fontsize=8)
    ax.set_ylabel("training documents")
    ax.set_title("Cluster sizes")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
