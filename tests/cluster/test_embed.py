import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cluster.config import CorpusConfig, EmbedConfig
from cluster.corpus import ingest_corpus, read_documents
from cluster.embed import (
    embed_corpus,
    embed_shard,
    encode_length_sorted,
    load_embeddings,
    plan_shards,
    stage_embedder,
)
from cluster.hybrid import HybridEmbedder
from cluster.minilm import SentenceTransformerEmbedder
from cluster.tfidf import TfidfEmbedder
from ground.errors import UserInputError
from tests.conftest import DEMO, ROOT, demo_records, write_jsonl


@pytest.fixture(scope="module")
def embedder():
    return SentenceTransformerEmbedder()


def test_real_minilm_gives_unit_vectors_that_separate_domains(embedder):
    vecs = embedder.encode(["How long should bread dough rise before baking?",
                            "Knead the dough and let it proof until doubled in size.",
                            "The telescope observed a distant spiral galaxy."])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.2


def test_embed_corpus_writes_shards_and_resumes_without_recomputing(tmp_path, embedder):
    corpus = ingest_corpus(CorpusConfig(path=str(write_jsonl(tmp_path / "c.jsonl", demo_records(4)))),
                           tmp_path / "docs.parquet")
    out = embed_corpus(EmbedConfig(kind="sentence-transformers", shard_size=5), corpus, tmp_path / "emb", embedder)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n_shards"] == 3 and meta["n_docs"] == 12 and meta["dim"] == 384
    ids, vecs = load_embeddings(out)
    assert len(ids) == 12 and vecs.shape == (12, 384)
    assert np.load(out / "shard-00000.npy").dtype == np.float16
    # Simulate a run killed after shard 0: shard 0 is kept as is, the missing ones are recomputed.
    first = out / "shard-00000.npy"
    os.utime(first, (1, 1))
    (out / "shard-00002.npy").unlink()
    embed_corpus(EmbedConfig(kind="sentence-transformers", shard_size=5), corpus, out, embedder)
    assert first.stat().st_mtime == 1 and (out / "shard-00002.npy").exists()
    np.testing.assert_allclose(load_embeddings(out)[1], vecs)


def test_unloadable_model_says_how_to_pass_a_local_path():
    with pytest.raises(UserInputError, match="local"):
        SentenceTransformerEmbedder("no-such-org/no-such-model")


def test_length_sorted_encoding_keeps_input_order_and_clipping_changes_nothing(embedder):
    records = demo_records(3)
    long_text = " ".join(r["text"] for r in records)  # > 2,048 characters: clipped before tokenizing
    texts = [r["text"][: 40 + 37 * i] for i, r in enumerate(records)] + [long_text]
    assert embedder.sort_keys(texts)[-1] == 256
    np.testing.assert_allclose(encode_length_sorted(embedder, texts), embedder.encode(texts), atol=1e-5)
    whole = embedder.model.encode([long_text], normalize_embeddings=True)  # no clipping: the same tokens
    np.testing.assert_allclose(embedder.encode([long_text]), whole, atol=1e-5)


def test_the_hybrid_tfidf_block_reads_the_whole_of_a_long_document(embedder):
    """MiniLM reads 256 tokens, so the sentence embedder clips a long text before tokenizing; the tf-idf block
    must still see every word (the embed stage once handed it the clipped text: the words past ~2,048
    characters were lost, unlike in bench/clusters.py and in routing)."""
    records = demo_records(20)
    tfidf = TfidfEmbedder.fit([r["text"] for r in records], 8)
    hybrid = HybridEmbedder(embedder, tfidf, 0.55)
    head = " ".join(r["text"] for r in records if r["domain"] == records[0]["domain"])
    tail = " ".join(r["text"] for r in records if r["domain"] != records[0]["domain"])
    long_text = (head + " ") * (1 + 2400 // len(head)) + tail  # its other domains start past the clip
    texts = [records[1]["text"], long_text]
    staged = encode_length_sorted(hybrid, texts)  # the embed stage's and `cbtm add`'s path
    np.testing.assert_allclose(staged, hybrid.encode(texts), atol=1e-5)  # routing's path
    whole = tfidf.encode([long_text])[0]
    block = staged[1, embedder.dim:] / np.sqrt(1 - 0.55)
    np.testing.assert_allclose(block, whole / np.linalg.norm(whole), atol=1e-5)
    cut = tfidf.encode([long_text[:2048]])[0]
    assert block @ (cut / np.linalg.norm(cut)) < 0.99  # the tail's words matter: the test would see them lost


def test_shards_are_independent_idempotent_and_honour_dtype(tmp_path):
    corpus = ingest_corpus(CorpusConfig(path=str(write_jsonl(tmp_path / "c.jsonl", demo_records(10)))),
                           tmp_path / "docs.parquet")
    cfg = EmbedConfig(kind="tfidf", tfidf_dim=8, shard_size=7, dtype="float32")
    emb = stage_embedder(cfg, corpus, tmp_path / "emb")
    assert plan_shards(corpus, 7) == 5
    last = embed_shard(cfg, corpus, tmp_path / "emb", 4, emb)  # any shard, in any order
    assert np.load(last).shape == (2, 8) and np.load(last).dtype == np.float32
    os.utime(last, (1, 1))
    embed_shard(cfg, corpus, tmp_path / "emb", 4, emb)
    assert last.stat().st_mtime == 1  # finished: not recomputed
    half = EmbedConfig(kind="tfidf", tfidf_dim=8, shard_size=7, dtype="float16")
    assert np.load(embed_shard(half, corpus, tmp_path / "emb", 4, emb)).dtype == np.float16  # other dtype: redone
    last.write_bytes(b"")  # emptied (a disk that filled up): redone, not an EOFError
    assert np.load(embed_shard(half, corpus, tmp_path / "emb", 4, emb)).shape == (2, 8)
    with pytest.raises(ValueError, match="out of range"):
        embed_shard(cfg, corpus, tmp_path / "emb", 5, emb)


def test_shards_of_other_settings_or_another_corpus_are_never_resumed(tmp_path):
    corpus = ingest_corpus(CorpusConfig(path=str(write_jsonl(tmp_path / "c.jsonl", demo_records(10)))),
                           tmp_path / "docs.parquet")
    out = embed_corpus(EmbedConfig(kind="tfidf", tfidf_dim=8, shard_size=7), corpus, tmp_path / "emb")
    first = out / "shard-00000.npy"
    os.utime(first, (1, 1))
    embed_corpus(EmbedConfig(kind="tfidf", tfidf_dim=6, shard_size=7), corpus, out)
    assert first.stat().st_mtime != 1 and np.load(first).shape == (7, 6)
    os.utime(first, (1, 1))
    other = ingest_corpus(CorpusConfig(path=str(write_jsonl(tmp_path / "d.jsonl", demo_records(9)))),
                          tmp_path / "other.parquet")
    embed_corpus(EmbedConfig(kind="tfidf", tfidf_dim=6, shard_size=7), other, out)
    assert first.stat().st_mtime != 1 and len(load_embeddings(out)[0]) == 27


KILLABLE = """
import sys
from pathlib import Path
from cluster.config import EmbedConfig
from cluster.embed import embed_corpus
embed_corpus(EmbedConfig(kind="tfidf", tfidf_dim=8, shard_size=2), Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_killed_run_resumes_at_the_first_missing_shard(tmp_path):
    corpus = ingest_corpus(CorpusConfig(path=str(DEMO)), tmp_path / "docs.parquet")
    out = tmp_path / "emb"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(corpus), str(out)], env=env)
    deadline = time.monotonic() + 60
    while len(list(out.glob("shard-*.ids.json"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(out.glob("shard-*.ids.json"))
    assert 3 <= len(done) < plan_shards(corpus, 2) and not (out / "meta.json").exists()
    finished = [p.with_name(p.name.replace(".ids.json", ".npy")) for p in done]
    for path in finished:
        os.utime(path, (1, 1))
    resumed = embed_corpus(EmbedConfig(kind="tfidf", tfidf_dim=8, shard_size=2), corpus, out)
    assert all(path.stat().st_mtime == 1 for path in finished)  # finished shards are never recomputed
    fresh = embed_corpus(EmbedConfig(kind="tfidf", tfidf_dim=8, shard_size=2), corpus, tmp_path / "fresh")
    ids, vecs = load_embeddings(resumed)
    assert ids == read_documents(corpus).column("id").to_pylist()
    np.testing.assert_array_equal(vecs, load_embeddings(fresh)[1])
