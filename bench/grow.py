"""Growing a run (`cbtm add`) against rebuilding it: quality and cost side by side.

    python bench/grow.py                        # the demo corpus: build on 4 domains, add the other 2
    python bench/grow.py --old cooking,law,football --budget 400000

1. `cbtm run` on the documents of the ``--old`` domains (k = their number) at ``--budget`` training tokens.
2. A copy of it grown with `cbtm add` by the documents of every other domain (``--new-clusters auto``).
3. A full rebuild with `cbtm run` on all documents (k = all domains) at the grown run's total training tokens.

Held-out documents (the corpus's own hash split, the same in every run) of the old and of the new domains are
scored by each system with top-1 and top-2 (routing from the preceding context). Prints one table with
perplexities, training tokens and wall time; writes ``OUT/grow.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ground.rundir import RunDir  # noqa: E402

DEMO = ROOT / "data" / "demo" / "corpus.jsonl"


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, default=DEMO, help="JSONL with text and domain fields (default: demo)")
    p.add_argument("--domain-field", default="domain")
    p.add_argument("--old", default="cooking,astronomy,football,medicine", help="domains the first build sees")
    p.add_argument("--budget", type=int, default=614_400, help="training tokens of the first build (seed phase "
                   "included; default: the demo's 4 x 150 steps x 1,024 tokens)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "grow-bench")
    return p.parse_args(argv)


def _cbtm(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "cbtm"), *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _split(args) -> tuple[Path, Path, Path, list[str], list[str]]:
    rows = [json.loads(line) for line in args.corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    old = args.old.split(",")
    new = sorted({r[args.domain_field] for r in rows} - set(old))
    args.out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, keep in (("old", old), ("new", new), ("all", old + new)):
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if r[args.domain_field] in keep))
        paths.append(path)
    return (*paths, old, new)


def _score(run: Path, texts: dict[str, list[str]]) -> dict:
    from ensemble import Ensemble
    from flows.evaluate import evaluate_run

    ens = Ensemble.load(run, device="cpu")
    out = {}
    for part, items in texts.items():
        r = evaluate_run(ens, items, [1, 2], nearest=[0] * len(items), n_clusters=1, experts_alone=False)
        out[part] = {s["top_k"]: s["perplexity"] for s in r["systems"].values()}
    return out


def _heldout(run: Path, domain_field: str, old: list[str]) -> dict[str, list[str]]:
    import pyarrow.parquet as pq

    docs = pq.read_table(RunDir(run).corpus_path, columns=["text", "split", domain_field]).to_pylist()
    held = [d for d in docs if d["split"] == "heldout"]
    return {"old domains": [d["text"] for d in held if d[domain_field] in old],
            "new domains": [d["text"] for d in held if d[domain_field] not in old]}


def _tokens(run: Path) -> int:
    return RunDir(run).read_manifest().config["train"]["total_tokens"]


def main(argv=None) -> None:
    args = _args(argv)
    old_path, new_path, all_path, old, new = _split(args)
    base, grown, full = args.out / "base", args.out / "grown", args.out / "full"
    for path in (base, grown, full):
        shutil.rmtree(path, ignore_errors=True)
    common = ["--set", f"train.total_tokens={args.budget}"]
    seconds = {"base": _cbtm("run", "--corpus", str(old_path), "--out", str(base), "--clusters", str(len(old)),
                             *common)}
    shutil.copytree(base, grown)
    seconds["grown"] = _cbtm("add", str(grown), "--corpus", str(new_path), "--new-clusters", "auto")
    total = _tokens(grown)
    seconds["full"] = _cbtm("run", "--corpus", str(all_path), "--out", str(full), "--clusters",
                            str(len(old) + len(new)), "--set", f"train.total_tokens={total}")
    texts = _heldout(full, args.domain_field, old)
    rows = {"built on the old domains": (base, _tokens(base), seconds["base"]),
            "+ cbtm add of the new ones": (grown, total - _tokens(base), seconds["grown"]),
            "full rebuild on everything": (full, _tokens(full), seconds["full"])}
    results = {}
    print(f"old domains {old}, new {new}; held-out documents: "
          + ", ".join(f"{k} {len(v)}" for k, v in texts.items()))
    print("| system | experts | old top-1 | old top-2 | new top-1 | new top-2 | training tokens | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (run, tokens, secs) in rows.items():
        ppl = _score(run, texts)
        n = len(RunDir(run).read_manifest().experts)
        results[name] = {"perplexity": ppl, "tokens": tokens, "seconds": round(secs, 1), "experts": n}
        print(f"| {name} | {n} | {ppl['old domains'][1]:.2f} | {ppl['old domains'][2]:.2f} | "
              f"{ppl['new domains'][1]:.2f} | {ppl['new domains'][2]:.2f} | {tokens:,} | {secs:.0f} |")
    (args.out / "grow.json").write_text(json.dumps(results, indent=2) + "\n")
    b, g = results["built on the old domains"]["perplexity"], results["+ cbtm add of the new ones"]["perplexity"]
    print(f"new domains, top-2: {b['new domains'][2]:.2f} -> {g['new domains'][2]:.2f} after add (must fall); "
          f"old domains: {b['old domains'][2]:.2f} -> {g['old domains'][2]:.2f} (unchanged within noise)")


if __name__ == "__main__":
    main()
