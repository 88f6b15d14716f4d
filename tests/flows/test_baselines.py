"""`cbtm eval --baselines`: dense and random-cluster runs trained by the same code at the same token budget."""
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from ensemble import Ensemble
from ensemble.prefix_router import VERSION as ROUTER_VERSION
from flows.baselines import parse_baselines, plan_baseline, plan_derived
from flows.cli import main
from flows.pipeline import retrain
from flows.report import budget_words, dense_gain
from flows.tuning import tuning_texts
from ground.errors import UserInputError
from ground.rundir import RunDir
from tests.conftest import write_jsonl
from tests.trust.conftest import snapshot


@pytest.fixture
def run_copy(built_run, tmp_path):
    """A private copy of the session's built run (evaluation writes into it)."""
    return shutil.copytree(built_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval", "baselines"))


def train_sizes(run: RunDir) -> list[int]:
    table = pq.read_table(run.clusters_dir / "assignments.parquet", columns=["split", "train_cluster_id"])
    train = np.array(table.column("split").to_pylist()) == "train"
    return np.bincount(table.column("train_cluster_id").to_numpy()[train]).tolist()


def steps(run: RunDir) -> int:
    return sum(e["steps"] for e in run.read_manifest().experts.values())


@pytest.fixture
def baselined_copy(baselined_run, tmp_path):
    """A private copy of the session's run whose dense and random baselines are trained, and that eval's stdout."""
    run, out = baselined_run
    return shutil.copytree(run, tmp_path / "baselined"), out


def test_eval_with_baselines_at_the_same_budget_is_reported_and_then_cached(baselined_copy, capsys):
    run_copy, out = baselined_copy  # after `cbtm eval RUN --baselines dense,random --limit 4`
    results = json.loads((run_copy / "eval" / "results.json").read_text())
    assert {"dense", "random top-1", "random top-2", "random all experts", "top-1"} <= set(results["systems"])
    parent, dense, rand = RunDir(run_copy), RunDir(run_copy / "baselines/dense"), RunDir(run_copy / "baselines/random")
    # Same total budget: 3 x 30 steps, of which the shared seed phase took 67 (seed.pretrain_share 0.75); the
    # rest, 3 x 8 steps for the parent's experts, all to the dense model, split by size over random clusters.
    seed_steps = json.loads((run_copy / "pretrained" / "expert.json").read_text())["steps"]
    assert seed_steps == 67 and steps(parent) == steps(dense) == steps(rand) == 24
    assert list(dense.read_manifest().experts) == ["0"] and dense.read_manifest().experts["0"]["steps"] == 24
    assert train_sizes(rand) == train_sizes(parent)
    assert results["baselines"]["dense"]["budget_tokens"] == 24 * 4 * 32 and "Baseline dense" in out
    # The line counts the shared seed phase too: the baseline's total is the ensemble's, not only its branch part.
    assert results["baselines"]["dense"]["seed_tokens"] == seed_steps * 4 * 32
    assert f"{24 * 128:,} training tokens after the shared seed phase of {67 * 128:,} ({91 * 128:,} in all)" in out
    ours = min(r["perplexity"] for n, r in results["systems"].items() if n in ("top-1", "top-2", "all experts"))
    gain = 100 * (ours - results["systems"]["dense"]["perplexity"]) / results["systems"]["dense"]["perplexity"]
    assert f"vs dense {results['systems']['dense']['perplexity']:.2f}: {gain:+.1f}% perplexity" in out
    # The run's own top_k (what query and serve mix) is compared with dense too, unless it is the best already.
    assert results["default_top_k"] == Ensemble.load(run_copy).top_k == 2
    top2 = results["systems"]["top-2"]["perplexity"]
    assert ("the run's top-2, which query and serve use" in out) == (f"{ours:.2f}" != f"{top2:.2f}")
    # Every system is reported on the parent's clusters, with token counts that match across systems.
    assert set(results["systems"]["dense"]["per_cluster"]) <= {"0", "1", "2"}
    assert results["systems"]["dense"]["tokens"] == results["systems"]["top-1"]["tokens"]
    assert (run_copy / "plots" / "perplexity_per_cluster.png").stat().st_size > 0
    report = (run_copy / "report.md").read_text()
    assert "Baselines trained by the same code" in report and "| dense |" in report and "vs dense" in report
    assert Ensemble.load(run_copy / "baselines" / "random").n_experts == 3  # a complete, loadable run
    # Each system at its own best temperature: the random baseline is tuned on the parent's held-out text.
    own = json.loads(rand.temperature_path.read_text())
    assert "tune" in rand.read_manifest().stages and own["n_docs"] == len(tuning_texts(parent.corpus_path, 200))
    assert rand.read_manifest().routing["route_temperature"] == {"value": own["best"], "source": "auto"}
    before = snapshot(run_copy, ("baselines/dense/experts", "baselines/random/experts"))
    assert main(["eval", str(run_copy), "--baselines", "random,dense", "--limit", "4"]) == 0
    err = capsys.readouterr().err
    assert "baseline dense 0 expert(s) to train, 1 up to date" in err
    assert before and snapshot(run_copy, ("baselines/dense/experts", "baselines/random/experts")) == before


def test_a_baseline_retrains_only_its_deleted_expert(baselined_copy):
    trained, _ = baselined_copy
    assert plan_baseline(RunDir(trained), "random").todo == []
    shutil.rmtree(trained / "baselines" / "random" / "experts" / "1")
    assert plan_baseline(RunDir(trained), "random").todo == [1]


def test_an_older_router_of_a_baseline_is_refitted_and_dense_gets_a_trivial_one(baselined_copy):
    run_copy, _ = baselined_copy
    settings = plan_baseline(RunDir(run_copy), "random").run.router_dir / "settings.json"
    info = json.loads(settings.read_text())
    assert info["version"] == ROUTER_VERSION and info["n_clusters"] == 3
    settings.write_text(json.dumps({**info, "version": 1}))  # as an older cbtm left it
    inode = settings.stat().st_ino
    plan_baseline(RunDir(run_copy), "random")
    assert json.loads(settings.read_text())["version"] == ROUTER_VERSION and settings.stat().st_ino != inode
    dense = json.loads((plan_baseline(RunDir(run_copy), "dense").run.router_dir / "settings.json").read_text())
    assert dense["trivial"] and dense["n_features"] == 0


def test_eval_of_a_run_with_untrained_experts_names_them_and_evaluates_nothing(run_copy, capsys):
    shutil.rmtree(run_copy / "experts" / "1")
    assert main(["eval", str(run_copy), "--baselines", "dense"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no trained expert for cluster(s) [1]" in err[0] and "nothing was evaluated" in err[0]
    assert not (run_copy / "eval").exists() and not (run_copy / "baselines").exists()


def test_eval_corpus_without_the_runs_text_field_is_one_clear_line(run_copy, tmp_path, capsys):
    other = write_jsonl(tmp_path / "other.jsonl", [{"body": "A text under another field name.", "id": "1"}])
    assert main(["eval", str(run_copy), "--corpus", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no field 'text'" in err[0] and "--text-field" in err[0]
    assert not (run_copy / "eval").exists()


@pytest.mark.parametrize("argv,match", [(["--baselines", "dense,moe"], "unknown baseline 'moe'"),
                                        (["--limit", "0"], "--limit must be >= 1")])
def test_eval_bad_options_exit_2(run_copy, argv, match, capsys):
    assert main(["eval", str(run_copy), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


def test_a_budget_too_small_for_a_baseline_is_one_clear_error(run_copy, tmp_path):
    from cluster.fixed import fixed_clusters

    parent = RunDir(run_copy)
    labels = np.arange(sum(train_sizes(parent))) % 3
    with pytest.raises(UserInputError, match="baseline random: train.total_tokens=100 is less than one step") as e:
        plan_derived(parent, tmp_path / "b", "baseline random", {"k": 3}, 3,
                     lambda out: fixed_clusters(parent.corpus_path, parent.embeddings_dir, labels, 3, out), 100)
    assert "\n" not in str(e.value) and not (tmp_path / "b").exists()  # refused before anything was written


def test_parse_baselines_keeps_order_and_drops_repeats():
    assert parse_baselines("random, dense,random") == ["random", "dense"]
    assert parse_baselines(None) == [] and parse_baselines("") == []


def test_budget_words_count_the_seed_phase_when_the_results_know_it():
    assert budget_words({"budget_tokens": 3072, "seed_tokens": 8576}) == (
        "3,072 training tokens after the shared seed phase of 8,576 (11,648 in all)")
    assert budget_words({"budget_tokens": 3072, "seed_tokens": 0}) == "3,072 training tokens in all"
    assert budget_words({"budget_tokens": 3072}) == "3,072 training tokens besides any shared seed phase"


def test_dense_gain_also_judges_the_top_k_the_run_serves():
    def results(top2: float, default_top_k: int | None = 2) -> dict:
        systems = {"top-1": {"top_k": 1, "perplexity": 170.0}, "top-2": {"top_k": 2, "perplexity": top2},
                   "all experts": {"top_k": 8, "perplexity": 120.0},
                   "expert 0 alone": {"expert": 0, "perplexity": 90.0},
                   "dense": {"top_k": 1, "perplexity": 137.5, "baseline": "dense"}}
        return {"systems": systems, "default_top_k": default_top_k}

    worse = dense_gain(results(144.5))
    assert worse.startswith("Best ensemble (all experts) 120.00 vs dense 137.50: -12.7% perplexity (better than dense")
    assert worse.endswith("; the run's top-2, which query and serve use, 144.50: +5.1% (worse than dense: pass a "
                          "larger --top-k or build fewer clusters)")
    assert dense_gain(results(137.0)).endswith("top-2, which query and serve use, 137.00: -0.4% (better than dense)")
    # Nothing to add when the served system is the best one, or when the results predate default_top_k.
    assert "query and serve" not in dense_gain(results(110.0))
    assert "query and serve" not in dense_gain(results(120.0))  # a tie with the best: nothing to add
    assert "query and serve" not in dense_gain(results(120.004))  # a tie as printed (120.00) too
    assert "which query and serve use, 120.01: " in dense_gain(results(120.006))
    assert "query and serve" not in dense_gain(results(144.5, default_top_k=None))
    assert dense_gain({"systems": results(144.5)["systems"] | {"dense": {"top_k": 1, "perplexity": 1.0}}}) is None


def test_dense_gain_when_every_system_loses_advises_tokens_not_a_larger_top_k():
    systems = {"top-1": {"top_k": 1, "perplexity": 373.72}, "top-2": {"top_k": 2, "perplexity": 354.40},
               "all experts": {"top_k": 6, "perplexity": 347.34},
               "dense": {"top_k": 1, "perplexity": 337.68, "baseline": "dense"}}  # Brown, default budget
    line = dense_gain({"systems": systems, "default_top_k": 2})
    assert line == ("Best ensemble (all experts) 347.34 vs dense 337.68: +2.9% perplexity (worse than dense at the "
                    "same total tokens: train on more tokens (--set train.total_tokens=N) or build fewer clusters); "
                    "the run's top-2, which query and serve use, 354.40: +5.0% (worse than dense)")


def test_the_report_flags_evaluation_figures_of_an_earlier_state_of_the_run(baselined_copy):
    run, _ = baselined_copy
    flag = "These figures are of an earlier state of this run"
    assert flag not in (run / "report.md").read_text()
    retrain(str(run), [0], from_current=True)  # other expert files under the same figures
    report = (run / "report.md").read_text()
    assert flag in report.split("## Held-out perplexity")[1] and f"Run `cbtm eval {run}` again" in report
    assert main(["eval", str(run), "--limit", "2"]) == 0
    assert flag not in (run / "report.md").read_text()
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["scored_state"] == RunDir(run).read_manifest().scored_state()
