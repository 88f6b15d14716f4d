"""Long documents: scoring cost against text length, and peak memory of a 50 MB document through training.

    python bench/long_text.py [--run runs/demo] [--lengths 10000,30000,100000,300000] [--huge-mb 50]

1. `Ensemble.score` of one text of each length (characters of the demo corpus joined): seconds, and seconds per
   1,000 characters, which stays flat when the cost is linear in the length (routing embeds one context of at
   most 256 tokens per 32-token window; every expert scores the text in segments of the context length).
2. `cbtm run --until train` on a corpus holding one document of ``--huge-mb`` MB (plus 60 small ones), in a
   subprocess: peak RSS (documents longer than 100,000 characters are tokenized in pieces; the result is the
   same token ids).
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def scoring(run: str, lengths: list[int]) -> None:
    from ensemble import Ensemble

    ens = Ensemble.load(run)
    text = " ".join(json.loads(line)["text"] for line in (ROOT / "data/demo/corpus.jsonl").open())
    while len(text) < max(lengths):
        text += " " + text
    ens.score(text[:2000])  # load the embedder and the experts
    print(f"{'characters':>10} {'tokens':>8} {'seconds':>8} {'s per 1k chars':>15}")
    for n in lengths:
        start = time.perf_counter()
        ens.score(text[:n])
        seconds = time.perf_counter() - start
        print(f"{n:>10,} {len(ens.encode(text[:n])):>8,} {seconds:>8.2f} {1000 * seconds / n:>15.3f}")


def huge_document(mb: int) -> None:
    rng = random.Random(0)
    words = "bread dough oven star galaxy goal court patient code data".split()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "huge.jsonl"
        with corpus.open("w") as fh:
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(mb * 180_000))}) + "\n")
            for i in range(60):
                fh.write(json.dumps({"text": f"small document {i} " + " ".join(rng.choice(words) for _ in range(99))})
                         + "\n")
        cmd = [sys.executable, "-m", "flows.cli", "run", "--corpus", str(corpus), "--out", str(Path(tmp) / "run"),
               "--clusters", "2", "--set", "train.steps=5", "--set", "embed.kind=tfidf", "--until", "train"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"one {corpus.stat().st_size / 1e6:.0f} MB document + 60 small ones, `cbtm run --until train` "
              f"(tf-idf embedder): peak RSS {peak:.0f} MB, {time.perf_counter() - start:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--lengths", default="10000,30000,100000,300000")
    p.add_argument("--huge-mb", type=int, default=50)
    args = p.parse_args()
    scoring(args.run, [int(x) for x in args.lengths.split(",")])
    huge_document(args.huge_mb)


if __name__ == "__main__":
    main()
