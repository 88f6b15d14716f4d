"""Embedding throughput: the embed stage vs a bare `SentenceTransformer.encode`, and the tf-idf path.

Embeds the 20 Newsgroups training split (../shared/data/20newsgroups/train.jsonl.gz) after ingestion,
in one process: (1) through the stage (`embed_corpus`, sentence-transformers), (2) through a bare
`SentenceTransformer(path).encode(texts, batch_size=B)` of the same texts, (3) through the stage with
the tf-idf embedder (fit on the training sample + transform of every document; always the whole split,
as its fit is a fixed cost). Model loading is timed separately; each encoder is warmed up on a few
documents first; ``--repeat R`` keeps the best of R runs of the stage and of the bare call, and
``--pairs P`` times P parts of the documents through both back to back (on a machine whose load changes,
both then see the same load). Nothing is written outside a temporary directory, removed at the end.

    python bench/embed.py                 # all 11,314 documents
    python bench/embed.py --limit 2000    # a seeded random sample of 2,000 (sentence-transformers rows)
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "20newsgroups" / "train.jsonl.gz"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA,
                        help="gzip JSON Lines with id and text (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="embed a seeded random sample of N documents")
    parser.add_argument("--batch-size", type=int, default=32, help="the same for the stage and the bare call")
    parser.add_argument("--repeat", type=int, default=1, help="best of R runs of each (order alternates)")
    parser.add_argument("--pairs", type=int, default=1,
                        help="split the documents into P parts, each timed through the stage and the bare call "
                             "back to back (for a machine whose load changes); totals are compared")
    parser.add_argument("--skip-tfidf", action="store_true", help="leave out the tf-idf path")
    return parser.parse_args()


def prepare_corpus(args: argparse.Namespace, tmp: Path, limit: int | None) -> Path:
    """Ingest the data (or a seeded sample of ``limit`` documents) into tmp through the ingest stage."""
    import random

    from cluster.config import CorpusConfig
    from cluster.corpus import ingest_corpus

    source = args.data
    if limit:
        with gzip.open(args.data, "rt", encoding="utf-8") as fh:
            lines = fh.readlines()
        lines = random.Random(0).sample(lines, min(limit, len(lines)))
        source = tmp / f"sample-{limit}.jsonl"
        source.write_text("".join(lines), encoding="utf-8")
    return ingest_corpus(CorpusConfig(path=str(source), id_field="id"), tmp / f"docs-{limit or 'all'}.parquet")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cbtm-bench-embed-"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(tmp / "hf-datasets"))
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: Path) -> None:
    import torch

    from cluster.corpus import read_documents

    corpus = prepare_corpus(args, tmp, args.limit)
    texts = read_documents(corpus, columns=["text"]).column("text").to_pylist()
    n = len(texts)
    st = time_sentence_transformers(args, corpus, texts, tmp)
    rows = [("stage: embed_corpus, sentence-transformers", n, st["stage"]),
            ("bare: SentenceTransformer.encode", n, st["bare"])]
    if not args.skip_tfidf:  # always the whole split: it is quick, and its fit is a fixed cost
        rows.append(time_tfidf(prepare_corpus(args, tmp, None), tmp))
    bare_rate = n / st["bare"]
    sample = f", seeded sample of {args.limit}" if args.limit else ""
    print(f"\n20 Newsgroups train ({args.data.name}{sample}): {n} documents after ingestion; batch size "
          f"{args.batch_size}; max_seq_length {st['max_seq_length']}; device {st['device']} ({st['precision']}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.repeat}, "
          f"{args.pairs} part(s) timed in pairs")
    print(f"model load: stage {st['load_stage']:.1f} s, bare {st['load_bare']:.1f} s (not in the timings below)\n")
    print(f"| {'path':<60} | {'docs':>6} | {'seconds':>8} | {'docs/s':>8} | {'vs bare':>8} |")
    print(f"|{'-' * 62}|{'-' * 8}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for name, docs, seconds in rows:
        print(f"| {name:<60} | {docs:6d} | {seconds:8.1f} | {docs / seconds:8.1f} | "
              f"{docs / seconds / bare_rate:7.2f}x |")
    print(f"\nstage / bare throughput ratio: {st['bare'] / st['stage']:.3f}x   (target >= 1.0x)")
    if not args.skip_tfidf:
        tfidf_rate, st_rate = rows[-1][1] / rows[-1][2], n / st["stage"]
        print(f"tf-idf speed-up over sentence-transformers (docs/s, stage vs stage): {tfidf_rate / st_rate:.1f}x   "
              "(target >= 20x)")
    print(f"stage vectors (float16 shards) vs bare: min cosine {st['min_cos']:.4f}")


def split_corpus(corpus: Path, pairs: int, tmp: Path) -> list[tuple[Path, list[str]]]:
    """The ingested corpus as ``pairs`` consecutive parts: (Parquet, texts) each."""
    import pyarrow.parquet as pq

    table = pq.read_table(corpus)
    bounds = [round(i * table.num_rows / pairs) for i in range(pairs + 1)]
    parts = []
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        pq.write_table(table.slice(lo, hi - lo), tmp / f"part-{i}.parquet")
        parts.append((tmp / f"part-{i}.parquet", table.column("text").slice(lo, hi - lo).to_pylist()))
    return parts


def time_sentence_transformers(args: argparse.Namespace, corpus: Path, texts: list[str], tmp: Path) -> dict:
    """Best-of-``repeat`` total seconds of the stage and of the bare call over the ``pairs`` parts; within
    a round each part runs through both back to back (which goes first alternates), so a change in the
    machine's load hits both alike."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from cluster.config import EmbedConfig
    from cluster.embed import embed_corpus, load_embeddings
    from cluster.minilm import SentenceTransformerEmbedder, resolve_model_path

    bs = args.batch_size
    cfg = EmbedConfig(batch_size=bs)
    embedder, load_stage = timed(lambda: SentenceTransformerEmbedder(cfg.model, batch_size=bs))
    bare, load_bare = timed(lambda: SentenceTransformer(resolve_model_path(cfg.model), device=embedder.device))
    embedder.encode(texts[: 2 * bs])  # warm-up: first calls pay one-off kernel set-up
    bare.encode(texts[: 2 * bs], batch_size=bs)
    parts = split_corpus(corpus, args.pairs, tmp) if args.pairs > 1 else [(corpus, texts)]
    stage_s, bare_s, cosines = [], [], []
    for r in range(args.repeat):
        stage_s.append(0.0)
        bare_s.append(0.0)
        for i, (part, part_texts) in enumerate(parts):
            out = tmp / f"emb-st-{r}-{i}"
            for which in (("stage", "bare") if (r + i) % 2 == 0 else ("bare", "stage")):
                if which == "stage":
                    stage_s[-1] += timed(lambda: embed_corpus(cfg, part, out, embedder))[1]
                else:
                    vecs, seconds = timed(lambda: bare.encode(part_texts, batch_size=bs, normalize_embeddings=True))
                    bare_s[-1] += seconds
            stage_vecs = load_embeddings(out)[1]
            cosines.append(np.min(np.sum(stage_vecs * vecs, axis=1) / np.linalg.norm(stage_vecs, axis=1)))
    return {"stage": min(stage_s), "bare": min(bare_s), "load_stage": load_stage, "load_bare": load_bare,
            "min_cos": float(min(cosines)), "device": embedder.device, "precision": embedder.precision,
            "max_seq_length": embedder.model.max_seq_length}


def time_tfidf(corpus: Path, tmp: Path) -> tuple[str, int, float]:
    """The tf-idf stage end to end (fit on the training sample + transform of every document)."""
    import sklearn.decomposition  # noqa: F401  (imports are not throughput)
    import sklearn.feature_extraction.text  # noqa: F401

    from cluster.config import EmbedConfig
    from cluster.corpus import read_documents
    from cluster.embed import embed_corpus

    cfg = EmbedConfig(kind="tfidf")
    _, seconds = timed(lambda: embed_corpus(cfg, corpus, tmp / "emb-tfidf"))
    fit_docs = json.loads((tmp / "emb-tfidf" / "tfidf" / "settings.json").read_text())["n_fit_docs"]
    docs = read_documents(corpus, columns=["id"]).num_rows
    return f"stage: embed_corpus, tf-idf {cfg.tfidf_dim}-d (fit on {fit_docs} + transform)", docs, seconds


if __name__ == "__main__":
    main()
