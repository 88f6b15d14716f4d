"""`cbtm serve` as clients see it: a real server on 127.0.0.1 and the real `openai` client."""
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from ensemble import Ensemble
from ensemble.server.app import ServeSettings, create_app

PROMPTS = ["Bread dough should rise", "The goalkeeper saved", "The telescope showed", "Knead the dough",
           "The striker scored", "Stars and galaxies", "Roast the vegetables", "The referee"]


class Server:
    """A uvicorn server in a thread on a free port of 127.0.0.1."""

    def __init__(self, ens, **settings):
        import uvicorn

        self.app = create_app(ens, ServeSettings("tiny", **settings))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key="unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def ens(built_run):
    return Ensemble.load(built_run)


@pytest.fixture(scope="module")
def server(ens):
    s = Server(ens, max_batch_size=16, max_prompt_tokens=40)
    yield s
    s.stop()


def complete(client, prompt, **kw):
    return client.completions.create(model="tiny", prompt=prompt, **{"max_tokens": 12, "temperature": 0, **kw})


def test_models_health_metrics_and_route(server, ens):
    models = server.client().models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert [e["cluster_id"] for e in models[0].model_extra["cbtm"]["experts"]] == [0, 1, 2]
    assert httpx.get(server.url + "/health").status_code == 200
    routed = httpx.post(server.url + "/v1/route", json={"input": "How long should bread dough rise?"}).json()
    assert [r["cluster_id"] for r in routed["data"][0]["routing"]] == [c for c, _ in ens.route(
        "How long should bread dough rise?")]
    text = httpx.get(server.url + "/metrics").text
    for name in ("cbtm_requests_total", "cbtm_queue_depth", "cbtm_expert_lanes", "cbtm_request_latency_seconds_bucket",
                 "cbtm_time_to_first_token_seconds_count", "cbtm_completion_tokens_total"):
        assert name in text


def test_a_greedy_completion_is_the_librarys_generation(server, ens):
    r = complete(server.client(), PROMPTS[0], max_tokens=16)
    assert r.choices[0].text == ens.generate(PROMPTS[0], max_new_tokens=16)
    assert r.usage.prompt_tokens == len(ens.encode(PROMPTS[0])) and r.usage.completion_tokens > 0
    served = r.model_extra["cbtm"]["choices"][0]["experts"]
    assert [(e["cluster_id"], pytest.approx(e["weight"], abs=1e-5)) for e in served] == ens.route(PROMPTS[0])
    r = complete(server.client(), PROMPTS[1], extra_body={"experts": [1], "top_k": 1})
    assert [e["cluster_id"] for e in r.model_extra["cbtm"]["choices"][0]["experts"]] == [1]
    assert r.choices[0].text == ens.generate(PROMPTS[1], max_new_tokens=12, experts=[1], top_k=1)
    r = complete(server.client(), PROMPTS[1], extra_body={"exclude_experts": [0, 1]})
    assert [e["cluster_id"] for e in r.model_extra["cbtm"]["choices"][0]["experts"]] == [2]


def test_the_joined_stream_is_the_completion(server):
    client = server.client()
    for prompt in PROMPTS[:3]:
        whole = complete(client, prompt, max_tokens=20, stop=[" the"]).choices[0].text
        chunks = list(complete(client, prompt, max_tokens=20, stop=[" the"], stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"prompt": PROMPTS[0], "max_tokens": 5, "stream": True}) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_chat_uses_the_plain_template_of_a_base_model(server, ens):
    r = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Bread?"}],
                                                max_tokens=8, temperature=0)
    assert r.choices[0].message.content == ens.generate("User: Bread?\n\nAssistant:", max_new_tokens=8)
    streamed = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Bread?"}],
                                                       max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == r.choices[0].message.content


def test_logprobs_are_those_of_the_chosen_tokens(server, ens):
    r = complete(server.client(), PROMPTS[2], max_tokens=6, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == len(lp.tokens)
    assert all(lp.token_logprobs[i] == pytest.approx(max(lp.top_logprobs[i].values())) for i in range(len(lp.tokens)))


ERRORS = [
    ({"prompt": " "}, 400, "prompt"), ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "bread " * 10, "max_tokens": 127}, 400, "context_length_exceeded"),
    ({"prompt": "bread " * 30}, 400, "prompt_too_long"), ({"prompt": "x", "experts": [7]}, 400, "experts"),
    ({"prompt": "x", "exclude_experts": [0, 1, 2]}, 400, "experts"), ({"prompt": "x", "top_k": 9}, 400, "top_k"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"), ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"), ({"prompt": "x", "logprobs": 9}, 400, "logprobs"),
    ({"prompt": "x", "n": 0}, 400, "n"), ({"prompt": "x", "route_temperature": 0}, 400, "route_temperature"),
    ({"prompt": "x", "max_tokens": "many"}, 422, "max_tokens"), ({"prompt": 5}, 422, "prompt"), ({}, 422, "prompt"),
    ({"prompt": "x", "model": "gpt-9"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,what", ERRORS, ids=[json.dumps(b)[:60] for b, _, _ in ERRORS])
def test_bad_requests_get_openais_error_format_never_a_500(server, body, status, what):
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert what in (error["param"], error["code"]), error


def test_invalid_json_is_a_400_and_the_openai_client_sees_it(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError, match="context"):
        complete(server.client(), "bread " * 10, max_tokens=127)


def test_max_tokens_may_fill_the_context_exactly_and_one_more_is_refused_with_the_room(server, ens):
    prompt = "bread " * 10
    n = len(ens.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    room = ens.max_positions - 1 - n  # one position holds the leading end-of-text token
    assert complete(server.client(), prompt, max_tokens=room).usage.prompt_tokens == n
    with pytest.raises(openai.BadRequestError) as info:
        complete(server.client(), prompt, max_tokens=room + 1)
    assert f"the prompt ({n} tokens, after one leading end-of-text token) leaves room for {room} new" in str(info.value)


def test_eight_concurrent_clients_get_what_each_gets_alone(server):
    client = server.client()
    alone = [complete(client, p, max_tokens=24).choices[0].text for p in PROMPTS]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: complete(server.client(), p, max_tokens=24).choices[0].text, PROMPTS))
    assert together == alone
    with ThreadPoolExecutor(8) as pool:  # streaming and plain requests mixed in one batch
        mixed = list(pool.map(lambda i: "".join(c.choices[0].text for c in complete(
            server.client(), PROMPTS[i], max_tokens=24, stream=True) if c.choices) if i % 2 else complete(
            server.client(), PROMPTS[i], max_tokens=24).choices[0].text, range(8)))
    assert mixed == alone


def test_a_request_joins_the_running_batch_and_a_client_that_leaves_frees_its_row(server):
    long = httpx.stream("POST", server.url + "/v1/completions",
                        json={"prompt": PROMPTS[0], "max_tokens": 80, "temperature": 0, "stream": True,
                              "experts": [0], "top_k": 1})
    response = long.__enter__()
    lines = response.iter_lines()
    next(line for line in lines if line.startswith("data: {"))  # the long request is decoding
    started = time.perf_counter()
    short = complete(server.client(), PROMPTS[3], max_tokens=3)  # joins at the next step, does not queue behind
    assert short.choices[0].text and time.perf_counter() - started < 30
    response.close()  # the client goes away mid-stream
    long.__exit__(None, None, None)
    deadline = time.time() + 10
    while time.time() < deadline and "cbtm_active_rows 0" not in httpx.get(server.url + "/metrics").text:
        time.sleep(0.1)
    assert "cbtm_active_rows 0" in httpx.get(server.url + "/metrics").text


def test_a_full_queue_answers_429_with_retry_after(ens):
    s = Server(ens, max_batch_size=1, max_queue=1)
    try:
        body = {"prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0, "experts": [0], "top_k": 1}
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda _: httpx.post(s.url + "/v1/completions", json=body, timeout=60), range(4)))
        assert 429 in [r.status_code for r in codes] and 200 in [r.status_code for r in codes]
        busy = next(r for r in codes if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"
    finally:
        s.stop()


def test_the_api_key_is_required_when_set(ens):
    s = Server(ens, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            complete(s.client("wrong"), "x")
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "x"}).status_code == 401
        assert complete(s.client("s3cret"), "x", max_tokens=2).choices[0].text is not None
        assert httpx.get(s.url + "/health").status_code == 200  # health needs no key
    finally:
        s.stop()


def test_reload_after_a_retrain_swaps_experts_while_requests_run(built_run, tmp_path, prefect_harness):
    from flows.pipeline import retrain

    run = shutil.copytree(built_run, tmp_path / "run")
    live = Ensemble.load(run)
    s = Server(live)
    try:
        body = {"prompt": PROMPTS[2], "max_tokens": 100, "temperature": 0.7, "seed": 3, "experts": [2], "top_k": 1}
        old = httpx.post(s.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        manifest = json.loads((run / "manifest.json").read_text())
        manifest["config"]["train"]["seed"] = 123
        (run / "manifest.json").write_text(json.dumps(manifest))
        retrain(str(run), [2])
        new = Ensemble.load(run).generate(PROMPTS[2], max_new_tokens=100, do_sample=True, temperature=0.7, seed=3,
                                          experts=[2], top_k=1)
        assert new != old  # the retrained expert samples another text
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as stream:
            lines = stream.iter_lines()
            pieces = [json.loads(next(line for line in lines if line.startswith("data: {"))[6:])]  # decoding now
            assert httpx.post(s.url + "/v1/reload").json()["changed_experts"] == [2]
            pieces += [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert "".join(p["choices"][0]["text"] for p in pieces) == old  # in flight: the weights it started with
        after = httpx.post(s.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert after == new  # requests after the reload: the retrained expert
    finally:
        s.stop()


def test_cbtm_serve_from_the_command_line(built_run, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), CBTM_API_KEY="k3y")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", str(built_run), "--port", str(port)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.ConnectError:
                time.sleep(0.3)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        assert complete(client, "Bread dough", max_tokens=4).choices[0].text is not None
        proc.send_signal(signal.SIGHUP)  # reload, keep serving
        time.sleep(0.5)
        assert complete(client, "Bread dough", max_tokens=4).choices[0].text is not None
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(15)
    assert "cbtm serve: http://127.0.0.1" in proc.stderr.read()
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "serve", str(tmp_path / "none")], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a cbtm run directory" in bad.stderr
