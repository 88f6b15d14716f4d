"""Killed training resumes from its last checkpoint and ends bit-identical to an uninterrupted run (CPU).

Exactness holds with bf16 autocast too (tested; the other tests use fp32 only because bf16 is emulated, and
slow, on CPUs without avx512_bf16/AMX): on one CPU machine every kernel is deterministic for the same thread
count, and a checkpoint carries everything the next step reads (weights, AdamW moments and step counts, the
scheduler, torch/numpy/python RNGs, the sampler's epoch and position, the running loss window).
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from experts.checkpoint import CheckpointStore
from experts.config import TrainConfig
from experts.models import load_causal_lm
from experts.train import train_expert
from ground.errors import UserInputError

CFG = TrainConfig(steps=12, batch_size=2, block_size=16, checkpoint_every=4, eval_every=6, warmup_steps=2,
                  precision="fp32")


class Killed(Exception):
    pass


def kill_at(step):
    def hook(done):
        if done == step:
            raise Killed(step)
    return hook


def run(seeded, out, ckpt, cfg=CFG, **kw):
    root, corpus, assignments, seed_dir = seeded
    return train_expert(cfg, seed_dir, corpus, assignments, 0, out, show_progress=False, checkpoint_dir=ckpt, **kw)


def same_weights(a, b):
    ma, mb = load_causal_lm(a), load_causal_lm(b)
    return all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))


def curve(path):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


@pytest.fixture(scope="module")
def reference(seeded, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "expert"
    run(seeded, out, out.parent / "ckpt")
    assert not (out.parent / "ckpt").exists()  # checkpoints are removed once the expert is written
    return out


def test_interrupted_run_resumes_to_identical_weights_and_curve(seeded, reference, tmp_path):
    with pytest.raises(Killed):
        run(seeded, tmp_path / "e", tmp_path / "ckpt", on_step=kill_at(10))
    assert not (tmp_path / "e").exists()
    [fp] = list((tmp_path / "ckpt").iterdir())
    assert CheckpointStore(fp).steps() == [4, 8]  # the newest two are kept
    summary = run(seeded, tmp_path / "e", tmp_path / "ckpt")
    assert summary["resumed_from"] == 8
    assert same_weights(reference, tmp_path / "e")
    assert curve(reference) == curve(tmp_path / "e")


@pytest.mark.slow
def test_sigkill_in_a_subprocess_then_the_same_call_resumes(seeded, reference, tmp_path):
    root, corpus, assignments, seed_dir = seeded
    script = textwrap.dedent(f"""
        import os, signal
        from experts.config import TrainConfig
        from experts.train import train_expert
        def hook(step):
            if step == 7:
                os.kill(os.getpid(), signal.SIGKILL)
        train_expert(TrainConfig(**{CFG.__dict__!r}), {str(seed_dir)!r},
                     {str(corpus)!r}, {str(assignments)!r}, 0, {str(tmp_path / "e")!r}, show_progress=False,
                     checkpoint_dir={str(tmp_path / "ckpt")!r}, on_step=hook)
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    summary = run(seeded, tmp_path / "e", tmp_path / "ckpt")
    assert summary["resumed_from"] == 4
    assert same_weights(reference, tmp_path / "e")


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(seeded, reference, tmp_path, caplog):
    with pytest.raises(Killed):
        run(seeded, tmp_path / "e", tmp_path / "ckpt", on_step=kill_at(10))
    [fp] = list((tmp_path / "ckpt").iterdir())
    model = CheckpointStore(fp).path(8) / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])  # a write cut short
    summary = run(seeded, tmp_path / "e", tmp_path / "ckpt")
    assert summary["resumed_from"] == 4
    assert "corrupt" in caplog.text and "falling back" in caplog.text
    assert same_weights(reference, tmp_path / "e")  # nothing lost but time


def test_every_checkpoint_corrupt_is_a_clear_error_and_keeps_them(seeded, tmp_path):
    with pytest.raises(Killed):
        run(seeded, tmp_path / "e", tmp_path / "ckpt", on_step=kill_at(10))
    [fp] = list((tmp_path / "ckpt").iterdir())
    store = CheckpointStore(fp)
    for step in store.steps():
        (store.path(step) / "state.json").write_text("{not json")
    with pytest.raises(UserInputError, match="every checkpoint .* is corrupt"):
        run(seeded, tmp_path / "e", tmp_path / "ckpt")
    assert store.steps() == [4, 8] and not (tmp_path / "e").exists()


def test_changed_settings_start_fresh_instead_of_resuming(seeded, tmp_path, caplog):
    with pytest.raises(Killed):
        run(seeded, tmp_path / "e", tmp_path / "ckpt", on_step=kill_at(5))
    other = TrainConfig(**{**CFG.__dict__, "lr": 1e-3})
    summary = run(seeded, tmp_path / "e", tmp_path / "ckpt", cfg=other)
    assert summary["resumed_from"] is None and "ignoring checkpoints of other settings" in caplog.text


def test_resume_is_exact_with_bf16_autocast_too(seeded, tmp_path):
    cfg = TrainConfig(**{**CFG.__dict__, "steps": 6, "checkpoint_every": 2, "precision": "bf16"})
    run(seeded, tmp_path / "a", tmp_path / "ca", cfg=cfg)
    with pytest.raises(Killed):
        run(seeded, tmp_path / "b", tmp_path / "cb", cfg=cfg, on_step=kill_at(3))
    assert run(seeded, tmp_path / "b", tmp_path / "cb", cfg=cfg)["resumed_from"] == 2
    assert same_weights(tmp_path / "a", tmp_path / "b") and curve(tmp_path / "a") == curve(tmp_path / "b")


def test_store_is_atomic_and_prunes(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    store = CheckpointStore(tmp_path / "c")
    for step in (1, 2, 3):
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        store.save(step, model, opt, sched, {"x": step})
    (tmp_path / "c" / ".step-00000004.abc.tmp").mkdir()  # what a kill during a write leaves behind
    assert store.steps() == [2, 3]
    weights = model.weight.detach().clone()
    torch.nn.init.zeros_(model.weight)
    assert store.load_latest(model, opt, sched) == {"step": 3, "state": {"x": 3}}
    assert torch.equal(model.weight, weights) and opt.state_dict()["state"][0]["step"] == 3
