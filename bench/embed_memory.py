"""Peak memory of ingest + embed at two corpus sizes: it should not grow with the corpus.

For each size N, a synthetic corpus of N unique short documents is written to a temporary directory
(4 random sentences of the demo corpus, data/demo, plus a serial number that makes each unique); then one
fresh subprocess runs the ingest stage and another the embed stage, and each reports its peak RSS
(``ru_maxrss``: it counts the cached pages of memory-mapped files too) and the peak of its anonymous
(not file-backed) RSS, sampled. The default embedder is tf-idf with a fixed fit sample
(``--tfidf-sample``), so the fit costs the same at every size and only the streamed part scales.

    python bench/embed_memory.py                                   # 10,000 vs 100,000 documents, tf-idf
    python bench/embed_memory.py --kind sentence-transformers --sizes 1000,10000
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo" / "corpus.jsonl"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated corpus sizes")
    parser.add_argument("--kind", default="tfidf", choices=["tfidf", "sentence-transformers"])
    parser.add_argument("--tfidf-sample", type=int, default=10_000, help="tf-idf fit sample (the same at every size)")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--child", nargs=3, metavar=("STAGE", "CORPUS", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args()


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class AnonPeak:
    """Samples RssAnon of /proc/self/status every 10 ms: the part of RSS that is not file-backed pages
    (memory-mapped Arrow/Parquet/npy files count in RSS while their pages are cached)."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]) / 1024)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def write_corpus(path: Path, n: int) -> None:
    """N unique documents of 4 demo sentences each (about 400 characters), streamed to JSON Lines."""
    sentences = []
    for line in DEMO.read_text(encoding="utf-8").splitlines():
        sentences += [s.strip() + "." for s in json.loads(line)["text"].split(". ") if len(s) > 20]
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            text = " ".join(rng.sample(sentences, 4)) + f" Note {i}."
            fh.write(json.dumps({"text": text}) + "\n")


def child(args: argparse.Namespace) -> None:
    """Run one stage (ingest or embed) in this fresh process; print one JSON line: seconds and peak RSS."""
    import sklearn.decomposition  # noqa: F401  (imported up front: the baseline holds the libraries)
    import sklearn.feature_extraction.text  # noqa: F401

    from cluster.config import CorpusConfig, EmbedConfig
    from cluster.corpus import ingest_corpus
    from cluster.embed import embed_corpus

    stage, corpus, out = args.child[0], Path(args.child[1]), Path(args.child[2])
    report = {"after_imports": peak_mib()}
    anon = AnonPeak()
    start = time.perf_counter()
    if stage == "ingest":
        ingest_corpus(CorpusConfig(path=str(corpus)), out / "docs.parquet")
    else:
        cfg = EmbedConfig(kind=args.kind, tfidf_sample=args.tfidf_sample, shard_size=args.shard_size)
        embed_corpus(cfg, out / "docs.parquet", out / "emb")
        report["shards_mib"] = sum(p.stat().st_size for p in (out / "emb").glob("shard-*.npy")) / 2**20
    report.update(seconds=time.perf_counter() - start, peak=peak_mib(), anon_peak=anon.stop())
    print("RESULT " + json.dumps(report))


def run_child(stage: str, corpus: Path, out: Path, args: argparse.Namespace, tmp: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, str(corpus), str(out), "--kind", args.kind,
           "--tfidf-sample", str(args.tfidf_sample), "--shard-size", str(args.shard_size)]
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp / "hf-datasets"), PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{stage} of {corpus.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def measure(n: int, args: argparse.Namespace, tmp: Path) -> dict:
    corpus = tmp / f"corpus-{n}.jsonl"
    write_corpus(corpus, n)
    ingest = run_child("ingest", corpus, tmp / f"run-{n}", args, tmp)
    embed = run_child("embed", corpus, tmp / f"run-{n}", args, tmp)
    return {"n": n, "corpus_mib": corpus.stat().st_size / 2**20, "ingest": ingest, "embed": embed}


def print_table(results: list[dict], args: argparse.Namespace) -> None:
    fit = f", tf-idf fit sample {args.tfidf_sample}" if args.kind == "tfidf" else ""
    print(f"\nembed.kind={args.kind}{fit}, shard size {args.shard_size}; each stage in a fresh process; MiB: "
          "peak RSS (ru_maxrss, includes file-backed pages of memory-mapped files) / peak anonymous RSS "
          "(RssAnon sampled every 10 ms); baseline = peak RSS after imports\n")
    print("| documents | corpus MiB | shards MiB | ingest s | ingest peak RSS / anon | embed s | "
          "embed peak RSS / anon | baseline |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        i, e = r["ingest"], r["embed"]
        print(f"| {r['n']:,} | {r['corpus_mib']:.1f} | {e['shards_mib']:.1f} | {i['seconds']:.1f} | "
              f"{i['peak']:.0f} / {i['anon_peak']:.0f} | {e['seconds']:.1f} | {e['peak']:.0f} / {e['anon_peak']:.0f} | "
              f"{e['after_imports']:.0f} |")


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    tmp = Path(tempfile.mkdtemp(prefix="cbtm-bench-memory-"))
    try:
        print_table([measure(int(n), args, tmp) for n in args.sizes.split(",")], args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
