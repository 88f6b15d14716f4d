import json

import numpy as np
import pytest

from cluster.config import CorpusConfig, EmbedConfig
from cluster.corpus import ingest_corpus, read_documents
from cluster.embed import embed_corpus, load_embedder, load_embeddings
from cluster.tfidf import TfidfEmbedder, training_sample
from ground.errors import UserInputError
from tests.conftest import demo_records, write_jsonl


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfidf")
    records = demo_records(40, ("cooking", "astronomy", "football", "law", "medicine", "programming"))
    return ingest_corpus(CorpusConfig(path=str(write_jsonl(root / "c.jsonl", records)), heldout_fraction=0.2),
                         root / "docs.parquet")


def test_fit_save_reload_gives_the_same_vectors_from_open_formats(corpus, tmp_path):
    texts = read_documents(corpus, split="train").column("text").to_pylist()
    fitted = TfidfEmbedder.fit(texts, dim=16)
    fitted.save(tmp_path / "tfidf")
    assert sorted(p.name for p in (tmp_path / "tfidf").iterdir()) == [
        "components.npy", "idf.npy", "settings.json", "vocabulary.json"]
    assert np.load(tmp_path / "tfidf" / "components.npy", allow_pickle=False).shape == (16, len(
        json.loads((tmp_path / "tfidf" / "vocabulary.json").read_text())))
    reloaded = TfidfEmbedder.load(tmp_path / "tfidf")
    probe = read_documents(corpus, split="heldout").column("text").to_pylist() + ["", "qqqq zzzz xxxy"]
    a, b = fitted.encode(probe), reloaded.encode(probe)
    assert a.shape == (len(probe), 16) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    norms = np.linalg.norm(a, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)  # no known term: a unit vector too, not zeros or NaN


def test_vectors_separate_domains(corpus):
    texts = read_documents(corpus, split="train").column("text").to_pylist()
    vecs = TfidfEmbedder.fit(texts, dim=16).encode([
        "Knead the dough and let the bread rise before baking in a hot oven.",
        "Bake the bread once the dough has doubled; an oven thermometer helps.",
        "The telescope observed a distant galaxy and its bright stars."])
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.2


def test_training_sample_is_seeded_bounded_and_from_the_training_split(corpus):
    train = set(read_documents(corpus, split="train").column("text").to_pylist())
    sample = training_sample(corpus, 50)
    assert len(sample) == 50 and set(sample) <= train and sample == training_sample(corpus, 50)
    assert len(training_sample(corpus, 10_000)) == len(train)


def test_embed_stage_records_tfidf_and_routing_reloads_the_same_embedder(corpus, tmp_path):
    cfg = EmbedConfig(kind="tfidf", tfidf_dim=24, tfidf_sample=100, shard_size=100, dtype="float32")
    out = embed_corpus(cfg, corpus, tmp_path / "emb")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "tfidf" and meta["dim"] == 24 and meta["dtype"] == "float32"
    assert json.loads((out / "tfidf" / "settings.json").read_text())["n_fit_docs"] == 100
    ids, vecs = load_embeddings(out)
    texts = read_documents(corpus).column("text").to_pylist()
    router = load_embedder(EmbedConfig(kind="tfidf", tfidf_dim=24), out)  # what the Ensemble does
    np.testing.assert_allclose(router.encode(texts), vecs, atol=1e-6)


def test_tfidf_without_its_fitted_parameters_is_one_clear_error(tmp_path):
    for where in (None, tmp_path):
        with pytest.raises(UserInputError) as err:
            load_embedder(EmbedConfig(kind="tfidf"), where)
        assert "\n" not in str(err.value)
    assert "cbtm run --force embed" in str(err.value)


def test_a_text_without_any_fitted_term_gets_a_unit_vector_not_zeros(corpus):
    texts = read_documents(corpus, split="train").column("text").to_pylist()
    fitted = TfidfEmbedder.fit(texts, dim=8)
    z = fitted.encode(["zzqx 12345 qqqqv", texts[0]])
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    assert z[0].tolist() == [1.0] + [0.0] * 7  # the first SVD axis: the corpus's mean direction
