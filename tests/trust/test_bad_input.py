"""Every bad input is one clear line: exit code 2 from the CLI (no traceback, no run directory left behind,
an existing run untouched), or a ValueError from the API."""
import gzip
import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from ensemble import Ensemble
from flows.cli import main
from ground.files import clean_stale_temporaries
from tests.conftest import ROOT, write_jsonl
from tests.trust.conftest import snapshot

DOCS = [{"text": f"a long enough document about bread and ovens, number {i}"} for i in range(40)]


@pytest.fixture(scope="module")
def victim(built_run, tmp_path_factory):
    """A finished run that bad commands must leave exactly as it is (checked after every case)."""
    return shutil.copytree(built_run, tmp_path_factory.mktemp("victim") / "run",
                           ignore=shutil.ignore_patterns("eval", "baselines"))


def corpus_files(tmp):
    files = {"docs": write_jsonl(tmp / "docs.jsonl", DOCS), "unknown": tmp / "docs.xyz",
             "empty": tmp / "empty.jsonl", "undecodable": tmp / "bad.jsonl",
             "nofield": write_jsonl(tmp / "body.jsonl", [{"body": "x" * 40}] * 5),
             "few": write_jsonl(tmp / "few.jsonl", DOCS[:5]), "gz": tmp / "cut.jsonl.gz",
             "parquet": tmp / "fake.parquet", "file": tmp / "a-file", "userdir": tmp / "mine"}
    files["unknown"].write_text("text")
    files["empty"].write_text("")
    files["undecodable"].write_bytes(b'{"text": "\xff\xfe long enough but not UTF-8 at all"}\n')
    data = gzip.compress("".join(json.dumps(d) + "\n" for d in DOCS).encode())
    files["gz"].write_bytes(data[: len(data) // 2])
    files["parquet"].write_text("not parquet")
    files["file"].write_text("a file")
    files["userdir"].mkdir()
    (files["userdir"] / "notes.txt").write_text("my notes")
    (files["userdir"] / ".draft.tmp").write_text("keep me")
    return files


RUN_CASES = [
    (["--corpus", "/no/such/file"], "does not exist"),
    (["--corpus", "{unknown}"], "unknown format"),
    (["--corpus", "{empty}"], "is empty"),
    (["--corpus", "{undecodable}"], "empty after cleaning"),
    (["--corpus", "{nofield}"], "no text field 'text'; its fields are body"),
    (["--corpus", "{few}", "--clusters", "50"], "50 clusters"),
    (["--corpus", "{gz}"], "truncated or damaged"),
    (["--corpus", "{parquet}"], "not a readable Parquet file"),
    (["--corpus", "hf:no-such-owner/no-such-dataset"], "cannot load hub dataset"),
    (["--clusters", "0"], "--clusters must be >= 1"),
    (["--clusters", "many"], "must be a whole number or auto"),
    (["--set", "train.nope=1"], "unknown key"),
    (["--set", "train.steps=abc"], "train.steps must be a whole number, got 'abc'"),
    (["--set", "train.steps=1.5"], "train.steps must be a whole number, got 1.5"),
    (["--set", "train.lr=nan"], "train.lr must be a finite number"),
    (["--set", "train.device=tpu"], "unknown train.device 'tpu'"),
    (["--set", "train.device=cuda"], "CUDA is not available"),
    (["--set", "embed.device=cuda:0"], "CUDA is not available"),
    (["--set", "ensemble.route_temperature=nan"], "ensemble.route_temperature must be a finite number"),
    (["--set", "ensemble.temperature=0.1"], "now called route_temperature"),
    (["--set", "corpus.heldout_fraction=nan"], "corpus.heldout_fraction must be a finite number"),
    (["--set", "cluster.auto_k=[2, 0]"], "cluster.auto_k must list candidate k >= 2"),
    (["--runner", "warp"], "unknown runner"),
    (["--runner", "dask=127.0.0.1:9"], "unreachable"),
    (["--config", "/no/such.toml"], "does not exist"),
    (["--out", "{file}"], "is a file, not a directory"),
    (["--out", "{userdir}"], "non-empty directory that is not a cbtm run"),
]


@pytest.mark.parametrize("argv,match", RUN_CASES, ids=[" ".join(a) for a, _ in RUN_CASES])
def test_cbtm_run_bad_input(argv, match, tmp_path, capsys, prefect_harness, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = corpus_files(tmp_path)
    argv = [a.format(**files) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "new")]
    before = snapshot(files["userdir"]) | {".draft.tmp": (files["userdir"] / ".draft.tmp").read_text()}
    assert main(["run", *argv, *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    if argv[-1].startswith("hf:"):  # what the wait is: offline, the hub's retries take half a minute
        assert err.pop(0) == f"corpus: loading {argv[-1]} from the Hugging Face hub (or its local cache)"
    assert len(err) == 1 and "Traceback" not in err[0] and match in err[0], err
    assert not (tmp_path / "new").exists() and not (tmp_path / "runs").exists()
    assert snapshot(files["userdir"]) | {".draft.tmp": (files["userdir"] / ".draft.tmp").read_text()} == before


def test_waiting_for_an_unreachable_hub_shows_one_line_not_the_hubs_retries(cli_env, tmp_path):
    """Offline, huggingface_hub retries for half a minute; its warnings were a dozen lines, each twice. (The
    one-line error at the end: `test_cbtm_run_bad_input`.)"""
    env = {k: v for k, v in cli_env.items() if not k.endswith("_OFFLINE")}  # as a user's shell: it tries the hub
    spec = "hf:no-such-owner/no-such-dataset"
    args = ["run", "--corpus", spec, "--out", str(tmp_path / "new")]
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline() == f"corpus: loading {spec} from the Hugging Face hub (or its local cache)\n"
        time.sleep(4)  # the hub's first three tries, each warned of, at about 0, 1 and 3 s
    finally:
        proc.kill()
    assert [line for line in proc.stderr.read().splitlines() if not line.startswith("cbtm run: error:")] == []


def test_an_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    immutable = subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode == 0
    if not immutable:
        locked.chmod(0o500)  # not root: a mode is enough
    try:
        assert main(["run", "--out", str(locked / "run")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not writable" in err[0]
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(locked)])
        locked.chmod(0o700)


RUN_DIR_CASES = [
    (["query", "{run}", "x", "--top-k", "0"], "top_k must be a whole number between 1 and 3, got 0"),
    (["query", "{run}", "x", "--top-k", "99"], "top_k must be a whole number between 1 and 3, got 99"),
    (["query", "{run}", "x", "--route-temperature", "nan"], "route_temperature must be a finite number > 0"),
    (["query", "{run}", "x", "--route-temperature", "0"], "route_temperature must be a finite number > 0"),
    (["query", "{run}", "x", "--max-new-tokens", "500"], "fit in the context of 128 positions"),
    (["query", "{run}", "   "], "is empty"),
    (["query", "{run}", "x", "--sample", "--temperature", "nan"], "temperature must be a finite number > 0"),
    (["query", "{run}", "x", "--reroute-every", "0"], "reroute_every must be a whole number >= 1"),
    (["query", "/no/such/run", "x"], "not a cbtm run directory"),
    (["query", "{run}", "x", "--experts", "9"], "cluster 9 does not exist"),
    (["query", "{run}", "x", "--exclude-experts", "one"], "must be comma-separated cluster ids"),
    (["query", "{run}", "x", "--stop", ""], "every stop string must be a non-empty string"),
    (["tune-temperature", "{run}", "--grid", "nan", "--limit", "2"], "must hold finite temperatures > 0"),
    (["tune-temperature", "{run}", "--grid", "0,0.1"], "must hold finite temperatures > 0"),
    (["tune-temperature", "{run}", "--grid", "cold"], "must be comma-separated numbers"),
    (["tune-temperature", "{run}", "--top-k", "0"], "top_k must be a whole number"),
    (["tune-temperature", "{run}", "--limit", "0"], "--limit must be >= 1"),
    (["eval", "{run}", "--baselines", "dense,moe"], "unknown baseline 'moe'"),
    (["eval", "{run}", "--limit", "0"], "--limit must be >= 1"),
    (["eval", "{run}", "--top-k", "9"], "--top-k 9 is out of range"),
    (["retrain", "{run}", "--cluster", "9"], "cluster(s) [9] do not exist"),
    (["clusters", "choose-k", "{run}", "--k", "2,999"], "larger than the"),
    (["clusters", "choose-k", "{run}", "--k", "few"], "comma-separated whole numbers"),
]


@pytest.mark.parametrize("argv,match", RUN_DIR_CASES, ids=[" ".join(a) for a, _ in RUN_DIR_CASES])
def test_bad_input_on_a_finished_run_leaves_it_untouched(argv, match, victim, capsys, prefect_harness):
    before = snapshot(victim) | {"manifest": (victim / "manifest.json").read_bytes()}
    assert main([a.format(run=victim) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0] and match in err[0], err
    assert snapshot(victim) | {"manifest": (victim / "manifest.json").read_bytes()} == before


def damage(run, how):
    if how == "cut_weights":
        weights = run / "experts" / "1" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "flipped_weights":
        weights = run / "experts" / "1" / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif how == "no_centroids":
        (run / "clusters" / "centroids.npy").unlink()
    elif how == "cut_centroids":
        centroids = run / "clusters" / "centroids.npy"
        centroids.write_bytes(centroids.read_bytes()[:40])
    elif how == "manifest":
        (run / "manifest.json").write_text("{not json")
    elif how == "cut_tokenizer":
        tokenizer = run / "tokenizer" / "tokenizer.json"
        tokenizer.write_bytes(tokenizer.read_bytes()[:100])
    elif how in ("clusters_json", "seed_config"):
        (run / ("clusters/clusters.json" if how == "clusters_json" else "seed/config.json")).write_text("xx{")
    elif how == "router":
        (run / "router" / "coef.npy").write_bytes(b"")


@pytest.mark.parametrize("how,match", [
    ("cut_weights", "expert 1: model.safetensors is"), ("flipped_weights", "does not match the sha256"),
    ("no_centroids", "clusters/centroids.npy is missing"), ("cut_centroids", "centroids.npy is damaged"),
    ("manifest", "manifest.json is corrupt"), ("cut_tokenizer", "tokenizer is damaged"),
    ("clusters_json", "clusters/clusters.json is damaged"), ("seed_config", "seed/config.json is damaged"),
    ("router", "the prefix router in")])
def test_a_damaged_run_says_what_is_wrong_and_how_to_repair_it(built_run, tmp_path, capsys, how, match):
    run = shutil.copytree(built_run, tmp_path / "run")
    damage(run, how)
    assert main(["query", str(run), "The telescope showed", "--top-k", "3", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    if how.endswith("weights"):
        assert f"cbtm retrain {run} --cluster 1" in err[0]
    if how.endswith("centroids"):
        assert f"cbtm run --out {run} --force cluster" in err[0]
    if how in ("cut_tokenizer", "clusters_json", "seed_config", "router"):
        assert err[0].endswith(f"`cbtm run --out {run}`"), err
    if how == "manifest":
        assert f"`cbtm run --config {run / 'config.toml'} --out NEW_DIR`" in err[0]


def test_the_named_repair_rewrites_the_damaged_files_and_keeps_the_experts(built_run, tmp_path, capsys):
    run = shutil.copytree(built_run, tmp_path / "run")
    weights = run / "experts" / "1" / "model.safetensors"
    kept = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    for how in ("cut_tokenizer", "clusters_json", "seed_config", "router"):
        damage(run, how)
    argv = ["query", str(run), "The telescope showed", "--top-k", "3", "--max-new-tokens", "2"]
    assert main(argv) == 2
    repair = capsys.readouterr().err.strip().split("`")[-2].split()  # the command the message names
    assert repair == ["cbtm", "run", "--out", str(run)]
    assert main(repair[1:]) == 0
    assert main(argv) == 0, capsys.readouterr().err
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == kept


@pytest.fixture(scope="module")
def ens(built_run):
    return Ensemble.load(built_run)


API_LOAD = [dict(top_k=0), dict(top_k=99), dict(top_k=1.5), dict(top_k=True), dict(route_temperature=float("nan")),
            dict(route_temperature=0), dict(route_temperature=-1.0), dict(route_temperature="warm"),
            dict(max_loaded_experts=0), dict(backend="gpu"), dict(device="tpu")]


@pytest.mark.parametrize("kwargs", API_LOAD, ids=[str(k) for k in API_LOAD])
def test_bad_load_arguments_raise_one_line_value_errors(built_run, kwargs):
    with pytest.raises(ValueError) as err:
        Ensemble.load(built_run, **kwargs)
    assert "\n" not in str(err.value) and str(err.value)


API_CALLS = {
    "prompt None": lambda e: e.generate(None),
    "prompt list with an int": lambda e: e.generate(["ok", 3]),
    "no prompts": lambda e: e.generate([]),
    "blank prompt": lambda e: e.generate(" \n"),
    "empty stop": lambda e: e.generate("x", stop=""),
    "nan temperature": lambda e: e.generate("x", temperature=float("nan")),
    "top_p 0": lambda e: e.generate("x", do_sample=True, top_p=0),
    "negative seed": lambda e: e.generate("x", seed=-1),
    "too many tokens": lambda e: e.generate("x", max_new_tokens=200),
    "fractional tokens": lambda e: e.generate("x", max_new_tokens=1.5),
    "negative tokens": lambda e: e.generate("x", max_new_tokens=-1),
    "reroute 0": lambda e: e.generate("x", reroute_every=0),
    "unknown expert": lambda e: e.generate("x", experts=[99]),
    "every expert excluded": lambda e: e.generate("x", exclude_experts=[0, 1, 2]),
    "experts as a string": lambda e: e.generate("x", experts="0"),
    "top_k above the allowed": lambda e: e.generate("x", top_k=2, experts=[0]),
    "route None": lambda e: e.route(None),
    "route top_k 0": lambda e: e.route("x", top_k=0),
    "score an int": lambda e: e.score(3),
    "perplexity of nothing": lambda e: e.perplexity([]),
    "stream a list": lambda e: list(e.stream(["a", "b"])),
    "stream nan": lambda e: list(e.stream("x", route_temperature=float("nan"))),
}


@pytest.mark.parametrize("name", list(API_CALLS))
def test_bad_calls_raise_one_line_value_errors(ens, name):
    with pytest.raises(ValueError) as err:
        API_CALLS[name](ens)
    assert "\n" not in str(err.value) and str(err.value)


def test_a_prompt_that_does_not_fit_says_the_limit_and_is_never_cut(ens):
    prompt = "bread " * 40
    n = len(ens.encode(prompt))
    room = ens.max_positions - 1 - n
    with pytest.raises(ValueError, match=f"at most {room} new tokens fit in the context of {ens.max_positions}"):
        ens.generate(prompt, max_new_tokens=room + 1)
    assert isinstance(ens.generate(prompt, max_new_tokens=room), str)  # exactly the room: fine


def test_using_the_library_prints_nothing(built_run, capfd):
    ens = Ensemble.load(built_run, backend="sequential")
    ens.generate("Bread dough should rise", max_new_tokens=3, top_k=3)
    ens.expert_model(0)
    ens.route("The telescope")
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out and not captured.err.strip()


def test_cbtm_cleans_only_its_own_temporaries(built_run, tmp_path):
    run = shutil.copytree(built_run, tmp_path / "run")
    mine = [run / ".notes.tmp", run / "experts" / "x.old-1", run / ".report.md.cbtm-tmp-1-abc"]
    for path in mine:
        path.write_text("the user's")
    dead = run / ".model.cbtm-tmp-999999999-xyz"  # no such process: a killed cbtm left it
    dead.write_text("stale")
    live = run / f".model.cbtm-tmp-{__import__('os').getpid()}-xyz"  # a cbtm process still running
    live.write_text("in use")
    assert clean_stale_temporaries(run) == [dead]
    assert all(p.exists() for p in [*mine, live]) and not dead.exists()
    assert np.load(run / "clusters" / "centroids.npy").shape[0] == 3
