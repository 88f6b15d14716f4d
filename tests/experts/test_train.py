import json

import numpy as np
import pytest
import torch

from cluster.config import CorpusConfig
from cluster.corpus import ingest_corpus, read_documents
from ensemble.rundir import UserInputError
from experts.config import SeedConfig, TrainConfig
from experts.seed import build_seed, load_causal_lm
from experts.tokenizer import load_tokenizer, train_tokenizer
from experts.train import evaluate, lr_factor, pack, train_expert
from tests.conftest import demo_records, write_jsonl


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A corpus, assignments putting every document in cluster 0, a trained tokenizer and a tiny seed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("experts")
    corpus = ingest_corpus(CorpusConfig(path=str(write_jsonl(root / "c.jsonl", demo_records(12, ("cooking",)))),
                                        heldout_fraction=0.25), root / "docs.parquet")
    docs = read_documents(corpus)
    assignments = root / "assignments.parquet"
    pq.write_table(pa.table({"id": docs.column("id"), "split": docs.column("split"),
                             "cluster_id": pa.array([0] * docs.num_rows, pa.int32()),
                             "distance": pa.array([0.0] * docs.num_rows, pa.float32())}), assignments)
    cfg = SeedConfig(model="preset:tiny", vocab_size=400, max_position_embeddings=64)
    tok_dir = train_tokenizer(cfg, corpus, root / "tokenizer")
    seed_dir = build_seed(cfg, tok_dir, root / "seed")
    return root, corpus, assignments, seed_dir


def test_tokenizer_round_trips_and_is_shared_by_the_seed(seeded):
    root, _, _, seed_dir = seeded
    tok = load_tokenizer(root / "tokenizer")
    text = "Knead the dough, then let it rise."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.eos_token == "<|endoftext|>" and len(tok) <= 400
    model = load_causal_lm(seed_dir)
    assert model.config.vocab_size == len(tok)


def test_training_lowers_heldout_loss_and_writes_a_loadable_expert(seeded, tmp_path):
    root, corpus, assignments, seed_dir = seeded
    cfg = TrainConfig(steps=40, batch_size=4, block_size=32, eval_every=20, warmup_steps=4, lr=5e-3)
    summary = train_expert(cfg, seed_dir, corpus, assignments, 0, tmp_path / "expert", show_progress=False)
    tok = load_tokenizer(seed_dir)
    from experts.train import cluster_texts

    val = pack(tok, cluster_texts(corpus, assignments, 0, "heldout"))
    before = evaluate(load_causal_lm(seed_dir), val, 32, "cpu", None)
    after = evaluate(load_causal_lm(tmp_path / "expert"), val, 32, "cpu", None)
    assert after < before - 0.5
    rows = [json.loads(line) for line in (tmp_path / "expert" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-1] == 40 and rows[-1]["val_loss"] is not None
    assert {"step", "tokens", "train_loss", "val_loss", "lr", "tokens_per_s"} <= set(rows[0])
    assert summary["val_loss"] == pytest.approx(rows[-1]["val_loss"])
    assert (tmp_path / "expert" / "model.safetensors").exists()


def test_same_seed_gives_the_same_expert(seeded, tmp_path):
    root, corpus, assignments, seed_dir = seeded
    cfg = TrainConfig(steps=5, batch_size=2, block_size=16, eval_every=5, precision="fp32")
    for name in ("a", "b"):
        train_expert(cfg, seed_dir, corpus, assignments, 0, tmp_path / name, show_progress=False)
    a, b = load_causal_lm(tmp_path / "a"), load_causal_lm(tmp_path / "b")
    for pa_, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa_, pb)


def test_too_few_tokens_for_one_block_is_a_clear_error(seeded, tmp_path):
    root, corpus, assignments, seed_dir = seeded
    with pytest.raises(UserInputError, match="fewer than one block"):
        train_expert(TrainConfig(block_size=100_000), seed_dir, corpus, assignments, 0, tmp_path / "x",
                     show_progress=False)
    assert not (tmp_path / "x").exists()


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = np.array([lr_factor(s, cfg) for s in range(100)])
    assert factors[0] < factors[9] <= 1.0
    assert np.all(np.diff(factors[10:]) <= 1e-12) and factors[-1] >= 0.1


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(lr=0), dict(precision="fp8"), dict(block_size=0)])
def test_bad_train_config(kwargs):
    with pytest.raises(UserInputError):
        TrainConfig(**kwargs)


def test_missing_seed_is_a_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_causal_lm(tmp_path / "nope")
