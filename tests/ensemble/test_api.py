import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ensemble import Ensemble
from ensemble.rundir import IncompatibleRunError
from ensemble.scoring import WindowRouting, expert_logprobs

COOKING = "How long should bread dough rise before it goes into the oven?"


@pytest.fixture(scope="module")
def ens(built_run):
    return Ensemble.load(built_run)


def cluster_of_domain(run_dir, domain):
    """The cluster holding most training documents of ``domain``."""
    docs = pq.read_table(run_dir / "corpus" / "docs.parquet", columns=["id", "domain"]).to_pylist()
    assign = {r["id"]: r["cluster_id"] for r in pq.read_table(run_dir / "clusters" / "assignments.parquet").to_pylist()}
    counts = np.bincount([assign[d["id"]] for d in docs if d["domain"] == domain], minlength=3)
    return int(counts.argmax())


def test_a_cooking_prompt_goes_to_the_cooking_cluster(ens, built_run):
    routes = ens.route(COOKING)
    assert routes[0][0] == cluster_of_domain(built_run, "cooking")
    assert sum(w for _, w in routes) == pytest.approx(1.0)
    assert [w for _, w in routes] == sorted((w for _, w in routes), reverse=True)
    assert len(ens.route([COOKING, "The goalkeeper saved a penalty."], top_k=2)[1]) == 2


def test_generate_returns_text_and_is_deterministic_when_greedy(ens):
    a = ens.generate("Bread dough should rise", max_new_tokens=12, top_k=2)
    assert isinstance(a, str) and a == ens.generate("Bread dough should rise", max_new_tokens=12, top_k=2)
    batch = ens.generate(["Bread dough", "The telescope"], max_new_tokens=5, do_sample=True, seed=1)
    assert isinstance(batch, list) and len(batch) == 2
    assert ens.generate("Bread dough", max_new_tokens=0) == ""


def test_stop_strings_cut_the_completion(ens):
    full = ens.generate("Bread dough", max_new_tokens=20, top_k=1)
    assert len(full) >= 8
    stop = full[4:7]
    assert ens.generate("Bread dough", max_new_tokens=20, top_k=1, stop=[stop, "never-there"]) == full[:full.index(stop)]


def test_only_the_routed_experts_are_loaded(built_run):
    fresh = Ensemble.load(built_run)
    fresh.generate(COOKING, max_new_tokens=3, top_k=1)
    assert sum(e["loaded"] for e in fresh.experts) == 1
    bounded = Ensemble.load(built_run, max_loaded_experts=1)
    bounded.perplexity([COOKING], top_k=3)
    assert sum(e["loaded"] for e in bounded.experts) == 1


def test_all_experts_perplexity_is_the_dense_mixture(ens):
    text = "Knead the dough for ten minutes. " * 3 + "The striker scored a late goal in the league match."
    got = ens.score(text, top_k=3)[0]
    ids = ens.tokenizer(text, add_special_tokens=False)["input_ids"]
    weights = WindowRouting(ens, [ids]).matrices(3, ens.temperature)[0]
    per_expert = np.stack([expert_logprobs(ens.expert_model(e), [ens.tokenizer.eos_token_id, *ids],
                                           ens.max_positions, "cpu") for e in range(3)], axis=1)
    dense = np.log((weights * np.exp(per_expert)).sum(1))
    np.testing.assert_allclose(got, dense, rtol=1e-6)
    assert np.all(weights > 0)
    assert ens.perplexity(text, top_k=3) == pytest.approx(float(np.exp(-dense.mean())))


def test_top1_mixture_equals_that_expert_alone(ens):
    text = "Preheat the oven and roast the vegetables with a little oil and salt. " * 4
    ids = ens.tokenizer(text, add_special_tokens=False)["input_ids"]
    window = ens.route_window
    assert len(ids) > 2 * window
    got = ens.score(text, top_k=1)[0]
    context = ens.tokenizer.decode(ids[:window])  # what routes the second window
    expert = ens.route(context, top_k=1)[0][0]
    alone = expert_logprobs(ens.expert_model(expert), [ens.tokenizer.eos_token_id, *ids], ens.max_positions, "cpu")
    np.testing.assert_allclose(got[window:2 * window], alone[window:2 * window], rtol=1e-9)
    # The first window has no context: every expert scores it, weighted by cluster size.
    weights = WindowRouting(ens, [ids]).matrices(1, ens.temperature)[0]
    assert np.all(weights[:window] > 0) and np.count_nonzero(weights[window]) == 1
    with torch.no_grad():
        x = torch.tensor([[ens.tokenizer.eos_token_id, *ids]])
        loss = float(ens.expert_model(expert)(input_ids=x, labels=x).loss)
    assert np.exp(-alone.mean()) == pytest.approx(np.exp(loss), rel=1e-4)


@pytest.mark.parametrize("call", [
    lambda e: e.route(""), lambda e: e.generate("   "), lambda e: e.generate("x", top_k=0),
    lambda e: e.generate("x", top_k=4), lambda e: e.generate("x", max_new_tokens=-1),
    lambda e: e.perplexity([]), lambda e: e.route("x", top_k=9)])
def test_bad_calls_raise_value_error(ens, call):
    with pytest.raises(ValueError):
        call(ens)


def test_incomplete_or_foreign_run_directories_are_refused(built_run, tmp_path):
    with pytest.raises(IncompatibleRunError, match="not a cbtm run"):
        Ensemble.load(tmp_path)
    copy = shutil.copytree(built_run, tmp_path / "copy")
    (copy / "DONE").unlink()
    with pytest.raises(IncompatibleRunError, match="not finished"):
        Ensemble.load(copy)
    (copy / "DONE").write_text("x")
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(dict(manifest, schema_version=99)))
    with pytest.raises(IncompatibleRunError, match="schema version 99"):
        Ensemble.load(copy)


def test_missing_expert_files_raise_file_not_found(built_run, tmp_path):
    copy = shutil.copytree(built_run, tmp_path / "copy")
    ens = Ensemble.load(copy)
    cid = ens.route(COOKING)[0][0]
    shutil.rmtree(copy / "experts" / str(cid))
    with pytest.raises(FileNotFoundError, match="retrain"):
        ens.generate(COOKING, max_new_tokens=2, top_k=1)
