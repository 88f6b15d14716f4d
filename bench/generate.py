"""Benchmark the sparse ensemble's generation against the chosen expert's own `model.generate`.

    python bench/generate.py [--run runs/demo] [--tokens 64] [--rss-run runs/bench8]

Prints, all measured in this process and run:
  * tokens/s of `Ensemble.generate(top_k=1)` vs the routed expert's `transformers` `model.generate`
    (greedy, KV cache, same prompt and length; target >= 0.9x), and whether the texts are identical;
  * per-token cost of top_k = 2 and 4 relative to top_k = 1 (target <= 1.1 * k);
  * routing latency per prompt (embedding + distances + top-k);
  * peak RSS of scoring with every expert of an 8-expert run loaded vs `max_loaded_experts=2` (subprocesses).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ["Bread dough should rise", "The goalkeeper", "The court ruled that", "The telescope",
           "The patient was given", "The compiler reports"]


def timed(fn, repeats: int = 3):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def hf_generate(ens, expert: int, prompt: str, tokens: int):
    import torch

    model, tok = ens.expert_model(expert), ens.tokenizer
    ids = torch.tensor([[tok.eos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), out.shape[1] - ids.shape[1]


def speed(ens, tokens: int, repeats: int = 3) -> list[tuple]:
    """Interleaved timing (each system once per prompt per round, best round kept), so that load from other
    processes hits every system alike."""
    systems = {f"ensemble top_k={k}": k for k in (1, 2, 4) if k <= ens.n_experts}
    best: dict[str, list[float]] = {name: [float("inf")] * len(PROMPTS) for name in [*systems, "hf"]}
    counts: dict[str, list[int]] = {name: [0] * len(PROMPTS) for name in best}
    same = True
    for _ in range(repeats):
        for i, prompt in enumerate(PROMPTS):
            for name, top_k in systems.items():
                start = time.perf_counter()
                text = ens.generate(prompt, max_new_tokens=tokens, top_k=top_k)
                best[name][i] = min(best[name][i], time.perf_counter() - start)
                counts[name][i] = max(1, len(ens.tokenizer(text, add_special_tokens=False)["input_ids"]))
                if top_k == 1:
                    top1 = text
            expert = ens.route(prompt, top_k=1)[0][0]
            start = time.perf_counter()
            hf_text, n = hf_generate(ens, expert, prompt, tokens)
            best["hf"][i] = min(best["hf"][i], time.perf_counter() - start)
            counts["hf"][i] = max(1, n)
            same &= hf_text == top1
    rate = {name: sum(counts[name]) / sum(best[name]) for name in best}
    first = next(iter(systems))
    rows = [(name, rate[name], rate[first] / rate[name]) for name in systems]
    rows.insert(1, ("expert's own model.generate", rate["hf"], None))
    rows.append(("top_k=1 / model.generate", rate[first] / rate["hf"], None))
    rows.append(("identical greedy text", float(same), None))
    return rows


def routing_latency(ens) -> float:
    ens.route(PROMPTS[0])  # load the embedder
    t, _ = timed(lambda: [ens.route(p) for p in PROMPTS], repeats=5)
    return t / len(PROMPTS) * 1000


def rss_child(run_dir: str, max_loaded: int | None) -> None:
    from ensemble import Ensemble

    ens = Ensemble.load(run_dir, max_loaded_experts=max_loaded)
    ens.perplexity(PROMPTS * 2, top_k=ens.n_experts)  # touches every expert
    loaded = sum(e["loaded"] for e in ens.experts)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loaded": loaded}))


def ensure_run(run_dir: Path, clusters: int) -> None:
    if (run_dir / "DONE").exists():
        return
    subprocess.run([sys.executable, "-m", "flows.cli", "run", "--clusters", str(clusters), "--out", str(run_dir),
                    "--set", "train.steps=30", "--set", "seed.model=preset:8m"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rss-run", default="runs/bench8", help="an 8-expert run (built here if missing)")
    p.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], None if args.rss_child[1] == "all" else int(args.rss_child[1]))
        return
    import torch

    from ensemble import Ensemble

    ensure_run(Path(args.run), 6)
    ens = Ensemble.load(args.run)
    print(f"run {args.run}: {ens.n_experts} experts, torch threads {torch.get_num_threads()}, {args.tokens} new tokens")
    print(f"{'system':<32} {'tokens/s':>10} {'cost vs top-1':>14}")
    for name, value, rel in speed(ens, args.tokens):
        print(f"{name:<32} {value:>10.2f} {'' if rel is None else f'{rel:>13.2f}x'}")
    print(f"routing latency per prompt: {routing_latency(ens):.1f} ms")
    ensure_run(Path(args.rss_run), 8)
    for max_loaded in ("all", "2"):
        out = subprocess.run([sys.executable, __file__, "--rss-child", args.rss_run, max_loaded], capture_output=True,
                             text=True, check=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"peak RSS, 8 experts, max_loaded_experts={max_loaded:<4}: {result['peak_rss_mb']:.0f} MB "
              f"({result['loaded']} resident at the end)")


if __name__ == "__main__":
    main()
