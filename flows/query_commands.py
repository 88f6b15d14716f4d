"""`cbtm query | tune-temperature`: commands that open a finished run with `Ensemble` (no Prefect)."""
from __future__ import annotations

import json
import math

from ensemble import Ensemble
from ensemble.config import tuned_routing
from flows.evaluate import heldout_texts, keep_unless_gain, plot_temperature, tune_temperature
from flows.tuning import MIN_GAIN
from ground.errors import UserInputError
from ground.files import atomic_write_text
from ground.rundir import RunDir


def cluster_ids(text: str | None, flag: str) -> list[int] | None:
    """Comma-separated cluster ids of a flag (None when the flag is not given)."""
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise UserInputError(f"{flag} {text!r} must be comma-separated cluster ids, e.g. 0,3") from exc


def cmd_query(args) -> int:
    ens = Ensemble.load(args.run_dir)
    options = dict(top_k=args.top_k, route_temperature=args.route_temperature,
                   experts=cluster_ids(args.experts, "--experts"),
                   exclude_experts=cluster_ids(args.exclude_experts, "--exclude-experts"))
    routes = ens.route(args.prompt, **options)
    keywords = {e["cluster_id"]: e["keywords"] for e in ens.experts}
    pieces = ens.stream(args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                        reroute_every=args.reroute_every, stop=args.stop, **options)
    first = next(pieces, "")  # bad arguments fail here, before anything is printed
    print("Routing:")
    for cid, weight in routes:
        print(f"  cluster {cid:>3}  weight {weight:.3f}  {', '.join(keywords[cid][:5])}")
    print("Completion:")
    print(args.prompt + first, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    return 0


def parse_grid(text: str) -> list[float]:
    """Comma-separated routing temperatures, each a finite number > 0 (sorted, without repeats)."""
    try:
        grid = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError as exc:
        raise UserInputError(f"--grid {text!r} must be comma-separated numbers, e.g. 0.03,0.1,0.3") from exc
    if not grid or not all(math.isfinite(t) and t > 0 for t in grid):
        raise UserInputError(f"--grid {text!r} must hold finite temperatures > 0, e.g. 0.03,0.1,0.3")
    return grid


def cmd_tune_temperature(args) -> int:
    run = RunDir(args.run_dir)
    if args.clear:
        with run.writing("tune-temperature"):
            manifest = run.read_manifest()
            manifest.routing = tuned_routing(manifest.routing, None)
            run.write_manifest(manifest)
        print(f"Cleared the tuned route temperature of {run.root}: the config's value applies")
        return 0
    grid = parse_grid(args.grid)
    if args.limit is not None and args.limit < 1:
        raise UserInputError(f"--limit must be >= 1, got {args.limit}")
    ens = Ensemble.load(args.run_dir, top_k=args.top_k)  # a bad --top-k fails here, before any scoring
    with run.writing("tune-temperature"):
        results = tune_temperature(ens, heldout_texts(ens)[: args.limit], grid, ens.top_k)
        close = keep_unless_gain(results, ens.route_temperature, MIN_GAIN)
        manifest = run.read_manifest()
        manifest.routing = tuned_routing(manifest.routing, results["best"])  # checked before it is written
        atomic_write_text(run.temperature_path, json.dumps(results, indent=2) + "\n")
        run.write_manifest(manifest)
        plot = plot_temperature(results, run.plots_dir / "temperature.png")
    print(f"Held-out perplexity by routing temperature (top-{ens.top_k}):")
    for row in results["grid"]:
        mark = "  <- chosen" if row["route_temperature"] == results["best"] else ""
        print(f"  T={row['route_temperature']:<8g} {row['perplexity']:>9.2f}{mark}")
    if len(close) > 1:
        print(f"{len(close)} temperatures are within {MIN_GAIN:.1%} of the lowest perplexity: kept the one nearest "
              f"the run's T={ens.route_temperature:g}")
    print(f"Recorded route temperature {results['best']:g} in {run.manifest_path}; plot: {plot}")
    return 0
