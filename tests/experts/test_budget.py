import pytest

from experts.budget import steps_per_expert
from experts.config import TrainConfig
from ground.errors import UserInputError

STEP = 2 * 16  # tokens per step below


def cfg(**kw):
    return TrainConfig(batch_size=2, block_size=16, **kw)


def test_without_a_total_budget_every_expert_trains_train_steps():
    assert steps_per_expert(cfg(steps=7), {0: 1000, 1: 50, 2: 3}) == {0: 7, 1: 7, 2: 0}


def test_proportional_split_follows_cluster_tokens_and_spends_the_whole_budget():
    steps = steps_per_expert(cfg(total_tokens=100 * STEP + 5), {0: 6000, 1: 3000, 2: 1000})
    assert sum(steps.values()) == 100
    assert steps[0] > steps[1] > steps[2] >= 1 and abs(steps[0] - 60) <= 1 and abs(steps[2] - 10) <= 1


def test_equal_split_and_accumulation_count_in_tokens():
    steps = steps_per_expert(cfg(total_tokens=90 * STEP * 2, grad_accum=2, budget_split="equal"),
                             {0: 6000, 1: 3000, 2: 1000})
    assert steps == {0: 30, 1: 30, 2: 30}


def test_a_cluster_below_one_block_gets_no_share():
    steps = steps_per_expert(cfg(total_tokens=10 * STEP), {0: 5000, 1: 10})
    assert steps == {0: 10, 1: 0}


@pytest.mark.parametrize("kw", [dict(total_tokens=0), dict(total_tokens=-5), dict(budget_split="random"),
                                dict(grad_accum=0), dict(checkpoint_every=-1)])
def test_a_zero_or_invalid_budget_is_a_clear_error(kw):
    with pytest.raises(UserInputError):
        cfg(**kw)


def test_a_budget_below_one_step_per_expert_is_a_clear_error():
    with pytest.raises(UserInputError, match="at least 96 tokens"):
        steps_per_expert(cfg(total_tokens=2 * STEP), {0: 100, 1: 100, 2: 100})


def test_cluster_token_counts_match_the_training_streams(seeded, tmp_path):
    from cluster.corpus import read_documents
    from experts.budget import cluster_token_counts
    from experts.data import token_stream, tokenize_corpus
    from experts.tokenizer import load_tokenizer
    from tests.experts.conftest import write_assignments

    root, corpus, _, seed_dir = seeded
    docs = read_documents(corpus)
    path = write_assignments(tmp_path / "a.parquet", docs, [0] * docs.num_rows, [i % 2 for i in range(docs.num_rows)])
    counts = cluster_token_counts(seed_dir, corpus, path, 3, cache_dir=tmp_path)
    tok = load_tokenizer(seed_dir)
    tokens = tokenize_corpus(tok, corpus, tmp_path)
    assert counts == {c: len(token_stream(tokens, path, c, "train", len(tok), tmp_path)) for c in range(3)}
    assert counts[2] == 0 and counts[0] > 0 and counts[1] > 0


def test_the_seed_phase_is_part_of_the_budget_on_both_sides():
    from experts.budget import expert_budget, seed_phase_tokens
    from experts.config import SeedConfig

    train = TrainConfig(batch_size=4, block_size=32, total_tokens=128 * 100)  # 100 steps of 128 tokens
    seed = seed_phase_tokens(SeedConfig(pretrain_share=0.5), train, n_clusters=4)
    assert seed == 50 * 128
    experts = expert_budget(train, seed, 4)
    assert experts.total_tokens == 50 * 128
    steps = steps_per_expert(experts, {0: 10_000, 1: 10_000, 2: 5_000, 3: 5_000})
    assert sum(steps.values()) * 128 + seed == train.total_tokens  # seed phase + experts = the whole budget
    # Without a total, the budget is k x steps: the experts give up the seed phase's share of their steps.
    by_steps = TrainConfig(steps=150, batch_size=4, block_size=32)
    seed = seed_phase_tokens(SeedConfig(pretrain_share=0.5), by_steps, n_clusters=6)
    assert seed == 450 * 128 and expert_budget(by_steps, seed, 6).steps == 75
    assert seed_phase_tokens(SeedConfig(pretrain_share=0.0), by_steps, 6) == 0
    assert expert_budget(by_steps, 0, 6) is by_steps
    assert seed_phase_tokens(SeedConfig(pretrain_tokens=1000), train, 4) == 7 * 128  # whole steps
    with pytest.raises(UserInputError, match="takes the whole training budget"):
        seed_phase_tokens(SeedConfig(pretrain_tokens=10 ** 9), train, 4)


def test_branches_warm_up_to_their_own_peak_lr_and_older_runs_keep_their_hashes():
    from ground.rundir import hashed_settings

    train = TrainConfig(lr=3e-3, branch_lr_ratio=0.25)
    branched = train.branched(seed_phase=True)
    assert branched.lr == pytest.approx(7.5e-4) and branched.branched(True) == branched  # applied once
    assert train.branched(seed_phase=False) is train  # no seed phase: the branches are the first to train
    default = TrainConfig()
    assert default.branched(True) is default  # ratio 1: the settings as they are
    # The default computes what runs of an older cbtm computed, so it leaves their stage hashes as they were.
    assert "branch_lr_ratio" not in hashed_settings(TrainConfig())
    assert hashed_settings(train)["branch_lr_ratio"] == 0.25
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(UserInputError, match="branch_lr_ratio must be in"):
            TrainConfig(branch_lr_ratio=bad)
