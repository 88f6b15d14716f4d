"""The ensemble as an lm-evaluation-harness model: the real harness on offline tasks built from the demo corpus."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra (pip install -e '.[eval]')")

from ensemble import Ensemble  # noqa: E402
from ensemble.harness import CbtmLM  # noqa: E402
from flows.cli import main  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

TASKS = ("cbtm_demo_topic", "cbtm_demo_continuation", "cbtm_demo_rolling")
GENERATE_TASK = """task: short_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{data}"
test_split: test
output_type: generate_until
doc_to_text: "{{{{text}}}}"
doc_to_target: ""
generation_kwargs:
  until: ["."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """cbtm's three offline tasks over the demo corpus, written by the real builder script, and two short ones."""
    out = tmp_path_factory.mktemp("tasks")
    subprocess.run([sys.executable, str(ROOT / "bench" / "harness_data.py"), "--out", str(out), "--corpora", "",
                    "--source", f"demo={ROOT / 'data' / 'demo' / 'corpus.jsonl'}:domain", "--docs", "12",
                    "--shots", "10"], check=True, capture_output=True)
    _write_short_tasks(out)
    return out


def _write_short_tasks(out: Path) -> None:
    """Two more tasks in ``out``: short_rolling (a sentence of each of the first 3 rolling documents) and
    short_generate (their first 6 words, continued to the next "."), for lm-eval against a server."""
    docs = [json.loads(line)["text"] for line in (out / "demo_rolling.test.jsonl").read_text().splitlines()]
    texts = [doc.split(". ")[0] + "." for doc in docs[:3]]
    (out / "short.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    yaml = (out / "cbtm_demo_rolling.yaml").read_text().replace("task: cbtm_demo_rolling", "task: short_rolling")
    (out / "short.yaml").write_text(yaml.replace(str(out / "demo_rolling.test.jsonl"), str(out / "short.jsonl")))
    starts = [" ".join(t.split()[:6]) for t in texts]
    (out / "starts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in starts))
    (out / "generate.yaml").write_text(GENERATE_TASK.format(data=out / "starts.jsonl"))


@pytest.fixture(scope="module")
def manager(task_dir):
    """lm-eval's task index over ``task_dir``: the one `cbtm eval --tasks --include-path task_dir` builds and caches
    (indexing lm-eval's built-in tasks takes seconds), so the CLI tests below reuse it."""
    from flows.harness_eval import check_tasks

    return check_tasks([*TASKS, "short_rolling", "short_generate"], str(task_dir))


@pytest.fixture(scope="module")
def ens(built_run):
    return Ensemble.load(built_run)


class Request:
    def __init__(self, *args):
        self.args = args


def test_the_adapter_is_registered_and_runs_multiple_choice_tasks(ens, manager):
    from lm_eval.api.registry import get_model

    assert get_model("cbtm") is CbtmLM
    out = lm_eval.simple_evaluate(model=CbtmLM(ensemble=ens, top_k=2), tasks=list(TASKS[:2]), num_fewshot=1,
                                  limit=4, task_manager=manager, log_samples=False, bootstrap_iters=0)
    for task in TASKS[:2]:
        assert 0.0 <= out["results"][task]["acc,none"] <= 1.0 and out["n-shot"][task] == 1


def test_rolling_loglikelihood_is_the_cbtm_eval_score(built_run, ens, task_dir, manager):
    out = lm_eval.simple_evaluate(model="cbtm", model_args=f"run={built_run},top_k=1", tasks=[TASKS[2]], limit=3,
                                  task_manager=manager, log_samples=False, bootstrap_iters=0)
    texts = [json.loads(line)["text"] for line in (task_dir / "demo_rolling.test.jsonl").read_text().splitlines()[:3]]
    total = sum(float(np.sum(lp)) for lp in ens.score(texts, top_k=1))
    words = sum(len(t.split()) for t in texts)
    assert out["results"][TASKS[2]]["word_perplexity,none"] == pytest.approx(np.exp(-total / words), rel=1e-9)
    lm = CbtmLM(ensemble=ens, top_k=2)
    assert lm.loglikelihood_rolling([Request(t) for t in texts]) == pytest.approx(
        [float(np.sum(lp)) for lp in ens.score(texts, top_k=2)], rel=1e-12)


def test_loglikelihood_mixes_the_context_routed_experts_and_knows_greedy(ens):
    import torch

    lm = CbtmLM(ensemble=ens, top_k=2)
    context = "Knead the dough until it is smooth, then let it rise"
    greedy = ens.generate(context, max_new_tokens=4, top_k=2)
    (ll, is_greedy), (ll_other, other_greedy) = lm.loglikelihood([Request(context, greedy),
                                                                  Request(context, " zebra quantum")])
    assert is_greedy and not other_greedy and ll > ll_other
    # The same number from the Hugging Face experts directly: weights from routing the context alone.
    ctx, cont = ens.encode(context), ens.encode(context + greedy)[len(ens.encode(context)):]
    ids = torch.tensor([[ens.tokenizer.eos_token_id, *ctx, *cont]])
    mixed = 0
    for cid, w in ens.route(context, top_k=2):
        with torch.inference_mode():
            probs = torch.softmax(ens.expert_model(cid)(input_ids=ids).logits[0].float(), dim=-1)
        mixed = mixed + w * probs[len(ctx):len(ctx) + len(cont)]
    expected = float(torch.log(mixed[torch.arange(len(cont)), torch.tensor(cont)]).sum())
    assert ll == pytest.approx(expected, abs=1e-4)


def test_generate_until_is_the_ensembles_greedy_text_cut_at_the_stop(ens):
    lm = CbtmLM(ensemble=ens, top_k=1)
    prompt = "The goalkeeper"
    full = ens.generate(prompt, max_new_tokens=12, top_k=1)
    stop = full[3:5] if len(full) > 5 else "\n"
    out = lm.generate_until([Request(prompt, {"until": [stop], "max_gen_toks": 12, "do_sample": False})])[0]
    assert out == full.split(stop)[0]


def test_cli_eval_tasks_scores_every_system_and_the_baselines(baselined_run, task_dir, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    shutil.copytree(baselined_run[0], run)  # its baselines trained, as after `cbtm eval --baselines dense,random`
    argv = ["eval", str(run), "--tasks", "cbtm_demo_topic,cbtm_demo_rolling", "--include-path", str(task_dir),
            "--limit", "3", "--num-fewshot", "1", "--baselines", "dense,random"]
    assert main(argv) == 0
    result = json.loads((run / "eval" / "harness.json").read_text())
    assert list(result["systems"]) == ["top-1", "top-2", "all experts", "dense", "random top-1", "random top-2",
                                       "random all experts"]
    for system in result["systems"].values():
        assert 0 <= system["results"]["cbtm_demo_topic"]["acc,none"] <= 1
        assert system["results"]["cbtm_demo_rolling"]["word_perplexity,none"] > 1
    assert result["systems"]["dense"]["run"].endswith("baselines/dense")
    report = (run / "report.md").read_text()
    assert "## lm-evaluation-harness" in report and (run / "plots" / "harness.png").stat().st_size > 1000
    assert "| dense |" in capsys.readouterr().out
    # Nothing of lm-eval's reaches the root logger's handlers (Prefect's console): its "Overwriting default
    # num_fewshot" warnings were printed for each system and task.
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval")]


@pytest.mark.parametrize("extra, match", [
    (["--tasks", "no_such_task"], "knows no task 'no_such_task'"),
    (["--tasks", ""], "--tasks is empty"),
    (["--tasks", "cbtm_demo_topic", "--num-fewshot", "-1"], "--num-fewshot must be >= 0"),
    (["--tasks", "cbtm_demo_topic", "--include-path", "/nonexistent"], "not a directory"),
])
def test_cli_bad_task_input_exits_2(built_run, task_dir, extra, match, capsys):
    argv = ["eval", str(built_run), *extra]
    if "--include-path" not in extra:
        argv += ["--include-path", str(task_dir)]
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_without_the_eval_extra_tasks_exit_2_saying_how_to_install(built_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    assert main(["eval", str(built_run), "--tasks", "cbtm_demo_topic"]) == 2
    assert "pip install -e '.[eval]'" in capsys.readouterr().err


def test_lm_evals_local_completions_model_scores_the_served_ensemble_as_cbtm_eval_does(ens, task_dir, manager):
    """lm-eval's own OpenAI-API model against a real `cbtm serve`: it finds the server's tokenizer endpoints, sends
    token prompts with echo and logprobs, and its rolling log-likelihoods are those of `Ensemble.score` (on texts
    that fit one window: a longer one lm-eval cuts into windows that the server routes apart); its generations
    are `Ensemble.generate`'s."""
    import lm_eval.models.openai_completions  # noqa: F401  (registers local-completions)

    from tests.ensemble.test_server import Server

    texts = [json.loads(line)["text"] for line in (task_dir / "short.jsonl").read_text().splitlines()]
    starts = [json.loads(line)["text"] for line in (task_dir / "starts.jsonl").read_text().splitlines()]
    assert all(len(ens.encode(t)) < ens.max_positions - 2 for t in texts)  # each fits one window
    server = Server(ens)
    try:
        args = f"base_url={server.url}/v1/completions,model=tiny,max_length={ens.max_positions - 1},batch_size=8"
        out = lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                      tasks=["short_rolling", TASKS[0], "short_generate"], limit=3, num_fewshot=0,
                                      task_manager=manager, log_samples=True, bootstrap_iters=0)
    finally:
        server.stop()
    served = {s["doc"]["text"]: s["resps"][0][0] for s in out["samples"]["short_rolling"]}
    assert [served[t] for t in texts] == pytest.approx([float(np.sum(lp)) for lp in ens.score(texts)], rel=1e-4)
    for sample in out["samples"][TASKS[0]]:
        for (loglik, greedy), in sample["resps"]:
            assert np.isfinite(loglik) and loglik < 0 and isinstance(greedy, bool)
    assert 0 <= out["results"][TASKS[0]]["acc,none"] <= 1
    generated = {s["doc"]["text"]: s["resps"][0][0] for s in out["samples"]["short_generate"]}
    assert [generated[t] for t in starts] == [ens.generate(t, max_new_tokens=12, stop=["."]) for t in starts]
    assert any(generated.values())
