"""OpenAI's fields beyond the basics, as clients send them to a real `cbtm serve` on 127.0.0.1: token prompts,
``echo`` (the prompt scored), ``n`` with a seed, content parts, fields cbtm does not implement, the tokenizer
endpoints (lm-evaluation-harness's own ``local-completions`` model against a served run: test_harness.py)."""
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from ensemble import Ensemble
from tests.ensemble.test_server import PROMPTS, Server


@pytest.fixture(scope="module")
def ens(built_run):
    return Ensemble.load(built_run)


@pytest.fixture(scope="module")
def server(ens):
    s = Server(ens)
    yield s
    s.stop()


def post(server, body, path="/v1/completions"):
    return httpx.post(server.url + path, json={"model": "tiny", **body}, timeout=60)


def test_n_choices_with_a_seed_differ_from_each_other_and_repeat(server, ens):
    body = {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 1.0, "n": 3, "seed": 5}
    first = [c["text"] for c in post(server, body).json()["choices"]]
    assert len(set(first)) == 3, first  # each choice samples with seed + its index, not all with one seed
    assert [c["text"] for c in post(server, body).json()["choices"]] == first
    assert first[1] == ens.generate(PROMPTS[0], max_new_tokens=12, do_sample=True, temperature=1.0, seed=6)


def test_a_token_prompt_is_its_text(server, ens):
    ids = ens.encode(PROMPTS[1])
    text = post(server, {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0}).json()["choices"][0]["text"]
    eos = ens.tokenizer.eos_token_id
    r = post(server, {"prompt": [ids, [eos, *ids]], "max_tokens": 8, "temperature": 0}).json()
    assert [c["text"] for c in r["choices"]] == [text, text]  # a leading end-of-text token is the server's own
    assert r["usage"]["prompt_tokens"] == 2 * len(ids) + 1
    assert post(server, {"prompt": ids, "max_tokens": 8, "temperature": 0}).json()["choices"][0]["text"] == text
    bad = post(server, {"prompt": [ids[0], 10 ** 6], "max_tokens": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt", bad.text
    assert "vocabulary" in bad.json()["error"]["message"]


def test_echo_scores_the_prompt_as_the_ensemble_scores_text(server, ens):
    text = "Knead the dough until it is smooth, then let it rise in a warm place for an hour."
    r = post(server, {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 2}).json()
    choice, expected = r["choices"][0], ens.score(text)[0]
    block = choice["logprobs"]
    assert choice["text"] == text and "".join(block["tokens"]) == text and r["usage"]["completion_tokens"] == 0
    np.testing.assert_allclose(block["token_logprobs"], expected, rtol=2e-4, atol=2e-5)
    for chosen, top in zip(block["token_logprobs"], block["top_logprobs"]):
        assert len(top) <= 2 and chosen <= max(top.values())
    one = post(server, {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0, "top_k": 1,
                        "experts": [1]}).json()["choices"][0]["logprobs"]
    np.testing.assert_allclose(one["token_logprobs"], ens.score(text, top_k=1, experts=[1])[0], rtol=2e-4, atol=2e-5)
    assert one["top_logprobs"] is None

    plain = post(server, {"prompt": PROMPTS[2], "max_tokens": 5, "temperature": 0, "logprobs": 1}).json()["choices"][0]
    echoed = post(server, {"prompt": PROMPTS[2], "max_tokens": 5, "temperature": 0, "logprobs": 1,
                           "echo": True}).json()["choices"][0]
    n_prompt = len(ens.encode(PROMPTS[2]))
    assert echoed["text"] == PROMPTS[2] + plain["text"]
    assert echoed["logprobs"]["token_logprobs"][n_prompt:] == plain["logprobs"]["token_logprobs"]
    assert echoed["logprobs"]["text_offset"][n_prompt] == len(PROMPTS[2])


def test_an_echoed_token_prompt_leaves_its_first_token_unscored_as_openai_does(server, ens):
    ids = [ens.tokenizer.eos_token_id, *ens.encode(PROMPTS[3])]
    block = post(server, {"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1,
                          "temperature": 0}).json()["choices"][0]["logprobs"]
    assert len(block["token_logprobs"]) == len(ids) + 1 and block["token_logprobs"][0] is None
    np.testing.assert_allclose(block["token_logprobs"][1:-1], ens.score(PROMPTS[3])[0], rtol=2e-4, atol=2e-5)
    with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": PROMPTS[3], "max_tokens": 4,
                                                                   "echo": True, "stream": True}) as raw:
        chunks = [line for line in raw.iter_lines() if line.startswith("data: {")]
    assert PROMPTS[3] in chunks[0]  # the echoed prompt comes first


REFUSED = [({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": -1}, "frequency_penalty"),
           ({"logit_bias": {"5": 100}}, "logit_bias"), ({"best_of": 3}, "best_of"), ({"suffix": "end"}, "suffix")]


@pytest.mark.parametrize("extra,param", REFUSED, ids=[p for _, p in REFUSED])
def test_a_field_cbtm_does_not_implement_is_refused_not_ignored(server, extra, param):
    r = post(server, {"prompt": PROMPTS[0], "max_tokens": 2, **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert r.json()["error"]["code"] == "unsupported_parameter"


def test_default_values_of_those_fields_and_text_content_parts_are_accepted(server, ens):
    ok = post(server, {"prompt": PROMPTS[0], "max_tokens": 2, "presence_penalty": 0, "best_of": 1, "logit_bias": {}})
    assert ok.status_code == 200, ok.text
    client = server.client()
    parts = [{"type": "text", "text": "Bread?"}]
    as_parts = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}],
                                              max_tokens=6, temperature=0, response_format={"type": "text"})
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Bread?"}],
                                           max_tokens=6, temperature=0)
    assert as_parts.choices[0].message.content == plain.choices[0].message.content
    for bad, param in (({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
                       ({"response_format": {"type": "json_object"}}, "response_format")):
        r = post(server, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **bad},
                 "/v1/chat/completions")
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    r = post(server, {"messages": [{"role": "user", "content": image}], "max_tokens": 2}, "/v1/chat/completions")
    assert r.status_code == 400 and "text only" in r.json()["error"]["message"]


def test_models_retrieve_and_the_tokenizer_endpoints(server, ens):
    client = server.client()
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == ens.tokenizer.eos_token and info["model_max_length"] == ens.max_positions
    ids = httpx.post(server.url + "/tokenize", json={"prompt": PROMPTS[4]}).json()["tokens"]
    assert ids == ens.encode(PROMPTS[4])
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == PROMPTS[4]
    assert httpx.post(server.url + "/detokenize", json={"tokens": [-1]}).status_code == 400


def test_echo_scoring_beside_decoding_gives_what_each_gives_alone(server):
    """Scoring (a worker thread) and decoding (the scheduler's thread) share the experts: eight clients at once,
    half scoring and half generating, get what each gets alone."""
    def call(i):
        body = ({"prompt": PROMPTS[i], "max_tokens": 0, "echo": True, "logprobs": 1} if i % 2 else
                {"prompt": PROMPTS[i], "max_tokens": 16, "temperature": 0})
        choice = post(server, body).json()["choices"][0]
        return choice["logprobs"]["token_logprobs"] if i % 2 else choice["text"]

    alone = [call(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(call, range(8)))
    assert together == alone


def test_streamed_logprobs_are_the_whole_answers_in_pieces(server):
    """A streamed completion's chunks carry its logprobs with offsets into the whole text, and a streamed chat
    carries them too (OpenAI's logprobs.content per chunk)."""
    client, prompt = server.client(), PROMPTS[5]
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, logprobs=1)
    chunks = [c for c in client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                                   logprobs=1, stream=True) if c.choices and c.choices[0].logprobs]
    assert len(chunks) > 1
    for field in ("tokens", "token_logprobs", "text_offset"):
        streamed = [x for c in chunks for x in getattr(c.choices[0].logprobs, field)]
        assert streamed == getattr(whole.choices[0].logprobs, field), field
    messages = [{"role": "user", "content": "Bread?"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=2)
    streamed = [t for c in client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                          logprobs=True, top_logprobs=2, stream=True)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in plain.choices[0].logprobs.content]
    assert all(len(t.top_logprobs) == 2 for t in streamed)


def test_a_huge_prompt_is_refused_before_it_is_tokenized(server, ens, monkeypatch):
    """Tokenizing megabytes takes seconds in the event loop, where every stream waits: a prompt surely too long
    is a 400 at once, by its length; one that might fit is tokenized and judged by its tokens."""
    lengths, encode = [], ens.encode
    monkeypatch.setattr(ens, "encode", lambda text, **kw: lengths.append(len(text)) or encode(text, **kw))
    huge = "bread " * 200_000
    for path, body in (("/v1/completions", {"prompt": huge}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]}),
                       ("/v1/completions", {"prompt": [5] * 100_000})):
        r = post(server, {**body, "max_tokens": 1}, path)
        assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long", r.text
    assert lengths == []
    r = post(server, {"prompt": "bread " * 200, "max_tokens": 1})  # within the length bound, over the tokens
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long" and lengths == [1200]
