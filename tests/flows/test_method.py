"""The method at its best: a hybrid embedder used for clustering and routing alike, a prefix router that beats
centroid routing on short prefixes, and a seed phase counted in the training budget."""
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cluster.config import ClusterConfig, CorpusConfig, EmbedConfig
from cluster.corpus import ingest_corpus
from cluster.embed import embed_corpus, load_embedder, load_embeddings
from cluster.kmeans import cluster_corpus, squared_distances
from ensemble import Ensemble
from ensemble.prefix_router import PrefixRouter, fit_prefix_router
from experts.config import SeedConfig
from experts.tokenizer import load_tokenizer, train_tokenizer
from flows.pipeline import build
from ground.rundir import RunDir
from tests.conftest import tiny_config

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="module")
def method_run(prefect_harness, slice_corpus, tmp_path_factory) -> Path:
    """The tiny build with the hybrid embedder, the prefix router and a seed phase of 40% of the budget."""
    run_dir = tmp_path_factory.mktemp("method") / "run"
    cfg = tiny_config(slice_corpus).with_overrides(['embed.kind="hybrid"', "embed.tfidf_dim=16",
                                                    'ensemble.router="prefix"', "seed.pretrain_share=0.4",
                                                    "train.total_tokens=12800"])
    build(cfg.to_dict(), str(run_dir))
    return run_dir


def test_the_hybrid_embedding_is_the_same_for_clustering_and_routing(method_run):
    run = RunDir(method_run)
    ids, vectors = load_embeddings(run.embeddings_dir)
    assert vectors.shape[1] == 384 + 16 and (run.embeddings_dir / "tfidf" / "components.npy").exists()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)  # float16 shards
    docs = pq.read_table(run.corpus_path, columns=["id", "text"]).to_pylist()[:5]
    for router in ("centroid", "prefix"):  # the prefix router's features hold more: embed gives the embedding
        ens = Ensemble.load(method_run, router=router)
        np.testing.assert_allclose(ens.embed([d["text"] for d in docs]), vectors[[ids.index(d["id"]) for d in docs]],
                                   atol=2e-3)
    # The sentence block carries hybrid_weight of a squared distance, the tf-idf block the rest.
    w = EmbedConfig().hybrid_weight
    assert np.linalg.norm(vectors[:, :384], axis=1).mean() == pytest.approx(np.sqrt(w), abs=2e-3)


def test_the_prefix_router_serves_generation_scoring_and_tuning(method_run):
    from flows.evaluate import tune_temperature

    ens = Ensemble.load(method_run)
    assert ens.manifest.config["ensemble"]["router"] == "prefix" and ens.route_temperature == 1.0
    assert ens._view.router.kind == "prefix"
    text = "Knead the dough and let it rise in a warm kitchen. " * 6
    assert isinstance(ens.generate("Bread dough should rise", max_new_tokens=4), str)
    weights, window = ens.scoring([text]).weights(2, 1.0)[0], ens.route_window
    assert len(weights) > window and np.count_nonzero(weights[0]) == ens.n_experts
    # weighed by the router after 8 tokens already, by every expert to the end of the first window, then top-2
    assert np.count_nonzero(weights[8]) == ens.n_experts and not np.allclose(weights[8], weights[0])
    assert np.count_nonzero(weights[window]) <= 2
    result = tune_temperature(ens, [text], [0.5, 1.0], top_k=2)
    assert [r["route_temperature"] for r in result["grid"]] == [0.5, 1.0]


def test_the_seed_phase_and_the_experts_share_the_budget(method_run):
    manifest = RunDir(method_run).read_manifest()
    seed = json.loads((method_run / "pretrained" / "expert.json").read_text())
    experts = sum(e["steps"] for e in manifest.experts.values())
    assert seed["steps"] == 40 and experts == 60  # 40% of 100 steps of 128 tokens, and the rest
    assert "pretrain" in manifest.stages


@pytest.mark.skipif(not (SHARED / "20newsgroups").is_dir(), reason="needs ../shared/data (the labelled corpora)")
def test_the_prefix_router_beats_centroid_routing_on_short_prefixes_of_real_text(tmp_path):
    with gzip.open(SHARED / "20newsgroups" / "train.jsonl.gz", "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    records = [records[i] for i in np.random.default_rng(0).permutation(len(records))[:1500]]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in records))
    corpus = ingest_corpus(CorpusConfig(path=str(tmp_path / "c.jsonl"), heldout_fraction=0.3), tmp_path / "d.parquet")
    embed_cfg = EmbedConfig(kind="tfidf")
    embed_corpus(embed_cfg, corpus, tmp_path / "emb")
    cluster_corpus(ClusterConfig(n_clusters=8), corpus, tmp_path / "emb", tmp_path / "clusters")
    tokenizer = load_tokenizer(train_tokenizer(SeedConfig(model="preset:tiny"), corpus, tmp_path / "tok"))
    embed = load_embedder(embed_cfg, tmp_path / "emb").encode
    centroids = np.load(tmp_path / "clusters" / "centroids.npy")
    fit_prefix_router(corpus, tmp_path / "clusters" / "assignments.parquet", centroids, embed,
                      lambda t: tokenizer(t, add_special_tokens=False)["input_ids"] if t else [], tokenizer.decode,
                      tmp_path / "router")
    router = PrefixRouter(tmp_path / "router", centroids, embed,
                          lambda t: tokenizer(t, add_special_tokens=False)["input_ids"], tokenizer.decode)
    held = pq.read_table(corpus, columns=["id", "text"], filters=[("split", "=", "heldout")]).to_pylist()
    own = squared_distances(embed([d["text"] for d in held]), centroids).argmin(1)  # each document's own cluster
    gains = []
    for n in (8, 16, 32):
        prefixes = [tokenizer.decode(tokenizer(d["text"], add_special_tokens=False)["input_ids"][:n]) for d in held]
        by_router = router.logits(router.vectors(prefixes), np.arange(8)).argmax(1)
        by_centroid = squared_distances(embed(prefixes), centroids).argmin(1)
        gains.append((by_router == own).mean() - (by_centroid == own).mean())
    print("gains", gains)
    assert np.mean(gains) >= 0.02, gains
