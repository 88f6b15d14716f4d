import json

import numpy as np
import pytest
import torch

from experts.config import SeedConfig, TrainConfig
from experts.data import cluster_texts, pack
from experts.models import load_causal_lm
from experts.tokenizer import load_tokenizer
from experts.train import evaluate, lr_factor, train_expert
from ground.errors import UserInputError


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


def test_too_few_tokens_for_one_block_skips_the_expert_with_a_warning(seeded, tmp_path, caplog):
    root, corpus, assignments, seed_dir = seeded
    summary = train_expert(TrainConfig(block_size=100_000), seed_dir, corpus, assignments, 0, tmp_path / "x",
                           show_progress=False)
    assert summary["skipped"] is True and "fewer than one block" in summary["reason"]
    assert summary["steps"] == 0 and summary["val_loss"] is None
    assert "expert 0 skipped" in caplog.text
    assert not (tmp_path / "x").exists()


def test_an_empty_cluster_and_a_zero_budget_are_skipped(seeded, tmp_path):
    root, corpus, assignments, seed_dir = seeded
    empty = train_expert(TrainConfig(), seed_dir, corpus, assignments, 5, tmp_path / "x", show_progress=False)
    assert empty["skipped"] and empty["train_tokens_available"] == 0
    zero = train_expert(TrainConfig(block_size=16), seed_dir, corpus, assignments, 0, tmp_path / "y",
                        show_progress=False, steps=0)
    assert zero["skipped"] and "budget" in zero["reason"] and not (tmp_path / "y").exists()


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


def test_expert_dir_has_a_loss_curve_and_a_summary(seeded, tmp_path):
    root, corpus, assignments, seed_dir = seeded
    cfg = TrainConfig(steps=4, batch_size=2, block_size=16, eval_every=2, grad_accum=2, warmup_steps=1,
                      precision="fp32")
    summary = train_expert(cfg, seed_dir, corpus, assignments, 0, tmp_path / "e", show_progress=False)
    assert (tmp_path / "e" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "e" / "expert.json").read_text())
    assert saved["tokens"] == summary["tokens"] == 4 * 2 * 16 * 2
    assert {"steps", "tokens", "train_loss", "val_loss", "seconds", "device", "skipped"} <= set(saved)
    assert saved["skipped"] is False and saved["init"] == "seed"


def test_continue_from_the_current_expert_and_refuse_another_vocabulary(seeded, tmp_path):
    root, corpus, assignments, seed_dir = seeded
    cfg = TrainConfig(steps=3, batch_size=2, block_size=16, eval_every=3, warmup_steps=0, precision="fp32")
    train_expert(cfg, seed_dir, corpus, assignments, 0, tmp_path / "e", show_progress=False)
    again = train_expert(cfg, seed_dir, corpus, assignments, 0, tmp_path / "e", show_progress=False,
                         init_dir=tmp_path / "e")
    assert again["init"] == "expert" and (tmp_path / "e" / "model.safetensors").exists()
    import shutil

    shutil.copytree(tmp_path / "e", tmp_path / "other")
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "vocab_size": 999}))
    with pytest.raises(UserInputError, match="vocabulary"):
        train_expert(cfg, seed_dir, corpus, assignments, 0, tmp_path / "x", show_progress=False,
                     init_dir=tmp_path / "other")


def test_bad_device_and_missing_seed_are_one_line_errors(seeded, tmp_path):
    root, corpus, assignments, seed_dir = seeded
    with pytest.raises(UserInputError, match="unknown train.device"):
        train_expert(TrainConfig(device="tpu"), seed_dir, corpus, assignments, 0, tmp_path / "x")
    with pytest.raises(UserInputError, match="does not exist"):
        train_expert(TrainConfig(), tmp_path / "nope", corpus, assignments, 0, tmp_path / "x")


def test_a_directory_that_is_not_a_causal_lm_is_a_clear_error(seeded):
    root, *_ = seeded
    with pytest.raises(UserInputError, match="cannot load .* as a causal LM"):
        load_causal_lm(root / "tokenizer")


def test_presets_are_llama_style_and_span_2m_to_125m():
    from transformers import LlamaConfig, LlamaForCausalLM

    from experts.config import PRESETS

    counts = {}
    for name, shape in PRESETS.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(vocab_size=8192, num_key_value_heads=shape["num_attention_heads"],
                                                 tie_word_embeddings=True, **shape))
        counts[name] = sum(p.numel() for p in model.parameters()) / 1e6
        assert model.config.hidden_act == "silu" and model.config.attention_dropout == 0.0
    assert {"tiny", "1m"} <= set(counts)
    assert 1.5 <= counts["2m"] <= 2.5 and 100 <= counts["125m"] <= 135
    assert list(counts.values()) == sorted(counts.values())


def test_seed_phase_trains_on_the_whole_corpus_and_experts_branch_from_it(seeded, tmp_path):
    from experts.seed import pretrain_seed

    root, corpus, assignments, seed_dir = seeded
    cfg = TrainConfig(batch_size=2, block_size=16, warmup_steps=1, eval_every=5, precision="fp32")
    assert pretrain_seed(0, cfg, seed_dir, corpus, tmp_path / "p") == seed_dir
    assert not (tmp_path / "p").exists()
    out = pretrain_seed(150, cfg, seed_dir, corpus, tmp_path / "p", show_progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 5 and rows[-1]["tokens"] == 160  # 150 tokens rounded up to whole steps
    summary = train_expert(TrainConfig(steps=2, batch_size=2, block_size=16, eval_every=2, precision="fp32"), out,
                           corpus, assignments,
                           0, tmp_path / "e", show_progress=False)
    assert summary["steps"] == 2 and load_causal_lm(tmp_path / "e").config.vocab_size == len(load_tokenizer(seed_dir))


def test_seed_config_validates_pretrain_tokens():
    with pytest.raises(UserInputError, match="pretrain_tokens"):
        SeedConfig(pretrain_tokens=-1)
    for share in (-0.1, 1.0, float("nan")):
        with pytest.raises(UserInputError, match="pretrain_share"):
            SeedConfig(pretrain_share=share)
