"""Benchmark the sparse ensemble's generation: the stacked backend against the sequential engine and against the
routed expert's own `model.generate`, all measured in this process and run.

    python bench/generate.py [--run runs/demo] [--run8 runs/bench8] [--tokens 64] [--repeats 3]

Per run (the demo run and an 8-expert run of the 8m preset, built here if missing), batch 1, greedy,
``--tokens`` new tokens, systems interleaved prompt by prompt (best of ``--repeats``):
  * tokens/s of `Ensemble.generate` at top_k = 1, 2, 4 with the stacked backend and with the sequential one;
  * the cost of top-2 and top-4 relative to top-1 (targets: <= 1.3x and <= 2.4x with stacking), and of the
    evidence reweighting (the stacked backend with `evidence_weight=0` beside it);
  * top-1 against the routed expert's own `model.generate` (target >= 1.0x, aim 1.2x) and identical greedy text;
  * peak RSS with every expert of the 8-expert run resident, stacked vs sequential (subprocesses: the stacked
    weights are not held twice).
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


def hf_generate(ens, expert: int, prompt: str, tokens: int):
    import torch

    model, tok = ens.expert_model(expert), ens.tokenizer
    ids = torch.tensor([[tok.eos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), out.shape[1] - ids.shape[1]


def measure(stacked, sequential, plain, tokens: int, repeats: int) -> dict:
    """Best time per prompt of every system, interleaved so that load from other processes hits all alike;
    ``plain``: the stacked backend with evidence reweighting off (what the evidence costs)."""
    ks = [k for k in (1, 2, 4) if k <= stacked.n_experts]
    backends = (("stacked", stacked), ("sequential", sequential), ("stacked, no evidence", plain))
    systems = {(b, k): e for b, e in backends for k in ks}
    best = {name: [float("inf")] * len(PROMPTS) for name in [*systems, "hf"]}
    counts = {name: [1] * len(PROMPTS) for name in best}
    same = True
    for _ in range(repeats):
        for i, prompt in enumerate(PROMPTS):
            texts = {}
            for (backend, k), ens in systems.items():
                start = time.perf_counter()
                texts[(backend, k)] = ens.generate(prompt, max_new_tokens=tokens, top_k=k)
                best[(backend, k)][i] = min(best[(backend, k)][i], time.perf_counter() - start)
                counts[(backend, k)][i] = max(1, len(ens.encode(texts[(backend, k)])))
            start = time.perf_counter()
            hf_text, n = hf_generate(sequential, stacked.route(prompt, top_k=1)[0][0], prompt, tokens)
            best["hf"][i] = min(best["hf"][i], time.perf_counter() - start)
            counts["hf"][i] = max(1, n)
            same &= hf_text == texts[("stacked", 1)] and all(texts[("stacked", k)] == texts[("sequential", k)]
                                                             for k in ks)
    rate = {name: sum(counts[name]) / sum(best[name]) for name in best}
    return {"rate": rate, "ks": ks, "identical": same}


def rss_child(run_dir: str, mode: str) -> None:
    """Peak RSS with every expert resident: ``mode`` sequential | stacked (one batch using every expert: the
    stack itself) | stacked-subset (then one prompt at top-2: its two experts' weights gathered once)."""
    from ensemble import Ensemble

    ens = Ensemble.load(run_dir, backend=mode.split("-")[0])
    ens.generate(PROMPTS, max_new_tokens=8, top_k=ens.n_experts)  # every expert resident, all in one batch
    if mode.endswith("subset"):
        ens.generate(PROMPTS[0], max_new_tokens=8, top_k=2)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "loaded": sum(e["loaded"] for e in ens.experts)}))


def ensure_run(run_dir: Path, clusters: int, preset: str | None) -> None:
    if (run_dir / "DONE").exists():
        return
    extra = ["--set", f"seed.model=preset:{preset}", "--set", "train.steps=30"] if preset else []
    subprocess.run([sys.executable, "-m", "flows.cli", "run", "--clusters", str(clusters), "--out", str(run_dir),
                    *extra], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def report(name: str, result: dict) -> None:
    rate, ks = result["rate"], result["ks"]
    print(f"\n{name}: batch 1, greedy")
    print(f"{'system':<34} {'tokens/s':>10} {'cost vs top-1':>14}")
    for backend in ("stacked", "sequential", "stacked, no evidence"):
        for k in ks:
            cost = rate[(backend, 1)] / rate[(backend, k)]
            print(f"{backend + f' top_k={k}':<34} {rate[(backend, k)]:>10.1f} {cost:>13.2f}x")
    print(f"{'routed expert model.generate':<34} {rate['hf']:>10.1f}")
    print(f"top-1 stacked / model.generate: {rate[('stacked', 1)] / rate['hf']:.2f}x (target >= 1.0x, aim 1.2x); "
          f"stacked / sequential at top-2: {rate[('stacked', 2)] / rate[('sequential', 2)]:.2f}x")
    for k in ks[1:]:
        print(f"  evidence reweighting at top-{k}: {rate[('stacked, no evidence', k)] / rate[('stacked', k)]:.2f}x "
              "the time without it")
    targets = {2: 1.3, 4: 2.4}
    for k in ks[1:]:
        cost = rate[("stacked", 1)] / rate[("stacked", k)]
        print(f"  top-{k} cost {cost:.2f}x: {'met' if cost <= targets[k] else 'MISSED'} (target <= {targets[k]}x)")
    print(f"identical greedy text (stacked = sequential = model.generate): {result['identical']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--run8", default="runs/bench8", help="an 8-expert run of the 8m preset (built if missing)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        return rss_child(*args.rss_child)
    import torch

    from ensemble import Ensemble

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    for run, clusters, preset in ((Path(args.run), 6, None), (Path(args.run8), 8, "8m")):
        ensure_run(run, clusters, preset)
        stacked, sequential = Ensemble.load(run, backend="stacked"), Ensemble.load(run, backend="sequential")
        plain = Ensemble.load(run, backend="stacked", evidence_weight=0)
        report(f"{run} ({stacked.n_experts} experts, evidence weight {stacked.evidence.weight:g})",
               measure(stacked, sequential, plain, args.tokens, args.repeats))
    for mode in ("sequential", "stacked", "stacked-subset"):
        out = subprocess.run([sys.executable, __file__, "--rss-child", args.run8, mode], capture_output=True,
                             text=True, check=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"peak RSS, {args.run8}, every expert resident, {mode:<15}: {result['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
