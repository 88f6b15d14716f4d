import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ensemble import Ensemble
from ground.errors import IncompatibleRunError

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


def hf_logprobs(ens, expert, ids):
    """log p(token_t | tokens before it) of one expert, straight from its HF model (no cbtm scoring code)."""
    model = ens.expert_model(expert)
    x = torch.tensor([[ens.tokenizer.eos_token_id, *ids]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
    return logp.gather(1, x[0, 1:, None])[:, 0].numpy()


def reference_weights(ens, ids, top_k):
    """Window weights [n_tokens, n_clusters] from first principles: the tokens before the first routing point by
    cluster size, each span after by softmax(-d^2/T) over the embedding of (at most 256) tokens before it (the
    centroid router), or by the router's own `route` of that context (the prefix router, which routes after 8
    and 16 tokens already, over every expert inside the first window), top-k renormalised."""
    window, temperature = ens.route_window, ens.route_temperature
    sizes = json.loads((ens.run.clusters_dir / "clusters.json").read_text())["clusters"]
    prior = np.array([c["size_train_balanced"] for c in sizes], float)
    w = np.zeros((len(ids), ens.n_clusters))
    w[:] = prior / prior.sum()
    centroids = np.load(ens.run.clusters_dir / "centroids.npy")
    starts = sorted({*(8, 16), *range(window, len(ids), window)}) if ens._view.router.kind == "prefix" else \
        list(range(window, len(ids), window))
    for start, end in zip(starts, [*starts[1:], len(ids)]):
        context = ens.tokenizer.decode(ids[max(0, start - 256):start])
        w[start:end] = 0
        if ens._view.router.kind == "prefix":
            for c, weight in ens.route(context, top_k=top_k if start >= window else ens.n_experts):
                w[start:end, c] = weight
            continue
        v = ens.embed([context])[0]
        logits = -((v[None] - centroids) ** 2).sum(1) / temperature
        keep = np.argsort(-logits, kind="stable")[:top_k]
        p = np.exp(logits[keep] - logits[keep].max())
        w[start:end, keep] = p / p.sum()
    return w


def test_a_cooking_prompt_goes_to_the_cooking_cluster(ens, built_run):
    routes = ens.route(COOKING, top_k=3)
    assert routes[0][0] == cluster_of_domain(built_run, "cooking")
    assert sum(w for _, w in routes) == pytest.approx(1.0)
    assert [w for _, w in routes] == sorted((w for _, w in routes), reverse=True)
    assert len(ens.route(COOKING)) == ens.top_k == 2  # route() defaults to the run's top_k
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
    cut = ens.generate("Bread dough", max_new_tokens=20, top_k=1, stop=[stop, "never-there"])
    assert cut == full[:full.index(stop)]


def test_only_the_routed_experts_are_loaded(built_run):
    fresh = Ensemble.load(built_run)
    fresh.generate(COOKING, max_new_tokens=3, top_k=1)
    assert sum(e["loaded"] for e in fresh.experts) == 1
    bounded = Ensemble.load(built_run, max_loaded_experts=1)
    bounded.perplexity([COOKING], top_k=3)
    assert sum(e["loaded"] for e in bounded.experts) == 1


@pytest.mark.parametrize("backend,router", [("stacked", "centroid"), ("sequential", "centroid"),
                                            ("stacked", "prefix")])
def test_scores_are_the_routed_mixture_of_the_experts_own_probabilities(built_run, backend, router):
    ens = Ensemble.load(built_run, backend=backend, router=router)
    text = "Knead the dough for ten minutes. " * 3 + "The striker scored a late goal in the league match."
    ids = ens.encode(text)
    assert len(ids) > 2 * ens.route_window
    per_expert = np.stack([hf_logprobs(ens, e, ids) for e in range(3)], axis=1)
    for top_k in (1, 2, 3):  # each token's routed weights reweighted by the experts' evidence before it
        weights = ens.evidence.reweigh(reference_weights(ens, ids, top_k), ens.evidence.scores(per_expert))
        expected = np.log((weights * np.exp(per_expert)).sum(1))
        np.testing.assert_allclose(ens.score(text, top_k=top_k)[0], expected, rtol=1e-5, atol=1e-6)
    assert ens.perplexity(text, top_k=3) == pytest.approx(float(np.exp(-expected.mean())), rel=1e-5)


def test_top1_after_the_first_window_is_the_routed_expert_alone(ens):
    text = "Preheat the oven and roast the vegetables with a little oil and salt. " * 4
    ids = ens.encode(text)
    window = ens.route_window
    got = ens.score(text, top_k=1)[0]
    expert = ens.route(ens.tokenizer.decode(ids[:window]), top_k=1)[0][0]
    np.testing.assert_allclose(got[window:2 * window], hf_logprobs(ens, expert, ids)[window:2 * window], rtol=1e-5)
    assert not np.allclose(got[:window], hf_logprobs(ens, expert, ids)[:window])  # first window: every expert


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


def test_missing_expert_files_are_named_at_load(built_run, tmp_path):
    copy = shutil.copytree(built_run, tmp_path / "copy")
    shutil.rmtree(copy / "experts" / "1")
    with pytest.raises(FileNotFoundError, match=r"expert 1 .*cbtm retrain .* --cluster 1"):
        Ensemble.load(copy)
