"""Evidence reweighting (`ensemble.evidence`): pure numpy properties, and the same weights in scoring and in
the decoding engine of both backends."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ensemble import Ensemble
from ensemble.evidence import EVIDENCE_TOKENS, Evidence
from ensemble.sampling import Sampling
from ensemble.scoring import mix, window_starts, window_weights

FLOOR = Path(__file__).resolve().parents[2] / "bench" / "topk_floor.py"

logps = arrays(np.float64, st.tuples(st.integers(1, 70), st.integers(1, 4)), elements=st.floats(-12, 0))


def brute_scores(lp: np.ndarray, decay: float) -> np.ndarray:
    """S[t, e] = sum over j = 1..EVIDENCE_TOKENS with t - j >= 0 of decay**(j - 1) * lp[t - j, e], one by one."""
    out = np.zeros_like(lp)
    for t in range(len(lp)):
        for j in range(1, EVIDENCE_TOKENS + 1):
            if t - j >= 0:
                out[t] += decay ** (j - 1) * lp[t - j]
    return out


@settings(max_examples=100, deadline=None)
@given(lp=logps, decay=st.floats(0, 1))
def test_scores_sum_the_decayed_log_probabilities_of_at_most_the_last_window_of_tokens(lp, decay):
    ev = Evidence(0.5, decay)
    s = ev.scores(lp)
    np.testing.assert_allclose(s, brute_scores(lp, decay), rtol=1e-9, atol=1e-9)
    for t in range(len(lp)):  # the incremental form the engine uses gives the same score
        for e in range(lp.shape[1]):
            assert ev.score_of(lp[:t, e].tolist()) == pytest.approx(s[t, e], rel=1e-9, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(lp=logps, data=st.data())
def test_a_tokens_weights_read_only_the_tokens_before_it(lp, data):
    ev = Evidence(0.7, 0.9)
    t = data.draw(st.integers(0, len(lp) - 1))
    changed = lp.copy()
    changed[t:] = data.draw(arrays(np.float64, changed[t:].shape, elements=st.floats(-12, 0)))
    np.testing.assert_array_equal(ev.scores(changed)[: t + 1], ev.scores(lp)[: t + 1])
    if t > EVIDENCE_TOKENS:  # and none from more than EVIDENCE_TOKENS back
        older = lp.copy()
        older[: t - EVIDENCE_TOKENS] -= 5.0
        np.testing.assert_array_equal(ev.scores(older)[t], ev.scores(lp)[t])


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 6), k=st.integers(1, 5), weight=st.floats(0, 3))
def test_reweighing_keeps_the_routed_set_and_favours_the_better_predictor(data, n, k, weight):
    # routed (>= 1e-6: no denormals, which any float product may round to 0) or not routed (0)
    raw = data.draw(arrays(np.float64, (n, k), elements=st.one_of(st.just(0.0), st.floats(1e-6, 1))))
    raw[:, 0] += 0.1  # every row routes to at least one expert
    w = raw / raw.sum(1, keepdims=True)
    scores = data.draw(arrays(np.float64, (n, k), elements=st.floats(-50, 0)))
    out = Evidence(weight).reweigh(w, scores)
    np.testing.assert_array_equal(out > 0, w > 0)  # evidence never adds nor drops an expert
    np.testing.assert_allclose(out.sum(1), 1.0, rtol=1e-9)
    ratio_in, ratio_out = w[:, :1] / np.maximum(w, 1e-300), out[:, :1] / np.maximum(out, 1e-300)
    better = (scores > scores[:, :1]) & (w > 0)
    assert np.all(ratio_out[better] <= ratio_in[better] * (1 + 1e-9))  # a better predictor gains on expert 0
    np.testing.assert_array_equal(Evidence(0.0).reweigh(w, scores), w)
    for i in range(n):  # the one-position form the engine uses (a one-token history scores its own log-prob)
        one = Evidence(weight).reweigh_one(dict(enumerate(w[i])), {e: [scores[i, e]] for e in range(k)})
        assert list(one) == list(range(k))
        np.testing.assert_allclose(list(one.values()), out[i], rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("kwargs", [dict(weight=-0.1), dict(decay=1.5), dict(weight=float("inf")),
                                    dict(decay=True)])
def test_bad_evidence_settings(kwargs):
    with pytest.raises(ValueError, match="evidence"):
        Evidence(**kwargs)


def load_floor():
    spec = importlib.util.spec_from_file_location("topk_floor", FLOOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n_tokens=st.integers(1, 90), n=st.integers(2, 6), window=st.integers(1, 40))
def test_the_benchs_best_choice_of_k_experts(data, n_tokens, n, window):
    """bench/topk_floor.py's floor: without evidence its choice is the router's own top-k (the scoring code's
    window weights); with evidence it keeps, at each routed token, the k experts the posterior weighs most."""
    best_choice = load_floor().best_choice
    k = data.draw(st.integers(1, n))
    starts = window_starts(n_tokens, window, (4,))
    owners = [(0, s, e) for s, e in zip(starts, [*starts[1:], n_tokens])]
    spans = [(s, e) for _, s, e in owners if s >= window]  # the early span at 4 keeps every expert, as routed
    # distinct logits (a tie may be broken either way by the router and by the bench)
    logits = data.draw(arrays(np.int64, (len(owners), n), elements=st.integers(-3000, 0), unique=True)) / 100 \
        if owners else None
    prior = (np.arange(n), np.full(n, 1.0 / n))
    weigh = lambda top: window_weights(  # noqa: E731
        [n_tokens], n, owners, logits, top, np.arange(n), prior, window)[0]
    every = weigh(n)
    lp = data.draw(arrays(np.float64, (n_tokens, n), elements=st.floats(-12, 0)))
    for per_token in (False, True):
        np.testing.assert_allclose(best_choice(every, lp, Evidence(0.0), k, spans, per_token), weigh(k), atol=1e-12)
        np.testing.assert_allclose(best_choice(every, lp, Evidence(0.5), n, spans, per_token), every, rtol=1e-12)
    ev = Evidence(0.5, 0.8)
    chosen = best_choice(every, lp, ev, k, spans, per_token=True)
    posterior = ev.reweigh(every, ev.scores(lp))
    np.testing.assert_allclose(chosen.sum(1), 1.0, rtol=1e-9)
    for t in range(n_tokens):
        kept = chosen[t] > 0
        if spans and t >= spans[0][0]:
            assert kept.sum() == k and posterior[t][kept].min() >= posterior[t][~kept].max(initial=0.0)
            np.testing.assert_allclose(chosen[t][kept], every[t][kept] / every[t][kept].sum(), rtol=1e-9)
        else:  # a text's first window keeps every expert
            np.testing.assert_allclose(chosen[t], every[t], rtol=1e-12)
    held = best_choice(every, lp, ev, k, spans)  # per window: the choice at its first token, to its end
    for s, e in spans:
        np.testing.assert_array_equal(held[s:e] > 0, np.broadcast_to(chosen[s] > 0, (e - s, n)))


def test_the_benchs_best_choice_per_window_holds_while_per_token_follows_the_evidence():
    best_choice = load_floor().best_choice
    every = np.tile([0.7, 0.3], (24, 1))  # the router prefers expert 0 throughout
    lp = np.tile([-1.0, -1.0], (24, 1))
    lp[10:, 0] = -6.0  # from token 10 on, expert 1 predicts far better
    spans = [(8, 16), (16, 24)]
    per_window, per_token = (best_choice(every, lp, Evidence(0.5), 1, spans, t) for t in (False, True))
    for chosen in (per_window, per_token):
        np.testing.assert_array_equal(chosen[:8], every[:8])  # the first window: every expert
        assert chosen[8, 0] == 1 and chosen[16, 1] == 1  # no evidence yet at 8; by 16, expert 1
    np.testing.assert_array_equal(per_window[8:16, 0], 1.0)  # held to the window's end
    assert per_token[12, 1] == 1  # switched inside the window


@pytest.fixture(scope="module")
def ens(built_run):
    return Ensemble.load(built_run)


TEXT = "Knead the dough and let it rise in a warm kitchen. The goalkeeper saved a penalty in the final minute."


def test_scoring_reweighs_each_token_by_the_experts_own_log_probabilities_before_it(ens, built_run):
    plain = Ensemble.load(built_run, evidence_weight=0)
    assert ens.evidence == Evidence(0.5, 0.8) and plain.evidence.weight == 0
    plan = ens.scoring([TEXT])
    weights = plan.weights(3, ens.route_temperature)
    per_text = plan.logprobs(weights)
    own = np.stack([per_text[0][e] for e in sorted(per_text[0])], axis=1)
    w = ens.evidence.reweigh(weights[0][:, sorted(per_text[0])], ens.evidence.scores(own))
    with np.errstate(divide="ignore"):
        expected = np.logaddexp.reduce(np.log(w) + own, axis=1)
    np.testing.assert_allclose(ens.score([TEXT], top_k=3)[0], expected, rtol=1e-9)
    np.testing.assert_allclose(plain.score([TEXT], top_k=3)[0], mix(weights, per_text)[0], rtol=1e-9)
    assert not np.allclose(expected, mix(weights, per_text)[0])  # the evidence moved the weights
    assert mix(weights, per_text, Evidence(0.0))[0].tolist() == mix(weights, per_text)[0].tolist()


@pytest.mark.parametrize("backend", ["stacked", "sequential"])
def test_generation_reweighs_its_experts_as_scoring_would_the_same_text(built_run, backend):
    """At every step a row's weights are its routing reweighted by each expert's log-probabilities of the
    row's tokens so far (the prompt's from the prefill, then each new token's), as `Evidence.scores` gives
    them for the whole sequence scored afresh by the backend."""
    e = Ensemble.load(built_run, backend=backend)
    spec = e.route_spec(top_k=2, route_temperature=1e3)  # soft routing: room for the evidence to move it
    decoding = e.engine.generate(["Bread dough should rise in a warm"], 6, Sampling(), spec)
    row, seen = decoding.rows[0], []
    for _ in decoding:
        if row.finish is None:
            seen.append((list(row.ids), dict(row.weights)))
    assert seen and len(row.routing) == 2
    for ids, weights in seen:
        experts = list(row.routing)
        own = np.stack(e.backend.logprobs([(c, ids) for c in experts]), axis=1)  # predicting ids[1:]
        scores = spec.evidence.scores(np.vstack([own, np.zeros((1, len(experts)))]))[-1]  # the next token's
        expected = spec.evidence.reweigh(np.array([[row.routing[c] for c in experts]]), scores[None])[0]
        np.testing.assert_allclose([weights[c] for c in experts], expected, rtol=2e-3)
        assert abs(weights[experts[0]] - row.routing[experts[0]]) > 1e-3  # evidence moved them
