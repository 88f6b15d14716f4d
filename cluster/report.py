"""Human-readable cluster descriptions: distinctive words (class-based tf-idf), sizes, nearest documents,
agreement with known labels (purity, NMI, ARI), plots and the "## Clusters" section of report.md."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cluster.embed import load_embeddings
from ground.files import read_json
from ground.plots import colormap, figure, save_figure

log = logging.getLogger(__name__)

PLOT_FILES = {"sizes": "cluster_sizes.png", "map": "cluster_map.png", "labels": "cluster_labels.png"}
MAP_POINTS = 5_000  # documents drawn in the 2-D map


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


def label_quality(true_labels, cluster_labels) -> dict:
    """Agreement of a clustering with known labels: purity, NMI and ARI (floats in [0, 1], ARI may be < 0).

    true_labels: [n] hashable labels; cluster_labels: int [n]. Purity = share of documents whose cluster's
    majority label is their own label.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from sklearn.metrics.cluster import contingency_matrix

    true_labels = np.asarray(true_labels)
    cluster_labels = np.asarray(cluster_labels)
    if len(true_labels) == 0:
        return {"purity": None, "nmi": None, "ari": None}
    table = contingency_matrix(true_labels, cluster_labels)
    return {"purity": float(table.max(axis=0).sum() / table.sum()),
            "nmi": float(normalized_mutual_info_score(true_labels, cluster_labels)),
            "ari": float(adjusted_rand_score(true_labels, cluster_labels))}


def label_summary(labels: list, cluster_ids: np.ndarray, train_cluster_ids: np.ndarray, train: np.ndarray,
                  summary: list[dict], field: str) -> dict:
    """The ``label_quality`` block of clusters.json, over the training documents that have a label.

    labels: [n] label per document (None/"" = unlabelled); cluster_ids, train_cluster_ids: int [n] nearest-
    centroid and balanced assignments; train: bool [n]. Adds ``top_labels`` ([[label, count], ...], 3 most
    frequent) to each cluster of ``summary`` in place.
    """
    values = np.array(["" if v is None else str(v) for v in labels], dtype=object)
    keep = train & (values != "")
    quality = label_quality(values[keep], cluster_ids[keep])
    balanced = label_quality(values[keep], train_cluster_ids[keep])
    for c in summary:
        names, counts = np.unique(values[keep & (cluster_ids == c["cluster_id"])].astype(str), return_counts=True)
        order = np.argsort(-counts, kind="stable")[:3]
        c["top_labels"] = [[str(names[i]), int(counts[i])] for i in order]
    return {"field": field, "n_docs": int(keep.sum()), "n_labels": int(len(set(values[keep]))), **quality,
            "balanced": balanced}


def plot_cluster_sizes(summary: list[dict], path: Path, capacity: int | None = None) -> Path:
    """Bars of training documents per cluster: nearest centroid, and balanced when ``size_train_balanced`` is
    present (with the cap as a dashed line); ticks show each cluster's top keywords. Writes a PNG."""
    fig = figure(figsize=(max(4, 0.9 * len(summary) + 2), 3.5))
    ax = fig.subplots()
    x = np.arange(len(summary))
    sizes = [c["size_train"] for c in summary]
    balanced = [c.get("size_train_balanced") for c in summary]
    if None in balanced:
        ax.bar(x, sizes, color="tab:blue")
    else:
        ax.bar(x - 0.2, sizes, 0.4, color="tab:blue", label="nearest centroid (routing)")
        ax.bar(x + 0.2, balanced, 0.4, color="tab:orange", label="balanced (training)")
        ax.legend(fontsize=7)
    if capacity:
        ax.axhline(capacity, color="grey", linestyle="--", linewidth=1)
    ticks = [f"{c['cluster_id']}\n" + "\n".join(c["keywords"][:2]) for c in summary]
    ax.set_xticks(x, ticks, fontsize=7 if len(summary) <= 20 else 5)
    ax.set_ylabel("training documents")
    ax.set_title("Cluster sizes")
    return save_figure(fig, path)


def project_2d(vectors: np.ndarray, seed: int = 0, method: str = "auto") -> tuple[np.ndarray, str]:
    """2-D coordinates float32 [n, 2] of vectors [n, d] and the method used ("umap" if importable, else "pca")."""
    if method in ("auto", "umap"):
        try:
            import umap

            return umap.UMAP(random_state=seed).fit_transform(vectors).astype(np.float32), "umap"
        except ImportError:
            if method == "umap":
                log.warning("umap is not installed: using PCA for the cluster map")
    from sklearn.decomposition import PCA

    n_comp = min(2, *vectors.shape)
    xy = PCA(n_components=n_comp, random_state=seed).fit_transform(vectors)
    return np.pad(xy, ((0, 0), (0, 2 - n_comp))).astype(np.float32), "pca"


def plot_cluster_map(vectors: np.ndarray, labels: np.ndarray, path: Path, seed: int = 0,
                     max_points: int = MAP_POINTS, method: str = "auto") -> Path:
    """Scatter of a seeded sample (at most ``max_points``) of vectors [n, d], coloured by cluster labels int [n]."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(vectors), min(max_points, len(vectors)), replace=False))
    xy, used = project_2d(np.asarray(vectors[rows], dtype=np.float32), seed, method)
    fig = figure(figsize=(6, 5))
    ax = fig.subplots()
    k = int(labels.max()) + 1 if len(labels) else 1
    palette = (np.asarray(colormap("tab10" if k <= 10 else "tab20").colors) if k <= 20
               else colormap("gist_ncar")(np.linspace(0.0, 0.95, k)))
    ax.scatter(xy[:, 0], xy[:, 1], c=palette[labels[rows] % len(palette)], s=6, alpha=0.7, linewidths=0)
    for c in np.unique(labels[rows]):
        cx, cy = np.median(xy[labels[rows] == c], axis=0)
        ax.annotate(str(c), (cx, cy), fontsize=8, weight="bold", ha="center", va="center",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.7, "lw": 0})
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{len(rows)} documents, {used.upper()} of the embeddings, coloured by cluster", fontsize=9)
    return save_figure(fig, path)


def plot_label_heatmap(true_labels, cluster_labels: np.ndarray, n_clusters: int, path: Path,
                       quality: dict | None = None, field: str = "label") -> Path:
    """Heatmap cluster x label of the share of each cluster's documents per label; purity/NMI/ARI in the title."""
    true_labels = np.asarray([str(v) for v in true_labels])
    names = np.unique(true_labels)
    table = np.zeros((n_clusters, len(names)), np.int64)
    np.add.at(table, (cluster_labels, np.searchsorted(names, true_labels)), 1)
    share = table / np.maximum(table.sum(1, keepdims=True), 1)
    quality = quality or label_quality(true_labels, cluster_labels)
    fig = figure(figsize=(max(4, 0.45 * len(names) + 2.5), max(3, 0.35 * n_clusters + 1.8)))
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    if table.size <= 400:
        for (i, j), v in np.ndenumerate(table):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=6,
                        color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n_clusters), [str(c) for c in range(n_clusters)], fontsize=7)
    ax.set_xlabel(field)
    ax.set_ylabel("cluster")
    ax.set_title(f"purity {quality['purity']:.3f}  NMI {quality['nmi']:.3f}  ARI {quality['ari']:.3f}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, label="share of the cluster")
    return save_figure(fig, path)


def write_cluster_plots(clusters_dir: Path, corpus_path: Path, embeddings_dir: Path, plots_dir: Path,
                        label_field: str | None = None, seed: int = 0) -> list[Path]:
    """Write the cluster plots (PNG) of a clustered run into ``plots_dir``; returns their paths.

    Always cluster_sizes.png and cluster_map.png (training documents); cluster_labels.png when
    ``label_field`` is given and clusters.json has a ``label_quality`` block.
    """
    meta = read_json(Path(clusters_dir) / "clusters.json")
    plots_dir = Path(plots_dir)
    out = [plot_cluster_sizes(meta["clusters"], plots_dir / PLOT_FILES["sizes"], meta.get("capacity"))]
    assign = pq.read_table(Path(clusters_dir) / "assignments.parquet", columns=["split", "cluster_id"])
    train = np.array(assign.column("split").to_pylist()) == "train"
    clusters = assign.column("cluster_id").to_numpy().astype(np.int64)
    _, vectors = load_embeddings(Path(embeddings_dir))
    out.append(plot_cluster_map(vectors[train], clusters[train], plots_dir / PLOT_FILES["map"], seed))
    quality = meta.get("label_quality")
    if label_field and quality and quality.get("nmi") is not None:
        values = pq.read_table(corpus_path, columns=[label_field]).column(label_field).to_pylist()
        values = np.array(["" if v is None else str(v) for v in values], dtype=object)
        keep = train & (values != "")
        out.append(plot_label_heatmap(values[keep], clusters[keep], meta["n_clusters"],
                                      plots_dir / PLOT_FILES["labels"], quality, label_field))
    return out


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def clusters_table(clusters_dir: Path) -> list[dict]:
    """One row per cluster (for a Prefect table artifact): cluster, train docs (nearest / balanced), held-out
    docs, distinctive words, and the top labels when known."""
    meta = read_json(Path(clusters_dir) / "clusters.json")
    rows = []
    for c in meta["clusters"]:
        row = {"cluster": c["cluster_id"], "train docs": c["size_train"],
               "train docs (balanced)": c.get("size_train_balanced", c["size_train"]),
               "held-out docs": c["size_heldout"], "distinctive words": ", ".join(c["keywords"])}
        if "top_labels" in c:
            row["top labels"] = ", ".join(f"{name} ({n})" for name, n in c["top_labels"])
        rows.append(row)
    return rows


def clusters_markdown(clusters_dir: Path, plots_rel: str = "plots") -> str:
    """The "## Clusters" section of report.md: table (sizes, distinctive words), label agreement, plot links
    (files named as in ``PLOT_FILES`` under ``plots_rel``) and the 3 documents nearest each centroid."""
    meta = read_json(Path(clusters_dir) / "clusters.json")
    rel = plots_rel.rstrip("/")
    cap = meta.get("capacity")
    lines = ["## Clusters", "",
             f"{meta['n_clusters']} clusters (spherical k-means, inertia {meta['inertia']:.4f}). Routing uses the "
             "nearest centroid; " + (f"training uses a balanced assignment with at most {cap} documents per "
                                     "cluster." if cap else "training uses the same nearest-centroid assignment."),
             "", f"![cluster sizes]({rel}/{PLOT_FILES['sizes']})", "",
             f"![map of the documents]({rel}/{PLOT_FILES['map']})", ""]
    rows = clusters_table(clusters_dir)
    header = list(rows[0]) if rows else []
    align = ["---" if h in ("distinctive words", "top labels") else "---:" for h in header]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(r[h]) for h in header) + " |" for r in rows]
    quality = meta.get("label_quality")
    if quality and quality.get("nmi") is None:
        lines += ["", f"The corpus field `{quality['field']}` labels none of the training documents."]
    elif quality:
        b = quality["balanced"]
        lines += ["", f"Agreement with the corpus field `{quality['field']}` ({quality['n_labels']} labels, "
                      f"{quality['n_docs']} training documents): purity {quality['purity']:.3f}, NMI "
                      f"{quality['nmi']:.3f}, ARI {quality['ari']:.3f} (nearest centroid); balanced: purity "
                      f"{b['purity']:.3f}, NMI {b['nmi']:.3f}, ARI {b['ari']:.3f}.", "",
                  f"![clusters x {quality['field']}]({rel}/{PLOT_FILES['labels']})"]
    lines += ["", "### Documents nearest each centroid", ""]
    for c in meta["clusters"]:
        lines.append(f"- **cluster {c['cluster_id']}** ({_cell(', '.join(c['keywords'][:5]))})")
        lines += [f"  - {_cell(t[:200])}" for t in c["nearest"]]
    return "\n".join(lines) + "\n"
