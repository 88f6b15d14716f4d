"""Cluster quality against known labels: MiniLM + spherical k-means vs the c-BTM paper's tf-idf recipe.

    python bench/clusters.py            # 20newsgroups (k=20), bbc_news (k=5), dbpedia14_subset (k=14)
    python bench/clusters.py --corpora bbc_news --seeds 0,1,2
    python bench/clusters.py --corpora 20newsgroups --limit 3000
    python bench/clusters.py --limit 20newsgroups=3000 --slack 0.1,0.2   # per-corpus limit, two slacks

Reads the train split of each corpus in ../shared/data (gzip JSONL with id, text, label; nothing is copied
into the project). MiniLM vectors are cached as .npy in bench/.cache/ (git-ignored by its own .gitignore), so
a rerun only clusters. Methods, all on the same documents and seeds:

- default:  all-MiniLM-L6-v2 embeddings (cluster.embed.SentenceTransformerEmbedder) + SphericalKMeans
- tfidf:    the c-BTM paper's recipe: tf-idf -> TruncatedSVD(100) -> L2 -> scikit-learn KMeans
- balanced: the default's centroids with the capacity-constrained training assignment (slack 0.1; --slack
            takes several, one row each)

Prints NMI, ARI and purity (mean +- sd over the seeds) and the seconds each method's clustering took.
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

from cluster.balance import balanced_assignment  # noqa: E402
from cluster.kmeans import SphericalKMeans, balance_capacity  # noqa: E402
from cluster.report import label_quality  # noqa: E402

CORPORA = {"20newsgroups": 20, "bbc_news": 5, "dbpedia14_subset": 14}
CACHE = ROOT / "bench" / ".cache"


def load_train(data_dir: Path, name: str, limit: int | None, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """(ids, texts, labels) of the corpus's train split; a seeded random subset of ``limit`` documents if given."""
    path = data_dir / name / "train.jsonl.gz"
    if not path.exists():
        raise SystemExit(f"{path} not found: pass --data-dir pointing at the shared data folder")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    if limit and limit < len(records):
        keep = np.sort(np.random.default_rng(seed).choice(len(records), limit, replace=False))
        records = [records[i] for i in keep]
    return [r["id"] for r in records], [r["text"] for r in records], [r["label"] for r in records]


def minilm_vectors(name: str, ids: list[str], texts: list[str], batch_size: int) -> np.ndarray:
    """float32 [n, 384] unit MiniLM embeddings, cached under bench/.cache by corpus and document ids."""
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    key = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:12]
    path = CACHE / f"{name}-{len(ids)}-{key}-minilm.npy"
    if path.exists():
        return np.load(path)
    from cluster.embed import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder(batch_size=batch_size, device="cpu")
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths batch together
    out = np.empty((len(texts), embedder.dim), np.float32)
    start = time.perf_counter()
    for lo in range(0, len(order), 512):
        rows = order[lo:lo + 512]
        out[rows] = embedder.encode([texts[i] for i in rows])
        done = min(lo + 512, len(order))
        print(f"  embed {name}: {done}/{len(order)} ({done / (time.perf_counter() - start):.0f} docs/s)",
              file=sys.stderr, flush=True)
    np.save(path, out)
    return out


def tfidf_vectors(texts: list[str], seed: int) -> np.ndarray:
    """The paper's representation: tf-idf -> TruncatedSVD(100) -> L2-normalised rows, float32 [n, 100]."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    tfidf = TfidfVectorizer(sublinear_tf=True, stop_words="english", min_df=2, max_df=0.5).fit_transform(texts)
    svd = TruncatedSVD(n_components=min(100, tfidf.shape[1] - 1), random_state=seed).fit_transform(tfidf)
    return (svd / np.maximum(np.linalg.norm(svd, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def run_methods(minilm: np.ndarray, texts: list[str], k: int, seed: int, slacks: list[float]) -> dict:
    """Cluster labels int [n] and seconds per method for one seed."""
    from sklearn.cluster import KMeans

    out = {}
    start = time.perf_counter()
    model = SphericalKMeans(k, n_init=4, random_state=seed).fit(minilm)
    out["default"] = (model.labels_, time.perf_counter() - start)
    for slack in slacks:
        start = time.perf_counter()
        capacity = balance_capacity(len(minilm), k, slack)
        out[balanced_name(slack, slacks)] = (balanced_assignment(model.transform(minilm), capacity),
                                              time.perf_counter() - start)
    start = time.perf_counter()
    lsa = tfidf_vectors(texts, seed)
    out["tfidf"] = (KMeans(k, n_init=4, random_state=seed).fit(lsa).labels_, time.perf_counter() - start)
    return out


def balanced_name(slack: float, slacks: list[float]) -> str:
    return "balanced" if len(slacks) == 1 else f"balanced (slack {slack:g})"


def parse_limits(spec: str | None, names: list[str]) -> dict:
    """--limit N (every corpus) or NAME=N,NAME=N (per corpus) -> {name: N or None}."""
    if not spec:
        return {name: None for name in names}
    if "=" not in spec:
        return {name: int(spec) for name in names}
    pairs = dict(item.split("=", 1) for item in spec.split(","))
    return {name: int(pairs[name]) if name in pairs else None for name in names}


def fmt(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def bench_corpus(data_dir: Path, name: str, limit: int | None, seeds: list[int], slacks: list[float],
                 batch_size: int) -> list[dict]:
    ids, texts, labels = load_train(data_dir, name, limit)
    k = CORPORA[name]
    start = time.perf_counter()
    minilm = minilm_vectors(name, ids, texts, batch_size)
    print(f"{name}: {len(ids)} documents, {len(set(labels))} labels, k={k}; MiniLM vectors in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    methods = ["default", "tfidf"] + [balanced_name(s, slacks) for s in slacks]
    scores: dict = {m: {"nmi": [], "ari": [], "purity": [], "seconds": []} for m in methods}
    for seed in seeds:
        for method, (pred, seconds) in run_methods(minilm, texts, k, seed, slacks).items():
            q = label_quality(labels, pred)
            for key in ("nmi", "ari", "purity"):
                scores[method][key].append(q[key])
            scores[method]["seconds"].append(seconds)
    return [{"corpus": name, "docs": len(ids), "k": k, "method": m, **s} for m, s in scores.items()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpora", default=",".join(CORPORA), help=f"comma-separated, from {', '.join(CORPORA)}")
    p.add_argument("--limit", default=None,
                   help="a seeded random subset of N training documents: N, or NAME=N,NAME=N per corpus")
    p.add_argument("--seeds", default="0,1,2", help="clustering seeds (comma-separated)")
    p.add_argument("--slack", default="0.1", help="balance slack(s), comma-separated")
    p.add_argument("--batch-size", type=int, default=32, help="MiniLM encoding batch size")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--threads", type=int, default=None, help="torch/BLAS threads (default: all)")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.corpora.split(",") if c.strip()]
    unknown = [c for c in names if c not in CORPORA]
    if unknown:
        raise SystemExit(f"unknown corpus {unknown[0]!r}: choose from {', '.join(CORPORA)}")
    from threadpoolctl import threadpool_limits

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    slacks = [float(s) for s in args.slack.split(",")]
    limits = parse_limits(args.limit, names)
    rows = []
    with threadpool_limits(args.threads):
        for name in names:
            rows += bench_corpus(args.data_dir, name, limits[name], seeds, slacks, args.batch_size)
    print(f"\nseeds {args.seeds}; NMI / ARI / purity against the corpus labels (mean ± sd over seeds)\n")
    print("| corpus | docs | k | method | NMI | ARI | purity | seconds |\n|---|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['corpus']} | {r['docs']:,} | {r['k']} | {r['method']} | {fmt(r['nmi'])} | {fmt(r['ari'])} | "
              f"{fmt(r['purity'])} | {np.mean(r['seconds']):.1f} |")
    by = {(r["corpus"], r["method"]): float(np.mean(r["nmi"])) for r in rows}
    for name in names:
        d, t, b = by[(name, "default")], by[(name, "tfidf")], by[(name, balanced_name(slacks[0], slacks))]
        print(f"{name}: default {'beats' if d > t else 'does NOT beat'} tf-idf by {d - t:+.3f} NMI; "
              f"balancing (slack {slacks[0]:g}) costs {d - b:+.3f} NMI "
              f"({'within' if d - b <= 0.02 else 'ABOVE'} the 0.02 target)")


if __name__ == "__main__":
    main()
