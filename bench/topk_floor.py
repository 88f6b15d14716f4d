"""How close can any choice of k experts come to all experts? The floor under "top-2 within 2% of all".

    python bench/topk_floor.py runs/paper/20newsgroups/run --corpus 20newsgroups   # bench/paper.py's largest k

Scores the test documents `bench/paper.py` scores (its seeded sample of ``--corpus``'s test split) with every
expert of RUN once, then mixes the same per-token probabilities, at the run's tuned T and with its evidence
reweighting (`ensemble.evidence`), under three choices of the k experts a token may use:

- **routed** — the run's router, once per routing window: what `cbtm eval` and `bench/paper.py` report;
- **best per window** — at each window's first token, the k experts the all-experts mixture weighs most there
  (router weight × evidence of every expert), kept to the window's end;
- **best per token** — the same choice at every token.

The best choices read every expert's probabilities of the tokens before, so they are not systems that run k
experts: they show what a router could reach with these experts if it knew, for free, the evidence that only
running every expert gives. Tokens of a text's first window use every expert, weighted as routed, in
all three, as in `ensemble.scoring`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.paper import SHARED, test_texts  # noqa: E402
from ensemble import Ensemble  # noqa: E402
from ensemble.evidence import Evidence  # noqa: E402
from ensemble.scoring import mix  # noqa: E402
from ground.progress import ProgressCallback  # noqa: E402


def best_choice(weights: np.ndarray, logps: np.ndarray, evidence: Evidence, top_k: int,
                spans: list[tuple[int, int]], per_token: bool = False) -> np.ndarray:
    """Routing weights float64 [n_tokens, n_experts] kept, on the tokens of the routing windows ``spans``
    [(start, end)], on the ``top_k`` experts that the evidence posterior (``evidence.reweigh`` of the all-experts
    ``weights`` by ``logps`` [n_tokens, n_experts]) weighs most at the window's first token (``per_token``: at
    each token), renormalised. Tokens outside ``spans`` (a text's first window) keep every expert."""
    w = np.asarray(weights, dtype=np.float64)
    keep = np.ones_like(w, dtype=bool)
    if spans:
        posterior = evidence.reweigh(w, evidence.scores(logps))
        rows = np.concatenate([np.arange(s, e) for s, e in spans])
        choose_at = rows if per_token else np.concatenate([np.full(e - s, s) for s, e in spans])
        order = np.argsort(-posterior[choose_at], axis=1, kind="stable")[:, :top_k]
        keep[rows] = False
        keep[rows[:, None], order] = True
    out = np.where(keep, w, 0.0)
    return out / out.sum(axis=1, keepdims=True)


def perplexity(logps: list[np.ndarray]) -> float:
    return float(np.exp(-np.concatenate(logps).mean()))


def floors(ens: Ensemble, texts: list[str], top_ks: list[int]) -> list[dict]:
    """Per k: the routed, best-per-window and best-per-token perplexity of ``texts`` (one expert pass for all)."""
    bar = ProgressCallback("routing windows", unit="window")
    plan = ens.scoring(texts, on_progress=bar)
    bar.close()
    T, n = ens.route_temperature, ens.n_experts
    every = plan.weights(n, T)
    per_text = plan.logprobs(every)
    experts = sorted(per_text[0])
    stacked = [np.stack([lp[e] for e in experts], axis=1) for lp in per_text]
    spans: list[list[tuple[int, int]]] = [[] for _ in texts]
    for ti, start, end in plan.owners:
        if start >= plan.view.config.route_window:  # the first window's early spans keep every expert
            spans[ti].append((start, end))
    rows = []
    for k in top_ks:
        chosen = {"routed": plan.weights(k, T)}
        for name, per_token in (("best per window", False), ("best per token", True)):
            chosen[name] = []
            for w, lp, sp in zip(every, stacked, spans):
                dense = np.zeros_like(w)
                dense[:, experts] = best_choice(w[:, experts], lp, ens.evidence, k, sp, per_token)
                chosen[name].append(dense)
        rows.append({"k": k, **{name: perplexity(mix(ws, per_text, ens.evidence)) for name, ws in chosen.items()}})
    rows.append({"k": n, "all experts": perplexity(mix(every, per_text, ens.evidence))})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--corpus", required=True, help="the folder of --data whose test split bench/paper.py scored")
    p.add_argument("--data", type=Path, default=SHARED)
    p.add_argument("--eval-docs", type=int, default=300)
    p.add_argument("--eval-chars", type=int, default=3000)
    p.add_argument("--ks", default="1,2,3", help="numbers of experts chosen per token")
    args = p.parse_args(argv)
    start = time.perf_counter()
    if not (args.data / args.corpus / "test.jsonl.gz").is_file():
        p.error(f"no test split {args.data / args.corpus / 'test.jsonl.gz'}: pass the corpus bench/paper.py scored "
                "(a folder of --data)")
    try:
        ens = Ensemble.load(args.run)
    except (OSError, ValueError) as err:  # IncompatibleRunError is a ValueError
        p.error(str(err))
    texts = test_texts(args.data, args.corpus, args.eval_docs, args.eval_chars)
    rows = floors(ens, texts, [int(k) for k in args.ks.split(",") if 0 < int(k) < ens.n_experts])
    every = rows.pop()["all experts"]
    print(f"\n{args.run}: {ens.n_experts} experts, T {ens.route_temperature:g}, evidence weight "
          f"{ens.evidence.weight:g}, {len(texts)} test documents of {args.corpus}; all experts {every:.2f}")
    print("\n| k | routed | vs all | best per window | vs all | best per token | vs all |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = " | ".join(f"{r[m]:.2f} | {r[m] / every - 1:+.1%}" for m in ("routed", "best per window",
                                                                           "best per token"))
        print(f"| {r['k']} | {cells} |")
    print(f"\n{time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
