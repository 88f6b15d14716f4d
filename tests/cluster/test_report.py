import sys

import numpy as np
import pytest

from cluster.config import ClusterConfig
from cluster.kmeans import cluster_corpus
from cluster.report import (
    PLOT_FILES,
    clusters_markdown,
    clusters_table,
    label_quality,
    plot_cluster_map,
    project_2d,
    write_cluster_plots,
)
from tests.cluster.test_kmeans import clustered_inputs


def test_label_quality_is_one_for_a_relabelled_perfect_clustering_and_lower_otherwise():
    truth = ["a"] * 5 + ["b"] * 5 + ["c"] * 5
    perfect = label_quality(truth, np.repeat([2, 0, 1], 5))
    assert perfect == pytest.approx({"purity": 1.0, "nmi": 1.0, "ari": 1.0})
    merged = label_quality(truth, np.repeat([0, 0, 1], 5))
    assert merged["purity"] == pytest.approx(10 / 15) and merged["nmi"] < 1 and merged["ari"] < 1


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    corpus, emb = clustered_inputs(root)
    clusters = cluster_corpus(ClusterConfig(n_clusters=3), corpus, emb, root / "clusters", label_field="domain")
    return root, corpus, emb, clusters


def test_plots_are_written_including_the_label_heatmap(clustered):
    root, corpus, emb, clusters = clustered
    paths = write_cluster_plots(clusters, corpus, emb, root / "plots", label_field="domain")
    assert sorted(p.name for p in paths) == sorted(PLOT_FILES.values())
    assert all(p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 2000 for p in paths)
    without = write_cluster_plots(clusters, corpus, emb, root / "plots2")
    assert sorted(p.name for p in without) == sorted([PLOT_FILES["sizes"], PLOT_FILES["map"]])


def test_markdown_has_sizes_words_labels_nearest_documents_and_plot_links(clustered):
    _, _, _, clusters = clustered
    md = clusters_markdown(clusters, "plots")
    assert md.startswith("## Clusters\n")
    for name in PLOT_FILES.values():
        assert f"](plots/{name})" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3 and all(line.count(" | ") >= 5 for line in rows)
    assert "NMI 1.000" in md and "### Documents nearest each centroid" in md
    nearest = [line for line in md.splitlines() if line.startswith("  - ")]
    assert len(nearest) == 9 and all(len(line) <= 4 + 200 + 20 for line in nearest)
    table = clusters_table(clusters)
    assert {"train docs", "train docs (balanced)", "distinctive words", "top labels"} <= set(table[0])


def test_without_umap_the_map_is_the_first_two_principal_components(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` now raises ImportError, as when not installed
    x = np.random.default_rng(0).normal(size=(30, 5)).astype(np.float32) * np.array([5, 3, 1, 1, 1], np.float32)
    xy, method = project_2d(x)
    assert method == "pca" and xy.shape == (30, 2)
    centred = x - x.mean(0)
    axes = np.linalg.svd(centred, full_matrices=False)[2][:2]
    np.testing.assert_allclose(np.abs(xy), np.abs(centred @ axes.T), rtol=1e-3, atol=1e-4)  # up to sign
    path = plot_cluster_map(x[:3, :1], np.array([0, 1, 1]), tmp_path / "map.png")
    assert path.exists()


def test_a_label_field_without_values_is_reported_not_plotted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus, emb = clustered_inputs(tmp_path)
    table = pq.read_table(corpus)
    pq.write_table(table.append_column("topic", pa.array([None] * table.num_rows, pa.string())), corpus)
    clusters = cluster_corpus(ClusterConfig(n_clusters=3), corpus, emb, tmp_path / "clusters", label_field="topic")
    assert "labels none of the training documents" in clusters_markdown(clusters)
    paths = write_cluster_plots(clusters, corpus, emb, tmp_path / "plots", label_field="topic")
    assert PLOT_FILES["labels"] not in [p.name for p in paths]
