"""Routing from short prompts: centroid routing against the prefix router, on a finished run.

    python bench/routing.py RUN [--docs 300] [--eval-chars 3000]

For the held-out documents of RUN (each document's own cluster: its nearest centroid), the top-1 expert chosen
from its first 8/16/32/64/128/256 tokens by centroid routing and by the prefix router (fitted into RUN/router
first if the run has none), and the held-out perplexity of the ensemble at top-1 and top-2 with each router
(`cbtm eval`'s protocol: a token's weights come from the text before it, every expert scores the first window).
Targets (20 Newsgroups): the prefix router agrees >= 0.90 at 16 tokens and >= 0.95 at 32; top-1 perplexity >= 3%
lower than with centroid routing. Also the perplexity of an oracle that knows each document's own cluster and
uses that expert alone for every token, the first window's too (with every expert there, evidence can beat it).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cluster.corpus import read_documents  # noqa: E402
from ensemble import Ensemble  # noqa: E402
from ensemble.scoring import mix  # noqa: E402
from flows.config import PipelineConfig  # noqa: E402
from flows.routing_stage import train_router  # noqa: E402
from ground.rundir import RunDir  # noqa: E402

LENGTHS = (8, 16, 32, 64, 128, 256)


def ensure_router(run: RunDir) -> None:
    if not (run.router_dir / "settings.json").exists():
        cfg = PipelineConfig.from_dict(run.read_manifest().config)
        start = time.perf_counter()
        train_router(run.corpus_path, run.clusters_dir, run.tokenizer_dir, cfg.embed, run.embeddings_dir,
                     run.router_dir, run.router_cache)
        print(f"fitted the prefix router in {time.perf_counter() - start:.0f} s")


def agreement(ens: Ensemble, texts: list[str], own: np.ndarray) -> dict[int, float]:
    out = {}
    for n in LENGTHS:
        prefixes = [ens.tokenizer.decode(ens.encode(t)[:n]) for t in texts]
        top = np.array([r[0][0] for r in ens.route(prefixes, top_k=1)])
        out[n] = float((top == own).mean())
    return out


def perplexities(ens: Ensemble, texts: list[str]) -> tuple[list[float], object]:
    """([top-1, top-2] held-out perplexity, the scoring plan): `Ensemble.perplexity`'s protocol, with the window
    routing computed once for both (one plan serves every top_k)."""
    out, plan = [], None
    for k in (1, 2):
        spec = ens.route_spec(top_k=k)
        plan = plan or ens.scoring(texts, spec.columns)
        weights = plan.weights(spec.top_k, spec.route_temperature)
        out.append(float(np.exp(-np.concatenate(mix(weights, plan.logprobs(weights), spec.evidence)).mean())))
    return out, plan


def own_expert_perplexity(plan, own: np.ndarray) -> float:
    """Perplexity when each text is scored by its own cluster's expert alone (an oracle router)."""
    weights = []
    for ids, cluster_id in zip(plan.encoded, own):
        w = np.zeros((len(ids), len(plan.view.centroids)))
        w[:, cluster_id] = 1.0
        weights.append(w)
    return float(np.exp(-np.concatenate(mix(weights, plan.logprobs(weights))).mean()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--docs", type=int, default=300, help="held-out documents (seeded sample)")
    p.add_argument("--eval-chars", type=int, default=3000, help="each document cut to this many characters")
    args = p.parse_args()
    run = RunDir(args.run)
    ensure_router(run)
    docs = read_documents(run.corpus_path, split="heldout", columns=["text"]).column("text").to_pylist()
    rng = np.random.default_rng(0)
    texts = [docs[i][: args.eval_chars] for i in np.sort(rng.permutation(len(docs))[: args.docs])]
    systems = {name: Ensemble.load(run.root, router=name) for name in ("centroid", "prefix")}
    own = np.array([r[0][0] for r in systems["centroid"].route(texts, top_k=1)])  # each text's own cluster
    print(f"{run.root}: {len(texts)} held-out documents, {systems['centroid'].n_experts} experts")
    print(f"{'router':<9} " + " ".join(f"{n:>6}" for n in LENGTHS) + f" {'ppl top-1':>10} {'ppl top-2':>10}")
    ppl = {}
    for name, ens in systems.items():
        agree = agreement(ens, texts, own)
        ppl[name], plan = perplexities(ens, texts)
        print(f"{name:<9} " + " ".join(f"{agree[n]:>6.3f}" for n in LENGTHS) + f" {ppl[name][0]:>10.2f} "
              f"{ppl[name][1]:>10.2f}")
        if name == "prefix":
            print(f"  prefix router >= 0.90 at 16 tokens: {'met' if agree[16] >= 0.90 else 'MISSED'} "
                  f"({agree[16]:.3f}); >= 0.95 at 32: {'met' if agree[32] >= 0.95 else 'MISSED'} ({agree[32]:.3f})")
    oracle = own_expert_perplexity(plan, own)
    print(f"{'oracle':<9} " + " ".join(f"{'-':>6}" for _ in LENGTHS) + f" {oracle:>10.2f} {'-':>10}"
          "  (each document's own cluster's expert alone)")
    gain = 1 - ppl["prefix"][0] / ppl["centroid"][0]
    print(f"  top-1 perplexity with the prefix router {relative(gain)} centroid routing: "
          f"{'met' if gain >= 0.03 else 'MISSED'} (target >= 3% below); the oracle: "
          f"{relative(1 - oracle / ppl['centroid'][0])}")


def relative(gain: float) -> str:
    """``0.028`` -> "2.8% below", ``-0.008`` -> "0.8% above"."""
    return f"{100 * abs(gain):.1f}% {'below' if gain >= 0 else 'above'}"


if __name__ == "__main__":
    main()
