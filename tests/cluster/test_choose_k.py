import json

import numpy as np
import pytest

from cluster.choose_k import best_k, choose_k, edge_warning, score_ks
from ground.errors import UserInputError
from tests.cluster.test_kmeans import blobs, clustered_inputs


def test_silhouette_picks_the_true_number_of_blobs():
    x, _ = blobs(n_per=40, k=4, d=12, seed=4)
    results = score_ks(x, [8, 2, 4, 1], sample_size=1000, seed=0, n_init=2)
    assert [r["k"] for r in results] == [1, 2, 4, 8]
    assert results[0]["silhouette"] is None  # undefined for one cluster
    inertia = [r["inertia"] for r in results]
    assert all(a >= b - 1e-6 for a, b in zip(inertia, inertia[1:]))
    assert sum(results[2]["sizes"]) == len(x)
    assert best_k(results) == 4


def test_choose_k_writes_json_and_plot_from_a_run(tmp_path):
    corpus, emb = clustered_inputs(tmp_path)
    out = choose_k(emb, corpus, [2, 3, 5], sample_size=1000, seed=0, out_dir=tmp_path / "choose")
    assert out["best_k"] == 3 and out["n_docs"] == 60  # 3 domains; held-out documents are left out
    saved = json.loads((tmp_path / "choose" / "choose_k.json").read_text())
    assert saved["best_k"] == 3 and [r["k"] for r in saved["results"]] == [2, 3, 5]
    assert (tmp_path / "choose" / "choose_k.png").stat().st_size > 1000


def test_same_seed_same_scores():
    x, _ = blobs(n_per=30, k=3, seed=6)
    a, b = score_ks(x, [2, 3], seed=1), score_ks(x, [2, 3], seed=1)
    assert [(r["inertia"], r["silhouette"], r["sizes"]) for r in a] == [(r["inertia"], r["silhouette"], r["sizes"])
                                                                        for r in b]


@pytest.mark.parametrize("ks, sample, message", [([0, 2], 100, "integer >= 1"), ([2, 500], 100, "larger than the 60"),
                                                 ([], 100, "no candidate"), ([4], 3, "sample size 3")])
def test_bad_ks_are_one_clear_line(tmp_path, ks, sample, message):
    corpus, emb = clustered_inputs(tmp_path)
    with pytest.raises(UserInputError, match=message) as info:
        choose_k(emb, corpus, ks, sample_size=sample, seed=0, out_dir=tmp_path / "choose")
    assert "\n" not in str(info.value)


def test_nan_embeddings_are_refused():
    x, _ = blobs(n_per=10)
    x[0, 0] = np.nan
    with pytest.raises(UserInputError, match="NaN"):
        score_ks(x, [2])


def test_a_best_k_at_the_grids_edge_is_called_out():
    rising = [{"k": k, "silhouette": s} for k, s in [(2, .046), (4, .061), (8, .070), (16, .076), (32, .080)]]
    assert "k=32, the largest candidate" in edge_warning(rising, best_k(rising))
    assert edge_warning(rising[:3] + [{"k": 16, "silhouette": .01}], 8) is None
    assert edge_warning(rising[:1], 2) is None  # one candidate: nothing to compare
