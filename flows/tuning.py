"""The tune stage: pick the route temperature of a finished run by its held-out perplexity.

The prefix router's temperature is calibrated to predict a document's *cluster*; mixing the experts'
probabilities prefers flatter weights than that (measured on 20 Newsgroups and DBpedia: T = 2-3 beats the
calibrated T = 1 at top-2 and with all experts). So, unless ``ensemble.route_temperature`` is set, the build
scores up to ``ensemble.tune_docs`` held-out documents once with every expert and keeps the T of
`TUNE_SCALES` x the router's default with the lowest perplexity at the run's ``top_k``, if it beats the
default by `MIN_GAIN` (``"source": "auto"`` in the manifest). A value chosen by hand with
`cbtm tune-temperature` is never replaced. Nothing here imports Prefect.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from cluster.corpus import read_documents
from ensemble import Ensemble
from ensemble.config import DEFAULT_TEMPERATURE, auto_routing
from flows.config import PipelineConfig
from flows.evaluate import keep_unless_gain, plot_temperature, tune_temperature
from flows.stages import run_stage
from ground.files import atomic_write_text, hash_json
from ground.rundir import Manifest, RunDir, hashed_settings

log = logging.getLogger("cbtm")

TUNE_SCALES = (0.5, 0.7, 1.0, 1.4, 2.0, 3.0, 5.0)  # times the router's default temperature
MIN_GAIN = 0.001  # another T than the router's default must lower the held-out perplexity by 0.1%
TUNE_CHARS = 3000  # each held-out document is cut to this many characters: a long one must not dominate the cost


def tuning_texts(corpus_path: Path, n_docs: int) -> list[str]:
    """Up to ``n_docs`` held-out documents of the ingested corpus (a seeded sample), each cut to `TUNE_CHARS`."""
    texts = read_documents(corpus_path, split="heldout", columns=["text"]).column("text").to_pylist()
    texts = [t[:TUNE_CHARS] for t in texts if t and t.strip()]
    return random.Random(0).sample(texts, min(n_docs, len(texts)))


def tune_inputs(cfg: PipelineConfig, manifest: Manifest, router: str | None, ingest: str | None) -> str:
    """Content hash of what the chosen temperature depends on: routing settings, the experts routed to (their
    content hashes), the router's files and the corpus."""
    experts = {str(c): manifest.experts[str(c)].get("hash") for c in manifest.routed_experts()}
    return hash_json({"cfg": hashed_settings(cfg.ensemble), "experts": experts, "router": router, "ingest": ingest,
                      "scales": TUNE_SCALES, "chars": TUNE_CHARS, "min_gain": MIN_GAIN})


def wants_tuning(cfg: PipelineConfig, manifest: Manifest) -> bool:
    """True unless the config sets the temperature, tuning is off, or a hand-tuned value is recorded."""
    entry = manifest.routing.get("route_temperature") or {}
    return cfg.ensemble.route_temperature is None and cfg.ensemble.tune_docs > 0 and entry.get("source") != "tuned"


def choose_temperature(ens: Ensemble, texts: list[str], default: float) -> dict:
    """`tune_temperature` at ``ens.top_k`` over `TUNE_SCALES` x the router's ``default`` T; ``"best"`` stays the
    default unless another T lowers the perplexity of ``texts`` by `MIN_GAIN` (`keep_unless_gain`: then the T
    nearest the default among those within `MIN_GAIN` of the lowest, as `cbtm tune-temperature` chooses)."""
    results = tune_temperature(ens, texts, [round(default * s, 6) for s in TUNE_SCALES], ens.top_k)
    keep_unless_gain(results, default, MIN_GAIN)  # a confident router: T changes next to nothing
    return results


def auto_tune(run: RunDir, manifest: Manifest, cfg: PipelineConfig, texts: list[str]) -> float:
    """Score ``texts`` with the run (its experts all recorded) at every candidate T; record the best in
    ``manifest.routing`` (the caller persists it) and write eval/temperature.json and plots/temperature.png.
    Returns the chosen T."""
    ens = Ensemble.load(run.root, device="auto", unfinished=True)
    default = DEFAULT_TEMPERATURE[cfg.ensemble.router]
    results = choose_temperature(ens, texts, default)
    ppl = {r["route_temperature"]: r["perplexity"] for r in results["grid"]}
    results.update(source="auto", n_docs=len(texts), min_gain=MIN_GAIN)
    manifest.routing = auto_routing(manifest.routing, results["best"])
    atomic_write_text(run.temperature_path, json.dumps(results, indent=2) + "\n")
    plot_temperature(results, run.plots_dir / "temperature.png")
    log.info("  tune      route temperature %g on %d held-out document(s): top-%d perplexity %.2f (%.2f at the "
             "router's default %g)", results["best"], len(texts), ens.top_k, ppl[results["best"]], ppl[default],
             default)
    return results["best"]


def tune_stage(run: RunDir, manifest: Manifest, cfg: PipelineConfig, corpus_path: Path, inputs: str) -> bool:
    """Run (or skip, when current) the tune stage of a run whose experts are all recorded and whose held-out
    documents are in ``corpus_path``; True if it ran. A run without held-out documents keeps the router's
    default."""
    if not wants_tuning(cfg, manifest) or len(manifest.routed_experts()) < 2:  # one expert: T changes nothing
        return False
    recorded = (manifest.routing.get("route_temperature") or {}).get("source") == "auto"
    # Only the split column here: the texts are read when the stage runs, not on every rebuild that skips it.
    if not read_documents(corpus_path, split="heldout", columns=["split"]).num_rows:
        log.info("  tune      no held-out documents: the router's default temperature applies")
        return False
    # Without a recorded value (`cbtm tune-temperature --clear`) the stage runs again even if current.
    work = lambda: auto_tune(run, manifest, cfg, tuning_texts(corpus_path, cfg.ensemble.tune_docs))  # noqa: E731
    return run_stage(run, manifest, "tune", inputs, work, force=not recorded)
