import numpy as np

from cluster.corpus import read_documents
from experts.data import BlockSampler, cluster_texts, pack, token_stream, tokenize_corpus, wanted_ids
from experts.tokenizer import load_tokenizer
from tests.experts.conftest import write_assignments


def test_tokenized_corpus_is_cached_and_streams_match_the_cluster_texts(seeded, tmp_path, monkeypatch):
    import datasets

    root, corpus, assignments, seed_dir = seeded
    tok = load_tokenizer(seed_dir)
    tokens = tokenize_corpus(tok, corpus, tmp_path)
    assert {"id", "split", "input_ids", "n"} <= set(tokens.column_names)
    monkeypatch.setattr(datasets.Dataset, "map", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-tokenized")))
    again = tokenize_corpus(tok, corpus, tmp_path)
    assert again.cache_files[0]["filename"] == tokens.cache_files[0]["filename"]
    stream = token_stream(again, assignments, 0, "train", len(tok), tmp_path)
    assert isinstance(stream, np.memmap) and stream.dtype == np.uint16
    np.testing.assert_array_equal(stream, pack(tok, cluster_texts(corpus, assignments, 0, "train")))


def test_training_documents_follow_the_balanced_column_heldout_the_nearest_centroid(seeded, tmp_path):
    root, corpus, _, seed_dir = seeded
    docs = read_documents(corpus)
    n = docs.num_rows
    path = write_assignments(tmp_path / "a.parquet", docs, [0] * n, [i % 2 for i in range(n)])
    train_ids = set(wanted_ids(path, "train", 1).to_pylist())
    expected = {i for i, s, k in zip(docs.column("id").to_pylist(), docs.column("split").to_pylist(), range(n))
                if s == "train" and k % 2 == 1}
    assert train_ids == expected and train_ids
    heldout = set(wanted_ids(path, "heldout", 0).to_pylist())
    assert heldout == {i for i, s in zip(docs.column("id").to_pylist(), docs.column("split").to_pylist())
                       if s == "heldout"}


def test_block_sampler_visits_every_block_once_per_epoch_and_resumes():
    sampler = BlockSampler(1000, 64, key=(0, 1))
    first = sampler.next(15)
    assert len(set(first.tolist())) == 15 and len({s % 64 for s in first.tolist()}) == 1  # one shift per epoch
    assert first.max() + 64 <= 1000
    state = sampler.state_dict()
    rest = sampler.next(40)
    other = BlockSampler(1000, 64, key=(0, 1))
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.next(40), rest)
    assert BlockSampler(64, 64, key=(0, 1)).next(3).tolist() == [0, 0, 0]
