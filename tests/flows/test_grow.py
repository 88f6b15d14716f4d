"""Growing a run without retraining it: `cbtm add` (new domains become new experts, old experts untouched),
`cbtm remove` / `cbtm restore`, and per-call `experts` / `exclude_experts`."""
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.grow import auto_min_size, choose_new_k, join_thresholds, place
from ensemble import Ensemble
from experts.budget import growth_steps
from experts.config import TrainConfig
from flows.cli import main
from flows.pipeline import build
from ground.rundir import RunDir
from tests.conftest import demo_records, tiny_config, write_jsonl
from tests.ensemble.test_server import Server

OLD = ("cooking", "astronomy", "football", "medicine")
NEW = ("law", "programming")


def snapshot(root: Path) -> dict:
    """path -> (inode, mtime_ns, bytes) of every file under root (but the writer lock, which every command takes)."""
    return {p.relative_to(root).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("grow")
    old = demo_records(24, OLD)
    new = demo_records(24, NEW) + old[:5]  # five documents the run already has
    return write_jsonl(root / "old.jsonl", old), write_jsonl(root / "new.jsonl", new)


@pytest.fixture(scope="module")
def grown(prefect_harness, corpora, tmp_path_factory):
    """A run built on 4 demo domains, its state before, and the same run after `cbtm add` of the other 2."""
    run_dir = tmp_path_factory.mktemp("grown") / "run"
    cfg = tiny_config(corpora[0], n_clusters=4).with_overrides(["embed.tfidf_dim=16"])
    build(cfg.to_dict(), str(run_dir))
    server = Server(Ensemble.load(run_dir))  # a live `cbtm serve` of the run as it was
    before = {"experts": snapshot(run_dir / "experts"), "manifest": RunDir(run_dir).read_manifest(),
              "centroids": np.load(run_dir / "clusters" / "centroids.npy"),
              "ensemble": Ensemble.load(run_dir), "server": server}
    assert main(["add", str(run_dir), "--corpus", str(corpora[1]), "--new-clusters", "2"]) == 0
    yield run_dir, before
    server.stop()


def test_add_makes_new_experts_and_leaves_the_old_ones_untouched(grown):
    run_dir, before = grown
    run = RunDir(run_dir)
    manifest = run.read_manifest()
    after = snapshot(run_dir / "experts")
    assert {k: v for k, v in after.items() if k.split("/")[0] in "0123"} == before["experts"]  # inode, mtime, bytes
    assert sorted(manifest.experts) == ["0", "1", "2", "3", "4", "5"] and manifest.n_clusters == 6
    centroids = np.load(run.centroids_path)
    assert centroids.shape[0] == 6 and np.array_equal(centroids[:4], before["centroids"])
    addition = manifest.additions[-1]
    assert addition["new_clusters"] == [4, 5] and addition["already_in_run"] == 5 and addition["documents"] == 48
    assert not manifest.jobs and not (run_dir / ".cbtm-add").exists() and run.done_path.exists()
    # The new experts branched from the run's seed (after its seed phase) with the run's steps per token.
    assert all(manifest.experts[c]["steps"] > 0 for c in ("4", "5"))
    docs = pq.read_table(run.corpus_path, columns=["id", "domain"]).to_pylist()
    assigned = pq.read_table(run.assignments_path).to_pylist()
    assert [d["id"] for d in docs] == [a["id"] for a in assigned] and len(docs) == 96 + 48
    new_domains = {d["id"]: d["domain"] for d in docs if d["domain"] in NEW}
    train_new = [a["train_cluster_id"] for a in assigned if a["id"] in new_domains and a["split"] == "train"]
    assert sum(c >= 4 for c in train_new) >= 0.9 * len(train_new)  # the new domains form the new clusters
    added_train = [a["train_cluster_id"] for a in assigned[96:] if a["split"] == "train"]
    assert addition["new_cluster_sizes"] == {str(c): added_train.count(c) for c in (4, 5)}  # training documents
    assert addition["joined"] == {str(c): added_train.count(c) for c in range(4) if c in added_train}
    assert "## Growth" in run.report_path.read_text() and "| 5 |" in run.report_path.read_text()
    assert json.loads((run.router_dir / "settings.json").read_text())["n_clusters"] == 6


def test_a_live_ensemble_sees_the_new_experts_after_reload(grown):
    run_dir, before = grown
    ens = before["ensemble"]
    law = next(r["text"] for r in demo_records(30, ("law",))[24:])  # a law document the run has never seen
    assert ens.n_experts == 4 and all(c < 4 for c, _ in ens.route(law, top_k=2))
    changed = ens.reload()
    assert sorted(changed) == [4, 5] and ens.n_experts == 6
    assert ens.route(law, top_k=1)[0][0] >= 4  # a prompt of a new domain routes to a new cluster
    cooking = next(r["text"] for r in demo_records(30, ("cooking",))[24:])
    assert ens.route(cooking, top_k=1)[0][0] < 4
    assert isinstance(ens.generate(law[:80], max_new_tokens=4), str)


def test_a_running_server_serves_the_new_experts_after_reload(grown):
    server = grown[1]["server"]
    experts = lambda: [e["cluster_id"] for e in server.client().models.list().data[0].model_extra["cbtm"]["experts"]]
    assert experts() == [0, 1, 2, 3]  # pinned at start, whatever the run directory now holds
    assert httpx.post(server.url + "/v1/reload").json()["changed_experts"] == [4, 5]
    assert experts() == [0, 1, 2, 3, 4, 5]
    law = next(r["text"] for r in demo_records(30, ("law",))[24:])
    r = server.client().completions.create(model="tiny", prompt=law[:80], max_tokens=4, temperature=0,
                                           extra_body={"top_k": 1})
    assert r.model_extra["cbtm"]["choices"][0]["experts"][0]["cluster_id"] >= 4


def test_remove_and_restore_change_routing_and_exclusions_work_per_call(grown, capsys):
    run_dir, _ = grown
    ens = Ensemble.load(run_dir)
    law = next(r["text"] for r in demo_records(30, ("law",))[24:])
    top = ens.route(law, top_k=1)[0][0]
    assert ens.route(law, top_k=1, exclude_experts=[top])[0][0] != top
    assert {c for c, _ in ens.route(law, top_k=2, experts=[0, top])} <= {0, top}
    snap = snapshot(run_dir / "experts")
    assert main(["remove", str(run_dir), "--cluster", str(top)]) == 0
    assert snapshot(run_dir / "experts") == snap  # files kept
    ens.reload()
    assert top not in [c for c, _ in ens.route(law, top_k=5)] and ens.n_experts == 5
    with pytest.raises(ValueError, match="removed"):
        ens.route(law, experts=[top])
    assert main(["remove", str(run_dir), "--cluster", str(top)]) == 2
    assert "already removed" in capsys.readouterr().err
    assert main(["restore", str(run_dir), "--cluster", str(top)]) == 0
    ens.reload()
    assert ens.route(law, top_k=1)[0][0] == top and RunDir(run_dir).read_manifest().removed == []


def test_remove_delete_then_retrain_then_restore(grown, tmp_path, capsys):
    run_dir = tmp_path / "copy"
    shutil.copytree(grown[0], run_dir)
    assert main(["remove", str(run_dir), "--cluster", "5", "--delete"]) == 0
    assert not (run_dir / "experts" / "5").exists()
    assert Ensemble.load(run_dir).n_experts == 5
    assert main(["restore", str(run_dir), "--cluster", "5"]) == 2
    assert "cbtm retrain" in capsys.readouterr().err
    assert main(["retrain", str(run_dir), "--cluster", "5"]) == 0
    assert main(["restore", str(run_dir), "--cluster", "5"]) == 0
    assert Ensemble.load(run_dir).n_experts == 6


@pytest.mark.parametrize("argv, match", [
    (["remove", "RUN", "--cluster", "9"], "do not exist"),
    (["restore", "RUN", "--cluster", "1"], "not removed"),
    (["remove", "RUN", *sum((["--cluster", str(c)] for c in range(6)), [])], "no expert to route to"),
    (["add", "RUN", "--corpus", "NOFILE"], "does not exist"),
    (["add", "RUN", "--corpus", "NOTEXT"], "text"),
    (["add", "RUN", "--corpus", "SAME"], "already in run"),
    (["add", "RUN", "--corpus", "NEW", "--new-clusters", "many"], "auto or a whole number"),
    (["add", "RUN", "--corpus", "NEW", "--join-percentile", "0"], "join-percentile"),
    (["add", "RUN", "--corpus", "NEW", "--new-clusters", "500"], "smaller --new-clusters"),
    (["run", "--corpus", "OLD", "--out", "RUN"], "grown by `cbtm add`"),
])
def test_bad_growth_input_exits_2_and_leaves_the_run_untouched(grown, corpora, argv, match, tmp_path, capsys):
    run_dir = grown[0]
    paths = {"RUN": str(run_dir), "NOFILE": str(tmp_path / "missing.jsonl"), "OLD": str(corpora[0]),
             "NOTEXT": str(write_jsonl(tmp_path / "x.jsonl", [{"body": "a document without the text field " * 3}])),
             "SAME": str(corpora[0]),
             "NEW": str(write_jsonl(tmp_path / "n.jsonl", [{"text": f"Completely new document number {i}, about "
                                                            f"gardening and roses and soil. " * 3} for i in range(8)]))}
    before = snapshot(run_dir)
    assert main([paths.get(a, a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert match in lines[-1] and lines[-1].startswith(f"cbtm {argv[0]}: error: ")  # one line says it all
    assert snapshot(run_dir) == before


def test_a_run_embedded_by_another_embedder_version_is_refused(grown, corpora, tmp_path, capsys):
    run_dir = tmp_path / "other"
    shutil.copytree(grown[0], run_dir)
    shard = run_dir / "embeddings" / "shard-00000.npy"
    vectors = np.load(shard)
    np.save(shard, vectors[:, ::-1].copy())  # another embedder: the same documents elsewhere in the space
    before = snapshot(run_dir)
    new = write_jsonl(tmp_path / "n.jsonl", [{"text": f"Roses need sun, water and rich soil; prune them in spring "
                                              f"(note {i})."} for i in range(8)])
    assert main(["add", str(run_dir), "--corpus", str(new)]) == 2
    assert "another embedder version" in capsys.readouterr().err and snapshot(run_dir) == before


def test_a_damaged_file_of_a_grown_run_is_named_without_the_rebuild_that_would_refuse(grown, tmp_path, capsys):
    run_dir = shutil.copytree(grown[0], tmp_path / "run")
    (run_dir / "clusters" / "clusters.json").write_text("xx{")
    assert main(["query", str(run_dir), "Roast the vegetables", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "clusters/clusters.json is damaged" in err and "restore it from a copy" in err, err
    assert main(["run", "--out", str(run_dir)]) == 2  # what the hint for an ungrown run would have said
    assert "was grown by `cbtm add`" in capsys.readouterr().err


def test_add_to_a_run_with_damaged_embedding_metadata_names_the_file_and_writes_nothing(grown, tmp_path, capsys):
    run_dir = shutil.copytree(grown[0], tmp_path / "run")
    (run_dir / "embeddings" / "meta.json").write_text('{"n_shards": 1, "dim":')  # cut short
    before = snapshot(run_dir)
    new = write_jsonl(tmp_path / "n.jsonl", [{"text": f"Roses need sun, water and rich soil; prune them in spring "
                                              f"(note {i})."} for i in range(8)])
    assert main(["add", str(run_dir), "--corpus", str(new)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    meta = run_dir / "embeddings" / "meta.json"
    assert err == f"cbtm add: error: {meta} is damaged: not valid JSON (JSONDecodeError)"
    assert snapshot(run_dir) == before


def test_placement_rules_are_pure_and_follow_the_percentile():
    rng = np.random.default_rng(0)
    distance = rng.random(200).astype(np.float32)
    cluster_id = np.repeat([0, 1], 100)
    train = np.ones(200, bool)
    t = join_thresholds(distance, cluster_id, train, 3, 95.0)
    assert t[0] == pytest.approx(np.percentile(distance[:100], 95)) and t[2] == -np.inf  # empty cluster: never
    d2 = np.array([[0.1, 0.5, 0.0], [2.0, 0.9, 0.0], [0.2, 0.1, 0.0]])
    nearest, joins = place(d2, t, np.array([True, True, False]))  # cluster 2 may not be joined
    assert nearest.tolist() == [0, 1, 1] and joins.tolist() == [True, d2[1, 1] <= t[1], True]


def test_auto_new_clusters_never_makes_clusters_far_smaller_than_the_runs():
    rng = np.random.default_rng(0)
    blobs = np.repeat(np.eye(16, 24, dtype=np.float32), 8, axis=0) + rng.normal(0, 0.01, (128, 24)).astype(np.float32)
    assert choose_new_k(blobs, None, seed=0, min_size=2) == 16  # 16 tight blobs: silhouette alone takes 16
    assert choose_new_k(blobs, None, seed=0, min_size=32) in (2, 4)  # the run's clusters hold ~64 documents
    assert choose_new_k(blobs[:40], None, seed=0, min_size=32) == 1  # too few for two such clusters
    assert choose_new_k(blobs[:20], None, seed=0, min_size=32) == 0  # too few for one: they join their nearest
    assert choose_new_k(blobs[:20], 1, seed=0, min_size=32) == 1  # unless asked for
    assignments = pa.table({"train_cluster_id": np.repeat([0, 1, 2], [60, 64, 80]).astype(np.int32)})
    assert auto_min_size(assignments, np.ones(204, bool), np.ones(3, bool)) == 32


def test_growth_steps_follow_the_runs_own_rate():
    train = TrainConfig(total_tokens=10_000, batch_size=2, block_size=8)
    steps = growth_steps(train, {0: 30, 1: 10}, {0: 3000, 1: 1000}, {0: 3600, 1: 1000, 2: 2000, 3: 4},
                         new_ids=[2, 3], continued=[0, 1])
    assert steps == {2: 20, 3: 0, 0: 6}  # 1 step per 100 tokens; too small to train; 600 tokens gained
    fixed = growth_steps(TrainConfig(steps=7, block_size=8), {0: 7, 1: 7}, {0: 50, 1: 60}, {2: 90}, [2], [])
    assert fixed == {2: 7}
    seeded = growth_steps(train, {0: 30, 1: 10}, {0: 3000, 1: 1000}, {0: 3600, 2: 2000}, [2], [0], seed_steps=40)
    assert seeded == {2: 40, 0: 6}  # the seed phase's share too (40 steps over 4,000 tokens); continued: own rate
    fixed = growth_steps(TrainConfig(steps=7, block_size=8), {0: 7, 1: 7}, {0: 50, 1: 60}, {2: 110}, [2], [], 11)
    assert fixed == {2: 18}
