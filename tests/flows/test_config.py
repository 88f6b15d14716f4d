import pytest

from flows.config import PipelineConfig, parse_value
from ground.errors import UserInputError


def test_toml_round_trip_and_overrides(tmp_path):
    cfg = PipelineConfig().with_overrides(["train.steps=7", "cluster.n_clusters=3", "seed.model=preset:tiny",
                                           'corpus.text_field="body"', "corpus.max_chars=none"])
    assert (cfg.train.steps, cfg.cluster.n_clusters, cfg.seed.model, cfg.corpus.text_field) == (7, 3, "preset:tiny",
                                                                                               "body")
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert PipelineConfig.load(path) == cfg


@pytest.mark.parametrize("override,match", [
    ("train.stepz=3", "unknown key"), ("nope.x=1", "unknown section"), ("steps=3", "section.key=value"),
    ("cluster.n_clusters=0", "--clusters"), ("seed.model=preset:huge", "unknown seed preset"),
    ("ensemble.temperature=0", "temperature")])
def test_bad_overrides_are_one_line_errors(override, match):
    with pytest.raises(UserInputError, match=match) as err:
        PipelineConfig().with_overrides([override])
    assert "\n" not in str(err.value)


def test_missing_or_invalid_config_file(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        PipelineConfig.load(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps=")
    with pytest.raises(UserInputError, match="not valid TOML"):
        PipelineConfig.load(bad)


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("preset:tiny") == "preset:tiny" and parse_value("none") is None
