"""The tune stage: the build picks the route temperature on held-out text, unless the user chose one."""
import json
import shutil

import numpy as np
import pytest

from ensemble import Ensemble
from ensemble.config import DEFAULT_TEMPERATURE
from flows.cli import main
from flows.evaluate import evaluate_run
from flows.pipeline import build
from flows.tuning import MIN_GAIN, TUNE_SCALES, auto_tune, tuning_texts
from ground.rundir import RunDir
from tests.conftest import tiny_config

TEXTS = ["Knead the dough and let the bread rise in a warm kitchen before baking it.",
         "The telescope showed a faint galaxy beyond the bright stars of the night sky.",
         "The striker scored in the final minute and the crowd sang until the whistle."]


@pytest.fixture
def run_copy(built_run, tmp_path):
    return shutil.copytree(built_run, tmp_path / "run")


def temperature(run_dir) -> dict:
    return RunDir(run_dir).read_manifest().routing["route_temperature"]


def test_the_build_records_a_temperature_tuned_on_held_out_text(built_run):
    run = RunDir(built_run)
    tuned = json.loads(run.temperature_path.read_text())
    assert tuned["source"] == "auto" and tuned["n_docs"] == len(tuning_texts(run.corpus_path, 200)) > 0
    assert [r["route_temperature"] for r in tuned["grid"]] == [DEFAULT_TEMPERATURE["prefix"] * s for s in TUNE_SCALES]
    assert temperature(built_run) == {"value": tuned["best"], "source": "auto"}
    assert Ensemble.load(built_run).route_temperature == tuned["best"]
    assert (built_run / "plots" / "temperature.png").stat().st_size > 0
    assert f"route temperature {tuned['best']} (auto)" in (built_run / "report.md").read_text()


def test_a_rebuild_with_nothing_changed_does_not_tune_again(run_copy, slice_corpus, monkeypatch):
    run = RunDir(run_copy)
    stamp = (run.temperature_path.stat().st_ino, run.temperature_path.stat().st_mtime_ns)
    record = run.read_manifest().stages["tune"]

    def unread(*args):
        raise AssertionError("a skipped tune stage read the held-out texts")

    monkeypatch.setattr("flows.tuning.tuning_texts", unread)  # it reads the whole text column
    build(tiny_config(slice_corpus).to_dict(), str(run_copy))
    assert (run.temperature_path.stat().st_ino, run.temperature_path.stat().st_mtime_ns) == stamp
    assert run.read_manifest().stages["tune"] == record  # same finished_at: the stage was skipped


def test_the_chosen_temperature_scores_no_worse_than_the_routers_default(run_copy):
    run = RunDir(run_copy)
    manifest = run.read_manifest()
    cfg = tiny_config(run.corpus_path)
    chosen = auto_tune(run, manifest, cfg, TEXTS)
    run.write_manifest(manifest)
    ens = Ensemble.load(run_copy)
    assert ens.route_temperature == chosen
    at = lambda t: evaluate_run(Ensemble.load(run_copy, route_temperature=t), TEXTS, [2],  # noqa: E731
                                experts_alone=False)["systems"]["top-2"]["perplexity"]
    grid = json.loads(run.temperature_path.read_text())["grid"]
    assert at(chosen) <= at(DEFAULT_TEMPERATURE["prefix"])
    assert at(chosen) <= min(r["perplexity"] for r in grid) * (1 + MIN_GAIN) + 1e-9
    # The grid's perplexities are the ensemble's own at that temperature: the experts ran once for all of them.
    for row in grid[::3]:
        assert row["perplexity"] == pytest.approx(at(row["route_temperature"]), rel=1e-6)


def test_a_configured_temperature_is_used_as_set_and_never_tuned(run_copy, slice_corpus):
    before = RunDir(run_copy).temperature_path.read_bytes()
    build(tiny_config(slice_corpus).with_overrides(["ensemble.route_temperature=0.7"]).to_dict(), str(run_copy))
    assert temperature(run_copy) == {"value": 0.7, "source": "config"}
    assert Ensemble.load(run_copy).route_temperature == 0.7
    assert RunDir(run_copy).temperature_path.read_bytes() == before  # the tune stage did not run
    build(tiny_config(slice_corpus).to_dict(), str(run_copy))  # unset again: tuned again
    assert temperature(run_copy)["source"] == "auto"


def test_a_hand_tuned_temperature_survives_a_rebuild_and_clear_returns_to_auto(run_copy, slice_corpus, capsys):
    assert main(["tune-temperature", str(run_copy), "--grid", "0.25,4", "--limit", "3"]) == 0
    hand = temperature(run_copy)
    assert hand["source"] == "tuned" and hand["value"] in (0.25, 4.0)
    stamp = RunDir(run_copy).temperature_path.stat().st_mtime_ns
    build(tiny_config(slice_corpus).to_dict(), str(run_copy))
    assert temperature(run_copy) == hand and RunDir(run_copy).temperature_path.stat().st_mtime_ns == stamp
    assert main(["tune-temperature", str(run_copy), "--clear"]) == 0
    build(tiny_config(slice_corpus).to_dict(), str(run_copy))
    auto = temperature(run_copy)
    assert auto["source"] == "auto"
    assert auto["value"] == json.loads(RunDir(run_copy).temperature_path.read_text())["best"]


def test_tuning_off_returns_to_the_routers_default(run_copy, slice_corpus):
    build(tiny_config(slice_corpus).with_overrides(["ensemble.tune_docs=0"]).to_dict(), str(run_copy))
    assert temperature(run_copy) == {"value": DEFAULT_TEMPERATURE["prefix"], "source": "config"}
    assert np.isfinite(Ensemble.load(run_copy).score(TEXTS[0])[0]).all()
    with pytest.raises(ValueError, match="ensemble.tune_docs must be"):
        tiny_config(slice_corpus).with_overrides(["ensemble.tune_docs=-1"])


def test_where_the_temperature_changes_next_to_nothing_the_command_keeps_the_runs_own(run_copy, capsys):
    """At top-1 every T routes each window to the same one expert; only the first window's prior mixture moves.
    The lowest perplexity by a hair (0.04% on 3 documents, at T = 100: near-uniform mixing there) used to become
    the run's tuned temperature. The tune stage's rule applies: another T must gain `MIN_GAIN`."""
    current = Ensemble.load(run_copy).route_temperature
    grid = f"0.01,{current:g},100"
    assert main(["tune-temperature", str(run_copy), "--top-k", "1", "--grid", grid, "--limit", "3"]) == 0
    ppl = [row["perplexity"] for row in json.loads(RunDir(run_copy).temperature_path.read_text())["grid"]]
    assert ppl[2] < ppl[1] <= ppl[2] * (1 + MIN_GAIN)  # T = 100 is lowest, by less than MIN_GAIN
    assert temperature(run_copy) == {"value": current, "source": "tuned"}
    assert f"kept the one nearest the run's T={current:g}" in capsys.readouterr().out
