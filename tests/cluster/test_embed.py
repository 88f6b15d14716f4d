import json
import os

import numpy as np
import pytest

from cluster.config import CorpusConfig, EmbedConfig
from cluster.corpus import ingest_corpus
from cluster.embed import SentenceTransformerEmbedder, embed_corpus, load_embeddings
from ensemble.rundir import UserInputError
from tests.conftest import demo_records, write_jsonl


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
    out = embed_corpus(EmbedConfig(shard_size=5), corpus, tmp_path / "emb", embedder)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n_shards"] == 3 and meta["n_docs"] == 12 and meta["dim"] == 384
    ids, vecs = load_embeddings(out)
    assert len(ids) == 12 and vecs.shape == (12, 384)
    assert np.load(out / "shard-00000.npy").dtype == np.float16
    # Simulate a run killed after shard 0: shard 0 is kept as is, the missing ones are recomputed.
    first = out / "shard-00000.npy"
    os.utime(first, (1, 1))
    (out / "shard-00002.npy").unlink()
    embed_corpus(EmbedConfig(shard_size=5), corpus, out, embedder)
    assert first.stat().st_mtime == 1 and (out / "shard-00002.npy").exists()
    np.testing.assert_allclose(load_embeddings(out)[1], vecs)


def test_unloadable_model_says_how_to_pass_a_local_path():
    with pytest.raises(UserInputError, match="local"):
        SentenceTransformerEmbedder("no-such-org/no-such-model")
