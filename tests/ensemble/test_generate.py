import numpy as np
import pytest
import torch

from ensemble import Ensemble
from ensemble.sampling import Sampling, pick_token
from flows.evaluate import tune_temperature

PROMPTS = ["Bread dough should rise", "The goalkeeper saved", "The telescope showed"]


@pytest.fixture(scope="module")
def ens(built_run):
    return Ensemble.load(built_run)


@pytest.fixture(scope="module")
def sequential(built_run):
    return Ensemble.load(built_run, backend="sequential")


def hf_next(ens, expert, ids):
    """The expert's own next-token distribution after ``ids`` (its HF model, no cache)."""
    with torch.no_grad():
        return torch.softmax(ens.expert_model(expert)(input_ids=torch.tensor([ids])).logits[0, -1], -1)


@pytest.mark.parametrize("backend", ["stacked", "sequential"])
def test_a_batch_equals_its_prompts_one_by_one(built_run, backend):
    e = Ensemble.load(built_run, backend=backend)
    batch = e.generate(PROMPTS, max_new_tokens=10, top_k=2)
    assert batch == [e.generate(p, max_new_tokens=10, top_k=2) for p in PROMPTS]


def test_the_stacked_backend_gives_the_sequential_engines_greedy_text(ens, sequential):
    assert ens.backend.name == "stacked" and sequential.backend.name == "sequential"
    for top_k in (1, 2, 3):
        for prompt in PROMPTS:
            assert ens.generate(prompt, max_new_tokens=24, top_k=top_k) == \
                sequential.generate(prompt, max_new_tokens=24, top_k=top_k)
    assert ens.generate(PROMPTS, max_new_tokens=12, reroute_every=3) == \
        sequential.generate(PROMPTS, max_new_tokens=12, reroute_every=3)


@pytest.mark.parametrize("backend", ["stacked", "sequential"])
def test_the_mixture_is_the_weighted_sum_of_the_experts_own_distributions(built_run, backend):
    e = Ensemble.load(built_run, backend=backend)
    decoding = e.engine.generate(PROMPTS, 2, Sampling(), e.route_spec(top_k=2))
    rows, steps = decoding.rows, iter(decoding)
    next(steps)  # one step: the rows' lane probabilities now follow their first generated token
    for row in rows:
        assert len(row.weights) == 2 and sum(row.weights.values()) == pytest.approx(1.0)
        expected = sum(w * hf_next(e, c, row.ids) for c, w in row.weights.items())
        torch.testing.assert_close(row.mixture(), expected.float(), rtol=1e-4, atol=1e-6)
    steps.close()
    assert all(r.finish == "cancelled" for r in rows)


def test_each_step_runs_one_backend_call_for_every_lane(ens, monkeypatch):
    calls = []
    lanes_cls = type(ens.backend.lanes())
    original = lanes_cls.step

    def spy(self, lanes, tokens):
        calls.append(len(lanes))
        return original(self, lanes, tokens)

    monkeypatch.setattr(lanes_cls, "step", spy)
    ens.generate(PROMPTS, max_new_tokens=6, top_k=2)
    assert calls and calls[0] == 6  # 3 prompts x 2 experts in one stacked call per step
    assert len(calls) <= 5  # 6 tokens: the first comes from the prefill, then one call per step


def test_stream_yields_the_same_text_as_generate(ens):
    pieces = list(ens.stream(PROMPTS[0], max_new_tokens=12, top_k=2))
    assert len(pieces) > 1 and "".join(pieces) == ens.generate(PROMPTS[0], max_new_tokens=12, top_k=2)


def test_sampling_is_seeded(ens):
    a = ens.generate(PROMPTS[1], max_new_tokens=12, do_sample=True, top_p=0.9, temperature=0.8, seed=7)
    assert a == ens.generate(PROMPTS[1], max_new_tokens=12, do_sample=True, top_p=0.9, temperature=0.8, seed=7)


def test_top_p_keeps_the_nucleus_only():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    g = torch.Generator().manual_seed(0)
    draws = {pick_token(probs, Sampling(True, 1.0, 0.6), g) for _ in range(200)}
    assert draws == {0, 1}
    assert pick_token(probs, Sampling(), None) == 0


@pytest.mark.parametrize("backend", ["stacked", "sequential"])
def test_rerouting_refills_entering_experts_from_the_whole_context(built_run, backend):
    e = Ensemble.load(built_run, backend=backend)
    lanes = e.backend.lanes()
    eos = e.tokenizer.eos_token_id
    seq = [eos, *e.encode("The goalkeeper")]
    (lane,), probs, _ = lanes.add([0], [seq])
    token = int(probs[0].argmax())
    later = lanes.step([lane], [token])
    (new,), entered, _ = lanes.add([1], [seq + [token]])  # an expert entering after one token
    torch.testing.assert_close(entered[0], hf_next(e, 1, seq + [token]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(later[0], hf_next(e, 0, seq + [token]), rtol=1e-4, atol=1e-6)
    lanes.remove([lane])
    torch.testing.assert_close(lanes.step([new], [5])[0], hf_next(e, 1, seq + [token, 5]), rtol=1e-4, atol=1e-6)
    lanes.close()
    assert isinstance(e.generate(PROMPTS[2], max_new_tokens=12, reroute_every=3), str)


def test_tuning_scores_each_temperature_like_scoring_at_that_temperature(built_run):
    ens = Ensemble.load(built_run, evidence_weight=0)  # the routing weights alone: uniform at a huge T
    texts = ["Knead the dough and let it rise in a warm kitchen for an hour or two. " * 2]
    result = tune_temperature(ens, texts, [0.03, 0.3, 1e6], top_k=3)
    ppl = {r["route_temperature"]: r["perplexity"] for r in result["grid"]}
    for t in (0.03, 0.3):
        assert ppl[t] == pytest.approx(ens.perplexity(texts, top_k=3, route_temperature=t), rel=1e-9)
    # A huge temperature mixes the three experts equally from the second window on.
    ids = ens.encode(texts[0])
    w = ens.route_window
    per = np.stack([ens.score(texts, top_k=1, experts=[c])[0] for c in range(3)], axis=1)
    uniform = np.logaddexp.reduce(per[w:] + np.log(1 / 3), axis=1)
    got = ens.score(texts, top_k=3, route_temperature=1e6)[0]
    np.testing.assert_allclose(got[w:], uniform, rtol=1e-4)
    assert len(got) == len(ids)
    assert result["best"] == min(ppl, key=ppl.get)


@pytest.mark.parametrize("kwargs", [dict(reroute_every=0), dict(do_sample=True, temperature=0),
                                    dict(do_sample=True, top_p=0), dict(temperature=float("nan")),
                                    dict(stop=""), dict(stop=["ok", 3]), dict(seed=-1), dict(max_new_tokens=1.5)])
def test_bad_generation_arguments(ens, kwargs):
    with pytest.raises(ValueError):
        ens.generate("x", **{"max_new_tokens": 2, **kwargs})
