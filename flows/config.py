"""The pipeline config: one dataclass per stage, composed; loadable from TOML, overridable with key=value."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from cluster.config import ClusterConfig, CorpusConfig, EmbedConfig
from ensemble.config import EnsembleConfig
from experts.budget import seed_phase_tokens
from experts.config import SeedConfig, TrainConfig
from ground.errors import UserInputError

SECTIONS = {"corpus": CorpusConfig, "embed": EmbedConfig, "cluster": ClusterConfig, "seed": SeedConfig,
            "train": TrainConfig, "ensemble": EnsembleConfig}


@dataclass
class PipelineConfig:
    """Everything a run needs. Defaults are the smallest run that finishes on a 2-core CPU."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    seed: SeedConfig = field(default_factory=SeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)

    def seed_tokens(self) -> int:
        """Tokens of the seed phase (0: none), a part of the training budget (`experts.budget`)."""
        return seed_phase_tokens(self.seed, self.train, self.cluster.n_clusters)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PipelineConfig":
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise UserInputError(f"unknown config section(s) {sorted(unknown)}: valid sections are {sorted(SECTIONS)}")
        sections = {}
        if "temperature" in (data.get("ensemble") or {}):
            raise UserInputError("[ensemble] temperature is now called route_temperature (temperature means the "
                                 "sampling temperature only): rename the key")
        for name, klass in SECTIONS.items():
            values = dict(data.get(name) or {})
            if not isinstance(values, dict):
                raise UserInputError(f"config section [{name}] must be a table of key = value, got {values!r}")
            valid = {f.name for f in dataclasses.fields(klass)}
            bad = set(values) - valid
            if bad:
                raise UserInputError(f"unknown key(s) {sorted(bad)} in [{name}]: valid keys are {sorted(valid)}")
            sections[name] = klass(**values)
        return cls(**sections)

    @classmethod
    def load(cls, path: Path | str) -> "PipelineConfig":
        path = Path(path)
        if not path.is_file():
            raise UserInputError(f"config file {path} does not exist: pass an existing TOML file to --config")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise UserInputError(f"config file {path} is not valid TOML: {exc}") from exc
        return cls.from_dict(data)

    def to_toml(self) -> str:
        # TOML has no null: None values are left out and come back as the dataclass default (None).
        def strip(d: dict) -> dict:
            return {k: v for k, v in d.items() if v is not None}

        return tomli_w.dumps({name: strip(section) for name, section in self.to_dict().items()})

    def with_overrides(self, overrides: list[str]) -> "PipelineConfig":
        """Apply ``section.key=value`` strings; values are parsed as TOML literals, else taken as strings."""
        data = self.to_dict()
        for item in overrides:
            key, sep, raw = item.partition("=")
            section, dot, name = key.strip().partition(".")
            if not sep or not dot or not name:
                raise UserInputError(f"--set {item!r} must look like section.key=value (e.g. train.steps=100)")
            if section not in data:
                raise UserInputError(f"--set {item!r}: unknown section {section!r}, valid: {sorted(SECTIONS)}")
            data[section][name] = parse_value(raw.strip())
        return self.from_dict(data)


def parse_value(raw: str) -> Any:
    """Parse a command-line value: a TOML literal (1, 0.5, true, "x", [1, 2]) or else a bare string."""
    if raw.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
