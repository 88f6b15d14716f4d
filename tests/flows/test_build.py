"""End-to-end: the real `build` and `retrain` flows under Prefect's test harness, and the CLI."""
import json
import shlex
import shutil

import numpy as np
import pytest

from cluster.corpus import read_documents
from ensemble import Ensemble
from experts.budget import expert_budget
from flows.baselines import spent_tokens
from flows.cli import main
from flows.commands import print_summary
from flows.pipeline import build, retrain, summarize
from ground.errors import UserInputError
from ground.files import file_sha256, hash_path
from ground.rundir import RunDir
from tests.conftest import tiny_config, write_jsonl

EXPECTED_FILES = {
    "DONE", "manifest.json", "config.toml", "report.md", "corpus/docs.parquet", "corpus/ingest.json",
    "embeddings/meta.json", "embeddings/embedder.json", "embeddings/shard-00000.npy",
    "embeddings/shard-00000.ids.json", "embeddings/tfidf/settings.json", "embeddings/tfidf/vocabulary.json",
    "embeddings/tfidf/idf.npy", "embeddings/tfidf/components.npy",
    "router/settings.json", "router/coef.npy", "router/intercept.npy", "router/ngram_data.npy",
    "router/ngram_indices.npy", "router/ngram_indptr.npy",
    "clusters/centroids.npy", "clusters/assignments.parquet", "clusters/clusters.json",
    "plots/cluster_sizes.png", "plots/cluster_map.png", "plots/cluster_labels.png", "plots/loss_curves.png",
    "plots/temperature.png", "eval/temperature.json",
    "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
    "seed/config.json", "seed/generation_config.json", "seed/model.safetensors", "seed/tokenizer.json",
    "seed/tokenizer_config.json",
    *(f"pretrained/{name}" for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                        "tokenizer_config.json", "metrics.jsonl", "expert.json", "loss.png")),
    *(f"experts/{i}/{name}" for i in range(3) for name in (
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "metrics.jsonl", "expert.json", "loss.png")),
}


def files(root):
    """Every file of the run directory but the hidden ones (token cache, writer lock)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and not p.relative_to(root).as_posix().startswith(".")}


def expert_mtimes(run_dir):
    return {p.relative_to(run_dir).as_posix(): p.stat().st_mtime_ns for p in (run_dir / "experts").rglob("*")}


def test_build_writes_the_run_directory_contract(built_run):
    assert files(built_run) == EXPECTED_FILES
    manifest = json.loads((built_run / "manifest.json").read_text())
    assert manifest["format"] == "cbtm-run" and manifest["schema_version"] == 2
    assert set(manifest["stages"]) == {"ingest", "embed", "cluster", "tokenizer", "seed", "pretrain", "router",
                                       "train", "assemble", "tune"}
    assert {k: v["path"] for k, v in manifest["experts"].items()} == {str(i): f"experts/{i}" for i in range(3)}
    assert manifest["embedder"] == "all-MiniLM-L6-v2"
    tuned = json.loads((built_run / "eval" / "temperature.json").read_text())["best"]  # see test_tuning
    assert manifest["routing"] == {"route_temperature": {"value": tuned, "source": "auto"},
                                   "top_k": {"value": 2, "source": "config"}}
    assert {"torch", "transformers", "prefect"} <= set(manifest["versions"])
    for cid, entry in manifest["experts"].items():
        assert hash_path(built_run / entry["path"]) == entry["hash"]
        assert set(entry["files"]) == {"config.json", "generation_config.json", "model.safetensors"}
        weights = built_run / entry["path"] / "model.safetensors"
        assert entry["files"]["model.safetensors"] == {"size": weights.stat().st_size, "sha256": file_sha256(weights)}
    report = (built_run / "report.md").read_text()
    assert "plots/cluster_sizes.png" in report and "| 2 |" in report
    assert "## Prefix router" in report and "| centroid routing |" in report
    gate = json.loads((built_run / "router" / "settings.json").read_text())["gate"]
    assert len(gate) == 6 and all(0 <= g <= 1 for g in gate) and "| centroid share (the gate) |" in report
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(built_run / "experts" / "0").config.vocab_size > 0


def test_rerun_skips_everything_and_a_deleted_expert_is_retrained_alone(built_run, slice_corpus, tmp_path):
    run_dir = shutil.copytree(built_run, tmp_path / "run")
    before = expert_mtimes(run_dir)
    build(tiny_config(slice_corpus).to_dict(), str(run_dir))
    assert expert_mtimes(run_dir) == before  # nothing retrained
    shutil.rmtree(run_dir / "experts" / "1")
    build(tiny_config(slice_corpus).to_dict(), str(run_dir))
    after = expert_mtimes(run_dir)
    assert {k: v for k, v in after.items() if not k.startswith("experts/1")} == \
           {k: v for k, v in before.items() if not k.startswith("experts/1")}
    assert (run_dir / "experts" / "1" / "model.safetensors").exists() and (run_dir / "DONE").exists()


def test_a_changed_training_config_retrains_experts_but_keeps_clusters(built_run, slice_corpus, tmp_path):
    run_dir = shutil.copytree(built_run, tmp_path / "run")
    clusters_before = hash_path(run_dir / "clusters")
    cfg = tiny_config(slice_corpus).with_overrides(["train.steps=10"])
    build(cfg.to_dict(), str(run_dir), until="train")
    assert hash_path(run_dir / "clusters") == clusters_before
    manifest = RunDir(run_dir).read_manifest()
    assert all(e["steps"] == expert_budget(cfg.train, cfg.seed_tokens(), 3).steps for e in manifest.experts.values())


def test_rebuilding_with_fewer_clusters_forgets_the_earlier_experts_and_removals(built_run, slice_corpus, tmp_path,
                                                                               capsys):
    run_dir = shutil.copytree(built_run, tmp_path / "run")
    assert main(["remove", str(run_dir), "--cluster", "1", "--delete"]) == 0
    cfg = tiny_config(slice_corpus, n_clusters=2)
    build(cfg.to_dict(), str(run_dir), until="cluster")
    err = capsys.readouterr().err
    # New clusters under old experts are not a finished run; expert 2 has no cluster any more, and removal 1
    # named a cluster of the earlier clustering: under the new one, 1 is an expert to train like any other.
    manifest = RunDir(run_dir).read_manifest()
    assert not (run_dir / "DONE").exists() and sorted(manifest.experts) == ["0"] and manifest.removed == []
    assert not (run_dir / "experts" / "2").exists() and (run_dir / "experts" / "0").exists()
    assert "expert(s) 2 of the earlier clustering deleted" in err and "expert(s) 1 were removed" in err
    with pytest.raises(UserInputError, match="is not finished"):
        Ensemble.load(run_dir)
    build(cfg.to_dict(), str(run_dir))
    manifest = RunDir(run_dir).read_manifest()
    assert sorted(manifest.experts) == ["0", "1"] and Ensemble.load(run_dir).n_experts == 2
    assert (run_dir / "experts" / "1" / "model.safetensors").exists()
    # What the baselines are given: this build's two experts, not the earlier third one too.
    assert spent_tokens(manifest, cfg) == 2 * expert_budget(cfg.train, cfg.seed_tokens(), 2).steps * 128
    assert sorted(summarize(RunDir(run_dir))["experts"]) == ["0", "1"]


def test_an_expert_removed_with_delete_stays_deleted_through_a_rebuild_and_eval_scores_the_rest(
        built_run, slice_corpus, tmp_path):
    run_dir = shutil.copytree(built_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval", "baselines"))
    assert main(["remove", str(run_dir), "--cluster", "1", "--delete"]) == 0
    build(tiny_config(slice_corpus).to_dict(), str(run_dir))  # not a way round the opt-out: nothing retrained
    assert not (run_dir / "experts" / "1").exists() and (run_dir / "DONE").exists()
    assert main(["eval", str(run_dir), "--limit", "2"]) == 0  # refused before: "no trained expert for [1]"
    systems = json.loads((run_dir / "eval" / "results.json").read_text())["systems"]
    assert {"expert 0 alone", "expert 2 alone"} <= set(systems) and "expert 1 alone" not in systems


def _final_lr(model_dir):
    """The learning rate of a model's last step: min_lr_ratio x its peak (cosine decay ends there)."""
    return json.loads((model_dir / "metrics.jsonl").read_text().splitlines()[-1])["lr"]


def test_the_branch_lr_ratio_retrains_experts_and_baselines_at_their_peak_lr_but_not_the_seed_phase(
        built_run, slice_corpus, tmp_path):
    from flows.baselines import plan_baseline

    run_dir = shutil.copytree(built_run, tmp_path / "run")
    before = expert_mtimes(run_dir)
    pretrained = (run_dir / "pretrained" / "model.safetensors").stat()
    cfg = tiny_config(slice_corpus).with_overrides(["train.branch_lr_ratio=0.25"])
    build(cfg.to_dict(), str(run_dir))
    after = (run_dir / "pretrained" / "model.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (pretrained.st_ino, pretrained.st_mtime_ns)  # seed phase kept
    assert all(after_t != before[k] for k, after_t in expert_mtimes(run_dir).items() if k.endswith(".safetensors"))
    end = cfg.train.min_lr_ratio * cfg.train.lr
    assert _final_lr(run_dir / "pretrained") == pytest.approx(end)
    assert all(_final_lr(built_run / "experts" / str(i)) == pytest.approx(end) for i in range(3))  # ratio 1
    assert all(_final_lr(run_dir / "experts" / str(i)) == pytest.approx(0.25 * end) for i in range(3))
    lr = cfg.train.lr
    assert plan_baseline(RunDir(run_dir), "dense").train.lr == pytest.approx(0.25 * lr)  # like for like
    unchanged = shutil.copytree(built_run, tmp_path / "unchanged")  # a plan writes the baseline's directory
    assert plan_baseline(RunDir(unchanged), "dense").train.lr == lr


def test_retrain_replaces_one_expert_and_leaves_the_others_untouched(built_run, tmp_path):
    run_dir = shutil.copytree(built_run, tmp_path / "run")
    ens = Ensemble.load(run_dir)
    old_text = ens.generate("Bread dough", max_new_tokens=8, top_k=1)
    before = expert_mtimes(run_dir)
    config = json.loads((run_dir / "manifest.json").read_text())["config"]
    cfg = dict(config, train=dict(config["train"], seed=123))  # a different seed makes a different expert
    (run_dir / "manifest.json").write_text(json.dumps(dict(json.loads((run_dir / "manifest.json").read_text()),
                                                           config=cfg)))
    retrain(str(run_dir), [2])
    after = expert_mtimes(run_dir)
    assert {k: v for k, v in after.items() if not k.startswith("experts/2")} == \
           {k: v for k, v in before.items() if not k.startswith("experts/2")}
    assert after["experts/2/model.safetensors"] != before["experts/2/model.safetensors"]
    assert ens.generate("Bread dough", max_new_tokens=8, top_k=1) == old_text  # old files until reload
    manifest = RunDir(run_dir).read_manifest()
    assert manifest.experts["2"]["hash"] == hash_path(run_dir / "experts" / "2")
    assert ens.reload() == [2]
    text = "The telescope showed a faint galaxy beyond the stars."
    assert not np.allclose(ens.score(text, experts=[2], top_k=1)[0],
                           Ensemble.load(built_run).score(text, experts=[2], top_k=1)[0])


def test_the_closing_summary_suggests_a_query_from_the_users_own_corpus(built_run, capsys, tmp_path):
    run = RunDir(built_run)
    first = read_documents(run.corpus_path, split="heldout", columns=["text"]).column("text")[0].as_py()
    spaced = tmp_path / "a run dir"  # the suggestion must survive a path with spaces, as typed in a shell
    spaced.symlink_to(built_run)
    print_summary({**summarize(run), "run_dir": str(spaced)})
    line = [t for t in capsys.readouterr().out.splitlines() if t.startswith("Try:")][0]
    argv = shlex.split(line.removeprefix("Try:"))
    assert argv[:3] == ["cbtm", "query", str(spaced)] and argv[3] == " ".join(first.split()[:5])
    assert main([*argv[1:], "--max-new-tokens", "3"]) == 0 and "Completion:" in capsys.readouterr().out


def test_the_summary_of_an_unfinished_run_says_how_to_finish_it_not_how_to_query_it(built_run, capsys, tmp_path):
    run_dir = shutil.copytree(built_run, tmp_path / "run")
    (run_dir / "DONE").unlink()  # as after `cbtm run --until cluster`, or a re-clustering before its experts
    print_summary(summarize(RunDir(run_dir)))
    out = capsys.readouterr().out
    assert "Experts (held-out loss, nats/token; recorded so far):" in out and "Try:" not in out
    assert f"Unfinished: `cbtm run --out {run_dir}` carries on from here (its config.toml)" in out


def test_cli_query_and_eval_on_a_built_run(built_run, capsys):
    assert main(["query", str(built_run), "Bread dough should rise", "--top-k", "2", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("weight") == 2 and "Completion:" in out
    ens, prompt = Ensemble.load(built_run), "Bread dough should rise"
    routed = ens.route(prompt, top_k=1)[0][0]
    assert main(["query", str(built_run), prompt, "--top-k", "1", "--max-new-tokens", "12", "--exclude-experts",
                 str(routed), "--stop", "e"]) == 0  # one query opting one expert out
    out = capsys.readouterr().out
    other = ens.route(prompt, top_k=1, exclude_experts=[routed])[0][0]
    assert f"cluster {other:>3}  weight 1.000" in out and f"cluster {routed:>3}" not in out
    assert out.rstrip("\n").endswith(prompt + ens.generate(prompt, 12, top_k=1, exclude_experts=[routed], stop=["e"]))
    assert main(["eval", str(built_run), "--limit", "6"]) == 0
    results = json.loads((built_run / "eval" / "results.json").read_text())
    assert {"top-1", "top-2", "all experts", *(f"expert {i} alone" for i in range(3))} == set(results["systems"])
    assert (built_run / "plots" / "perplexity.png").exists()
    assert "## Held-out perplexity" in (built_run / "report.md").read_text()
    assert results["systems"]["top-1"]["perplexity"] > 1


@pytest.mark.parametrize("argv,match", [
    (["run", "--corpus", "/no/such/file"], "does not exist"),
    (["run", "--clusters", "0"], "--clusters must be >= 1"),
    (["run", "--set", "train.nope=1"], "unknown key"),
    (["run", "--runner", "warp"], "unknown runner"),
    (["query", "/no/run", "hi"], "not a cbtm run directory"),
])
def test_cli_bad_input_exits_2_with_one_line(argv, match, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", ["no_text_field", "too_many_clusters", "empty", "too_many_after_cleaning"])
def test_cli_bad_corpus_exits_2_and_leaves_no_run(prefect_harness, tmp_path, capsys, case):
    corpus = tmp_path / "c.jsonl"
    docs = [{"text": "long enough document text number %d" % (i % 5)} for i in range(60)]
    if case == "no_text_field":
        write_jsonl(corpus, [{"body": d["text"]} for d in docs])
    elif case == "too_many_clusters":
        write_jsonl(corpus, docs[:5])
    elif case == "too_many_after_cleaning":
        write_jsonl(corpus, docs)  # 60 rows, 5 distinct: fails inside the flow, after deduplication
    else:
        corpus.write_text("")
    out = tmp_path / "run"
    assert main(["run", "--corpus", str(corpus), "--clusters", "50", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert [line for line in err if "error" in line] == [err[-1]]
    expected = {"no_text_field": "no text field 'text'; its fields are body", "too_many_clusters": "50 clusters",
                "empty": "empty", "too_many_after_cleaning": "only 5 training documents"}[case]
    assert expected in err[-1]
    if case != "too_many_after_cleaning":
        assert len(err) == 1  # failed before any work started
    assert not out.exists()


def test_cli_choose_k_prints_scores_and_writes_the_plot(built_run, tmp_path, capsys):
    run_dir = shutil.copytree(built_run, tmp_path / "run")
    assert main(["clusters", "choose-k", str(run_dir), "--k", "2,3,4"]) == 0
    out = capsys.readouterr().out
    result = json.loads((run_dir / "choose_k" / "choose_k.json").read_text())
    assert [r["k"] for r in result["results"]] == [2, 3, 4]
    silhouettes = {r["k"]: r["silhouette"] for r in result["results"]}
    assert result["best_k"] == max(silhouettes, key=silhouettes.get) == 3  # the slice has three domains
    best_line = next(line for line in out.splitlines() if "<- best" in line)
    assert best_line.split()[0] == "3" and f"{silhouettes[3]:.4f}" in best_line
    assert (run_dir / "choose_k" / "choose_k.png").stat().st_size > 0
    assert "largest candidate" not in out  # 3 of 2, 3, 4 is inside the grid
    assert main(["clusters", "choose-k", str(run_dir), "--k", "2,3"]) == 0
    assert "Note: the best silhouette is at k=3, the largest candidate" in capsys.readouterr().out
    assert main(["clusters", "choose-k", str(run_dir), "--k", "2,999"]) == 2


def test_auto_k_at_the_largest_candidate_is_called_out(prefect_harness, slice_corpus, tmp_path, capsys):
    out = tmp_path / "auto"
    argv = ["run", "--corpus", str(slice_corpus), "--out", str(out), "--until", "cluster"]
    assert main(argv + ["--set", "cluster.auto_k=[2, 3]"]) == 0  # the slice's 3 domains: 3 is the best
    err = capsys.readouterr().err
    assert RunDir(out).read_manifest().config["cluster"]["n_clusters"] == 3
    assert "the best silhouette is at k=3, the largest candidate" in err
