"""Configuration of the tokenizer/seed and the per-cluster expert training stages."""
from __future__ import annotations

from dataclasses import dataclass

from ensemble.device import PRECISIONS
from ensemble.rundir import UserInputError

# Llama-style size presets: hidden, layers, heads, intermediate. Parameter counts are for vocab 8192.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
    "1m": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "2m": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384),
    "8m": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, intermediate_size=768),
    "25m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1536),
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048),
}


@dataclass
class SeedConfig:
    """The seed LM every expert branches from.

    ``model`` is ``preset:NAME`` (a from-scratch Llama-style decoder with a byte-level BPE tokenizer trained
    on the corpus) or any Hugging Face causal LM name or local path (its own tokenizer is used).
    """

    model: str = "preset:1m"
    vocab_size: int = 4096
    max_position_embeddings: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model.startswith("preset:") and self.model[len("preset:"):] not in PRESETS:
            raise UserInputError(f"unknown seed preset {self.model!r}: use one of "
                                 + ", ".join(f"preset:{p}" for p in PRESETS))
        if self.vocab_size < 260:
            raise UserInputError(f"seed.vocab_size must be >= 260 (bytes + specials), got {self.vocab_size}")
        if self.max_position_embeddings < 16:
            raise UserInputError(f"seed.max_position_embeddings must be >= 16, got {self.max_position_embeddings}")

    @property
    def preset(self) -> str | None:
        return self.model[len("preset:"):] if self.model.startswith("preset:") else None


@dataclass
class TrainConfig:
    """One expert's training run: AdamW, linear warmup then cosine decay, gradient clipping."""

    steps: int = 150
    batch_size: int = 8
    block_size: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "block_size", "eval_every"):
            if getattr(self, name) < 1:
                raise UserInputError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserInputError(f"train.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserInputError("train.warmup_steps must be >= 0 and train.min_lr_ratio in [0, 1]")
        if self.precision not in PRECISIONS:
            raise UserInputError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
