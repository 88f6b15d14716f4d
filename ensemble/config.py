"""Routing settings: the `ensemble` config section, and the one rule that decides which value a call uses.

Precedence, for ``top_k`` and ``route_temperature`` alike: **a call's argument > the run's tuned value
(`cbtm tune-temperature`) > the config**. The route temperature has one more level below a value set in the
config: when ``ensemble.route_temperature`` is unset, the pipeline's tune stage picks it on held-out text
(``"source": "auto"``), and only without one does the router's default apply. The manifest holds one routing
entry per setting, ``{"value": ..., "source": "config" | "auto" | "tuned"}``, written by `record_routing` at the
assemble stage, by the tune stage (`auto_routing`) and by `tuned_routing`; `resolve_routing` applies the precedence.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ensemble.evidence import Evidence
from ground.errors import UserInputError
from ground.fields import check_fields, finite_positive, whole_number

log = logging.getLogger(__name__)

ROUTERS = ("centroid", "prefix")
# The routing temperature each router is calibrated for: T in softmax(-d^2 / T) for centroids (tune it with
# `cbtm tune-temperature`); 1 for the prefix router, whose logits are calibrated log-probabilities.
DEFAULT_TEMPERATURE = {"centroid": 0.1, "prefix": 1.0}


@dataclass
class EnsembleConfig:
    """Routing defaults stored in the manifest.

    ``router``: "centroid" (c-BTM: softmax(-d^2 / T) over the squared distances of the context's embedding to
    the centroids) or "prefix" (`ensemble.prefix_router`, trained on the first tokens of documents);
    ``route_temperature`` T (None: the router's own default, `DEFAULT_TEMPERATURE`); ``top_k`` experts mixed
    per prompt; ``route_window``: when scoring, the weights for a token come from the tokens before it,
    recomputed once per window of this many tokens (so no prefix is embedded token by token);
    ``tune_docs``: with ``route_temperature`` unset, the build picks T by the perplexity of up to this many
    held-out documents at ``top_k`` (0: no tuning, the router's default applies); ``evidence_weight`` (0: off)
    and ``evidence_decay``: within the routed experts, each token's weights are reweighted by how well each
    expert predicted the tokens just before it (`ensemble.evidence`).
    """

    top_k: int = 2
    route_temperature: float | None = None
    route_window: int = 32
    router: str = "prefix"
    tune_docs: int = 200
    evidence_weight: float = 0.5
    evidence_decay: float = 0.8

    def __post_init__(self) -> None:
        check_fields(self, "ensemble")
        whole_number(self.top_k, "ensemble.top_k", 1)
        if self.route_temperature is not None:
            finite_positive(self.route_temperature, "ensemble.route_temperature")
        whole_number(self.route_window, "ensemble.route_window", 1)
        whole_number(self.tune_docs, "ensemble.tune_docs", 0)
        if self.router not in ROUTERS:
            raise UserInputError(f"ensemble.router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.evidence_weight < 0:  # check_fields has made both finite floats
            raise UserInputError(f"ensemble.evidence_weight must be >= 0 (0: off), got {self.evidence_weight}")
        if not 0 <= self.evidence_decay <= 1:
            raise UserInputError(f"ensemble.evidence_decay must be between 0 and 1, got {self.evidence_decay}")

    @property
    def evidence(self) -> Evidence:
        return Evidence(self.evidence_weight, self.evidence_decay)

    @property
    def temperature(self) -> float:
        """The configured route_temperature, or the router's default."""
        return self.route_temperature if self.route_temperature is not None else DEFAULT_TEMPERATURE[self.router]


def record_routing(recorded: dict, cfg: EnsembleConfig) -> dict:
    """The manifest's routing entry after a build with ``cfg``: a tuned value is kept (and the kept value
    said when the config now asks for another), an auto-tuned temperature too while the config sets none (the
    tune stage refreshes it when the experts change); everything else comes from the config."""
    out = {}
    for key in ("route_temperature", "top_k"):
        wanted = cfg.temperature if key == "route_temperature" else cfg.top_k
        entry = dict(recorded.get(key) or {})
        if key == "route_temperature" and entry.get("source") == "auto" and cfg.route_temperature is None \
                and cfg.tune_docs:
            out[key] = entry
        elif entry.get("source") == "tuned":
            if entry.get("value") != wanted:
                log.info("  routing   keeping the tuned %s %s over the config's %s (tuned wins; "
                         "`cbtm tune-temperature RUN --clear` returns to the config)", key, entry["value"], wanted)
            out[key] = entry
        else:
            out[key] = {"value": wanted, "source": "config"}
    return out


def tuned_routing(recorded: dict, route_temperature: float | None) -> dict:
    """The routing entry once `cbtm tune-temperature` chose ``route_temperature`` (None: back to the config)."""
    out = dict(recorded)
    if route_temperature is None:
        out.pop("route_temperature", None)
    else:
        out["route_temperature"] = {"value": finite_positive(route_temperature, "route_temperature"),
                                    "source": "tuned"}
    return out


def auto_routing(recorded: dict, route_temperature: float) -> dict:
    """The routing entry once the tune stage picked ``route_temperature`` on held-out text."""
    return {**recorded, "route_temperature": {"value": finite_positive(route_temperature, "route_temperature"),
                                              "source": "auto"}}


def resolve_routing(recorded: dict, cfg: EnsembleConfig, n_experts: int, top_k=None,
                    route_temperature=None) -> tuple[int, float]:
    """(top_k, route_temperature) for a call: its argument > the recorded (tuned or built) value > ``cfg``.

    An argument out of range is a ValueError (UserInputError); a recorded top_k above the number of active
    experts (some were skipped or removed) is lowered to it with a log line.
    """
    if route_temperature is None:
        route_temperature = (recorded.get("route_temperature") or {}).get("value", cfg.temperature)
    route_temperature = finite_positive(route_temperature, "route_temperature")
    if top_k is not None:
        return whole_number(top_k, "top_k", 1, n_experts), route_temperature
    top_k = int((recorded.get("top_k") or {}).get("value") or cfg.top_k)
    if top_k > n_experts:
        log.info("top_k %d of the run is more than its %d active expert(s): using %d", top_k, n_experts, n_experts)
    return min(top_k, n_experts), route_temperature
