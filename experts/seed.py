"""The seed LM every expert branches from: a from-scratch Llama-style preset or any Hugging Face causal LM."""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

from experts.config import PRESETS, SeedConfig
from experts.data import token_stream, tokenize_corpus
from experts.models import load_causal_lm
from experts.tokenizer import load_tokenizer, open_tokenizer
from experts.train import run_training
from ground.device import resolve_device
from ground.errors import UserInputError
from ground.files import atomic_dir
from ground.loading import model_loading, quiet_transformers

log = logging.getLogger(__name__)


def build_seed(cfg: SeedConfig, tokenizer_dir: Path, out_dir: Path) -> Path:
    """Write the seed model to ``out_dir`` with `save_pretrained` (safetensors), atomically.

    A ``preset:NAME`` seed is a randomly initialised (``cfg.seed``) `LlamaForCausalLM` whose vocabulary is
    the shared tokenizer's; any other ``cfg.model`` is loaded with `AutoModelForCausalLM.from_pretrained`.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(tokenizer_dir)
    if cfg.preset is not None:
        shape = PRESETS[cfg.preset]
        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=cfg.max_position_embeddings,
                             num_key_value_heads=shape["num_attention_heads"], tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **shape)
        torch.manual_seed(cfg.seed)
        with model_loading():
            model = LlamaForCausalLM(config)
    else:
        model = load_causal_lm(cfg.model)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            raise UserInputError(f"seed {cfg.model!r}: its tokenizer is larger than its embedding table")
    with atomic_dir(out_dir) as tmp:
        with quiet_transformers():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("seed: %s, %.2fM parameters", cfg.model, n_params / 1e6)
    return out_dir


def pretrain_seed(tokens: int, train_cfg, seed_dir: Path, corpus_path: Path, out_dir: Path, *,
                  checkpoint_dir: Path | None = None, cache_dir: Path | None = None, device: str | None = None,
                  show_progress: bool = True) -> Path:
    """The Branch-Train-Merge seed phase: train the seed on every training document for ``tokens`` tokens
    (rounded up to whole steps of ``train_cfg.tokens_per_step``; see `experts.budget.seed_phase_tokens`) with the
    ``train_cfg`` optimizer settings, validated on every held-out document, and write it to ``out_dir``
    atomically (save_pretrained + tokenizer + metrics.jsonl + loss.png + expert.json).

    Returns the directory experts branch from: ``out_dir``, or ``seed_dir`` unchanged when
    ``tokens`` is 0 (nothing is written). Resumable like an expert with ``checkpoint_dir``.
    """
    if tokens == 0:
        return Path(seed_dir)
    device = resolve_device(device or train_cfg.device)
    steps = math.ceil(tokens / train_cfg.tokens_per_step)
    train_cfg = replace(train_cfg, steps=steps)
    tokenizer = open_tokenizer(seed_dir)
    tokens = tokenize_corpus(tokenizer, corpus_path, cache_dir)
    train = token_stream(tokens, None, None, "train", len(tokenizer), cache_dir)
    val = token_stream(tokens, None, None, "heldout", len(tokenizer), cache_dir)
    if len(train) < train_cfg.block_size:
        raise UserInputError(f"the corpus has {len(train)} training tokens, fewer than one block of "
                             f"{train_cfg.block_size}: the seed phase needs more text or a smaller train.block_size")
    run_training(train_cfg, Path(seed_dir), tokenizer, train, val, Path(out_dir), device=device, name="seed phase",
                 key=(train_cfg.seed, 0), checkpoint_dir=checkpoint_dir, show_progress=show_progress,
                 extra={"phase": "seed", "train_tokens_available": int(len(train)), "heldout_tokens": int(len(val))})
    log.info("seed phase: %d steps (%s tokens) on the whole corpus -> %s", steps,
             f"{steps * train_cfg.tokens_per_step:,}", out_dir)
    return Path(out_dir)
