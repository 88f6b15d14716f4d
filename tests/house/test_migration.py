"""A run directory written by schema-1 main (tests/data/run-schema1.tar.gz, built by commit 4646b38 with the
outputs it gave recorded beside it) still opens, answers the same, and is rewritten as schema 2 when updated."""
import json
import tarfile
from pathlib import Path

import pytest

from ensemble import Ensemble
from flows.cli import main
from flows.config import PipelineConfig
from flows.pipeline import retrain
from ground.rundir import RunDir

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def v1_run(tmp_path) -> Path:
    with tarfile.open(DATA / "run-schema1.tar.gz") as tar:
        # Python < 3.11.4 (e.g. Debian's 3.11.2) has no extraction filters; the archive is our own test data
        tar.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return tmp_path / "run"


def expected() -> dict:
    return json.loads((DATA / "run-schema1.expected.json").read_text())


def test_a_schema_1_run_opens_and_answers_as_it_did(v1_run):
    assert json.loads((v1_run / "manifest.json").read_text())["schema_version"] == 1
    want = expected()
    ens = Ensemble.load(v1_run)
    assert ens.manifest.routing == {"route_temperature": {"value": 0.5, "source": "tuned"},
                                    "top_k": {"value": 2, "source": "config"}}
    assert (ens.route_temperature, ens.top_k) == (want["temperature"], want["top_k"])
    g = want["generate"]
    assert ens.generate(g["prompt"], max_new_tokens=g["max_new_tokens"], top_k=g["top_k"]) == g["text"]
    assert ens.generate("The stars shine over the", max_new_tokens=8, top_k=2) == want["generate_top2"]
    assert [[c, pytest.approx(w, rel=1e-6)] for c, w in ens.route("The stars shine", top_k=2)] == want["route"]
    text = "Knead the dough until it is smooth, then let it rise in a warm place."
    assert ens.perplexity([text], top_k=2) == pytest.approx(want["perplexity_top2"], rel=1e-6)
    assert json.loads((v1_run / "manifest.json").read_text())["schema_version"] == 1  # reading changes nothing


def test_updating_a_schema_1_run_writes_schema_2(v1_run, prefect_harness):
    retrain(str(v1_run), [0])
    manifest = json.loads((v1_run / "manifest.json").read_text())
    assert manifest["schema_version"] == 2 and "temperature" not in manifest
    assert manifest["config"]["ensemble"]["route_temperature"] == 0.1
    assert manifest["routing"]["route_temperature"] == {"value": 0.5, "source": "tuned"}  # tuned wins over config
    assert set(manifest["experts"]["0"]["files"]) >= {"config.json", "model.safetensors"}
    assert Ensemble.load(v1_run).generate("Bread dough should rise", max_new_tokens=4, top_k=1)


def test_clearing_the_tuned_temperature_returns_to_the_config(v1_run, capsys):
    assert main(["tune-temperature", str(v1_run), "--clear"]) == 0
    assert "config's value applies" in capsys.readouterr().out
    manifest = RunDir(v1_run).read_manifest()
    assert "route_temperature" not in manifest.routing
    assert Ensemble.load(v1_run).route_temperature == 0.1


def test_an_early_schema_2_run_keeps_the_settings_it_was_built_with(v1_run):
    """Schema-2 runs written before `seed.pretrain_share` and `ensemble.router` existed: no seed phase, centroid
    routing — not today's defaults (0.75, prefix), which would send `cbtm eval --baselines` looking for a seed
    phase the run never had."""
    run = RunDir(v1_run)
    data = run.read_manifest().to_json()
    del data["config"]["seed"]["pretrain_share"], data["config"]["ensemble"]["router"]
    (v1_run / "manifest.json").write_text(json.dumps(data))
    cfg = PipelineConfig.from_dict(run.read_manifest().config)
    assert (cfg.seed.pretrain_share, cfg.seed_tokens(), cfg.ensemble.router) == (0.0, 0, "centroid")
    assert Ensemble.load(v1_run).generate("The stars shine over the", max_new_tokens=8, top_k=2) == \
        expected()["generate_top2"]
