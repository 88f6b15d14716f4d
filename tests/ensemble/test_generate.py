import numpy as np
import pytest
import torch

from ensemble import Ensemble
from ensemble.generate import MixtureDecoder, pick_token
from ensemble.scoring import tune_temperature

PROMPTS = ["Bread dough should rise", "The goalkeeper saved", "The telescope showed"]


@pytest.fixture(scope="module")
def ens(built_run):
    return Ensemble.load(built_run)


def test_a_batch_equals_its_prompts_one_by_one(ens):
    batch = ens.generate(PROMPTS, max_new_tokens=10, top_k=2)
    assert batch == [ens.generate(p, max_new_tokens=10, top_k=2) for p in PROMPTS]


def test_a_batch_runs_each_expert_once_per_step_on_its_prompts(ens):
    ids, w = ens._route_arrays(PROMPTS, 2)
    eos = ens.tokenizer.eos_token_id
    seqs = [[eos, *ens.tokenizer(p, add_special_tokens=False)["input_ids"]] for p in PROMPTS]
    decoder = MixtureDecoder(ens, seqs, [dict(zip(map(int, i), map(float, ws))) for i, ws in zip(ids, w)])
    assert set(decoder.states) == {int(e) for e in ids.ravel()}
    for expert, state in decoder.states.items():
        assert state.rows == [r for r in range(3) if expert in ids[r]]
    probs = decoder.probs()
    torch.testing.assert_close(probs.sum(-1), torch.ones(3), rtol=0, atol=1e-5)
    # The mixture is the weighted sum of the experts' own next-token distributions.
    model = ens.expert_model(int(ids[0, 0]))
    with torch.no_grad():
        alone = torch.softmax(model(input_ids=torch.tensor([seqs[0]])).logits[0, -1], -1)
    other = decoder.states[int(ids[0, 1])]
    expected = w[0, 0] * alone + w[0, 1] * other.probs[other.rows.index(0)]
    torch.testing.assert_close(probs[0], expected.float(), rtol=1e-4, atol=1e-6)


def test_stream_yields_the_same_text_as_generate(ens):
    pieces = list(ens.stream(PROMPTS[0], max_new_tokens=12, top_k=2))
    assert len(pieces) > 1 and "".join(pieces) == ens.generate(PROMPTS[0], max_new_tokens=12, top_k=2)


def test_sampling_is_seeded(ens):
    a = ens.generate(PROMPTS[1], max_new_tokens=12, do_sample=True, top_p=0.9, temperature=0.8, seed=7)
    assert a == ens.generate(PROMPTS[1], max_new_tokens=12, do_sample=True, top_p=0.9, temperature=0.8, seed=7)


def test_top_p_keeps_the_nucleus_only():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    g = torch.Generator().manual_seed(0)
    draws = {pick_token(probs, True, 1.0, 0.6, g) for _ in range(200)}
    assert draws == {0, 1}
    assert pick_token(probs, False, 1.0, 1.0, None) == 0


def test_reroute_every_updates_weights_and_refills_entering_experts(ens):
    eos = ens.tokenizer.eos_token_id
    seq = [eos, *ens.tokenizer("The goalkeeper", add_special_tokens=False)["input_ids"]]
    decoder = MixtureDecoder(ens, [seq], [{0: 1.0}])
    decoder.advance([int(decoder.probs()[0].argmax())])
    decoder.reroute([{1: 0.5, 2: 0.5}])  # two experts enter: their caches come from the full context
    assert set(decoder.states) == {1, 2}
    with torch.no_grad():
        full = torch.softmax(ens.expert_model(1)(input_ids=torch.tensor([decoder.seqs[0]])).logits[0, -1], -1)
    torch.testing.assert_close(decoder.states[1].probs[0], full, rtol=1e-4, atol=1e-6)
    text = ens.generate(PROMPTS[2], max_new_tokens=12, reroute_every=3)
    assert isinstance(text, str)


def test_tune_temperature_scores_every_grid_point_and_top_k_all_is_flat_in_weights(ens):
    texts = ["Knead the dough and let it rise in a warm kitchen for an hour or two."] * 2
    result = tune_temperature(ens, texts, [0.03, 0.3, 3.0], top_k=2)
    assert [r["temperature"] for r in result["grid"]] == [0.03, 0.3, 3.0]
    assert result["best"] in (0.03, 0.3, 3.0)
    ppl = {r["temperature"]: r["perplexity"] for r in result["grid"]}
    ens.temperature, saved = 0.3, ens.temperature
    try:
        assert ens.perplexity(texts, top_k=2) == pytest.approx(ppl[0.3], rel=1e-9)
    finally:
        ens.temperature = saved
    assert np.isfinite(list(ppl.values())).all()


@pytest.mark.parametrize("kwargs", [dict(reroute_every=0), dict(do_sample=True, temperature=0),
                                    dict(do_sample=True, top_p=0)])
def test_bad_generation_arguments(ens, kwargs):
    with pytest.raises(ValueError):
        ens.generate("x", max_new_tokens=2, **kwargs)
