"""Cluster quality against known labels, per embedder, and cbtm's k-means against scikit-learn's on the same vectors.

    python bench/clusters.py                                   # the six labelled corpora, seeds 0,1,2
    python bench/clusters.py --corpora bbc_news --weights 0.3,0.5,0.7
    python bench/clusters.py --embed-only                      # compute and cache the MiniLM vectors

Reads each corpus of ../shared/data (gzip JSONL with id, text, label; AG News: its test split, the others their
train split; nothing is copied into the project). Embeddings, all by cbtm's own embedders:

- tfidf:   `cluster.tfidf.TfidfEmbedder` (tf-idf -> TruncatedSVD(100) -> L2, the c-BTM paper's recipe)
- minilm:  all-MiniLM-L6-v2 (`cluster.minilm.SentenceTransformerEmbedder`), cached in bench/.cache/
- hybrid:  both blocks unit-normalised, the sentence block weighted w (`cluster.hybrid`), for each --weights w

Each embedding is clustered by cbtm's `SphericalKMeans` (the defaults: n_init 10, k-means++) and by
scikit-learn `KMeans(n_init=10)` on the same unit vectors, k = the number of labels, for every seed. Prints NMI
(mean ± sd over the seeds) and the targets: hybrid >= max(tfidf, minilm) - 0.005 on every corpus, cbtm's
k-means >= scikit-learn's on the same vectors.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cluster.hybrid import HybridEmbedder  # noqa: E402
from cluster.kmeans import SphericalKMeans  # noqa: E402
from cluster.report import label_quality  # noqa: E402
from cluster.tfidf import TfidfEmbedder  # noqa: E402

CORPORA = {"20newsgroups": "train", "bbc_news": "train", "dbpedia14_subset": "train", "ag_news": "test",
           "brown": "train", "masc": "train"}
CACHE = ROOT / "bench" / ".cache"


def load(data_dir: Path, name: str, limit: int | None) -> tuple[list[str], list[str], list[str]]:
    """(ids, texts, labels) of the corpus's split; a seeded random subset of ``limit`` documents if given."""
    path = data_dir / name / f"{CORPORA[name]}.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    if limit and limit < len(records):
        keep = np.sort(np.random.default_rng(0).choice(len(records), limit, replace=False))
        records = [records[i] for i in keep]
    return [r["id"] for r in records], [r["text"] for r in records], [r["label"] for r in records]


def minilm_vectors(name: str, ids: list[str], texts: list[str]) -> np.ndarray:
    """float32 [n, 384] unit MiniLM embeddings, cached under bench/.cache by corpus and document ids."""
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    key = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:12]
    path = CACHE / f"{name}-{len(ids)}-{key}-minilm.npy"
    if path.exists():
        return np.load(path)
    from cluster.embed import encode_length_sorted
    from cluster.minilm import SentenceTransformerEmbedder

    start = time.perf_counter()
    out = encode_length_sorted(SentenceTransformerEmbedder(device="cpu"), texts)
    print(f"  {name}: MiniLM vectors of {len(texts)} documents in {time.perf_counter() - start:.0f} s",
          file=sys.stderr, flush=True)
    np.save(path, out)
    return out


class _Fixed:
    """An 'embedder' that returns precomputed vectors (to compose a HybridEmbedder from cached blocks)."""

    def __init__(self, vectors):
        self.vectors, self.dim = vectors, vectors.shape[1]

    def encode(self, texts):
        return self.vectors


def embeddings(name: str, ids, texts, weights: list[float]) -> dict[str, np.ndarray]:
    minilm = minilm_vectors(name, ids, texts)
    tfidf = TfidfEmbedder.fit(texts, 100).encode(texts)
    out = {"tfidf": tfidf, "minilm": minilm}
    for w in weights:
        out[f"hybrid w={w:g}"] = HybridEmbedder(_Fixed(minilm), _Fixed(tfidf), w).encode(texts)
    return out


def cluster_both(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(cbtm SphericalKMeans labels with its defaults, sklearn KMeans(n_init=10) labels) on unit rows x."""
    from sklearn.cluster import KMeans

    ours = SphericalKMeans(k, random_state=seed).fit(x).labels_
    theirs = KMeans(k, n_init=10, random_state=seed).fit(x).labels_
    return ours, theirs


def fmt(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def bench_corpus(data_dir: Path, name: str, limit, seeds: list[int], weights: list[float]) -> dict:
    ids, texts, labels = load(data_dir, name, limit)
    k = len(set(labels))
    scores = {}
    for rep, x in embeddings(name, ids, texts, weights).items():
        ours, theirs = [], []
        for seed in seeds:
            a, b = cluster_both(x, k, seed)
            ours.append(label_quality(labels, a)["nmi"])
            theirs.append(label_quality(labels, b)["nmi"])
        scores[rep] = (ours, theirs)
        print(f"  {name} {rep}: cbtm {fmt(ours)}, sklearn {fmt(theirs)}", file=sys.stderr, flush=True)
    return {"corpus": name, "docs": len(ids), "k": k, "scores": scores}


def report(results: list[dict], weights: list[float]) -> None:
    reps = ["tfidf", "minilm", *(f"hybrid w={w:g}" for w in weights)]
    print("\nNMI against the labels, mean ± sd over the seeds; cbtm's spherical k-means (sklearn KMeans(n_init=10) "
          "on the same vectors in brackets)\n")
    print("| corpus | docs | k | " + " | ".join(reps) + " |\n|---|---:|---:|" + "---:|" * len(reps))
    for r in results:
        cells = [f"{fmt(r['scores'][p][0])} ({np.mean(r['scores'][p][1]):.3f})" for p in reps]
        print(f"| {r['corpus']} | {r['docs']:,} | {r['k']} | " + " | ".join(cells) + " |")
    for w in weights:
        hyb = f"hybrid w={w:g}"
        short = [r["corpus"] for r in results if np.mean(r["scores"][hyb][0]) <
                 max(np.mean(r["scores"]["tfidf"][0]), np.mean(r["scores"]["minilm"][0])) - 0.005]
        print(f"{hyb} >= max(tfidf, minilm) - 0.005: " + ("met on every corpus" if not short else
                                                         f"MISSED on {', '.join(short)}"))
    worse = [(r["corpus"], p) for r in results for p in reps
             if np.mean(r["scores"][p][0]) < np.mean(r["scores"][p][1]) - 0.005]
    print("cbtm k-means >= sklearn KMeans(n_init=10) - 0.005 on the same vectors: " +
          ("met everywhere" if not worse else f"MISSED on {worse}"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpora", default=",".join(CORPORA))
    p.add_argument("--limit", type=int, default=None, help="a seeded random subset of N documents per corpus")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--weights", default="0.3,0.55,0.7", help="hybrid weights of the sentence block")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--embed-only", action="store_true", help="compute and cache the MiniLM vectors, then stop")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.corpora.split(",") if c.strip()]
    if args.embed_only:
        for name in names:
            ids, texts, _ = load(args.data_dir, name, args.limit)
            minilm_vectors(name, ids, texts)
        return
    weights = [float(w) for w in args.weights.split(",")]
    results = [bench_corpus(args.data_dir, n, args.limit, [int(s) for s in args.seeds.split(",")], weights)
               for n in names]
    report(results, weights)


if __name__ == "__main__":
    main()
