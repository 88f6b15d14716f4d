"""Configuration of the tokenizer/seed and the per-cluster expert training stages."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ground.device import PRECISIONS, check_device_name
from ground.errors import UserInputError
from ground.fields import check_fields

# Llama-style size presets (RMSNorm, SwiGLU MLP, rotary positions, no dropout, tied embeddings):
# hidden, layers, heads, MLP width. Parameters at vocab 8192: tiny 0.27M, 1m 1.0M, 2m 1.9M, 8m 7.2M,
# 25m 24.6M, 125m 119.6M (124M at vocab 14k, GPT-2-small class).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
    "1m": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "2m": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384),
    "8m": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, intermediate_size=768),
    "25m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1536),
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
BUDGET_SPLITS = ("proportional", "equal")


@dataclass
class SeedConfig:
    """The seed LM every expert branches from.

    ``model`` is ``preset:NAME`` (a from-scratch Llama-style decoder with a byte-level BPE tokenizer trained
    on the corpus) or any Hugging Face causal LM name or local path (its own tokenizer is used).
    The Branch-Train-Merge seed phase trains the seed on the whole training split (with the ``train`` settings)
    before every expert branches from it, and it is part of the training budget: ``pretrain_share`` of it (the
    budget is ``train.total_tokens``, or k x ``train.steps`` x tokens per step), or ``pretrain_tokens`` when
    that is > 0; the experts share the rest. 0 and 0: no seed phase.
    """

    model: str = "preset:1m"
    vocab_size: int = 4096
    max_position_embeddings: int = 512
    seed: int = 0
    pretrain_share: float = 0.75
    pretrain_tokens: int = 0

    def __post_init__(self) -> None:
        check_fields(self, "seed")
        if self.model.startswith("preset:") and self.model[len("preset:"):] not in PRESETS:
            raise UserInputError(f"unknown seed preset {self.model!r}: use one of "
                                 + ", ".join(f"preset:{p}" for p in PRESETS))
        if not self.model.strip():
            raise UserInputError("seed.model is empty: pass preset:NAME or a Hugging Face causal LM path")
        if self.vocab_size < 260:
            raise UserInputError(f"seed.vocab_size must be >= 260 (bytes + specials), got {self.vocab_size}")
        if self.max_position_embeddings < 16:
            raise UserInputError(f"seed.max_position_embeddings must be >= 16, got {self.max_position_embeddings}")
        if self.pretrain_tokens < 0:
            raise UserInputError(f"seed.pretrain_tokens must be >= 0 (0: use seed.pretrain_share), "
                                 f"got {self.pretrain_tokens}")
        if not 0.0 <= self.pretrain_share < 1.0:
            raise UserInputError(f"seed.pretrain_share must be in [0, 1) (0: no seed phase), got {self.pretrain_share}")

    @property
    def preset(self) -> str | None:
        return self.model[len("preset:"):] if self.model.startswith("preset:") else None


@dataclass
class TrainConfig:
    """One expert's training run: AdamW, linear warmup then cosine decay, gradient accumulation and clipping.

    Compute budget: ``total_tokens`` (all experts together) is split across experts in proportion to their
    clusters' training tokens ("proportional") or equally ("equal"), see `experts.budget`; when it is None
    every expert trains ``steps`` optimizer steps. One step sees ``batch_size * block_size * grad_accum``
    tokens. After a seed phase, every model branched from it (experts, baselines, added and retrained experts)
    warms up to ``branch_lr_ratio * lr`` instead of ``lr`` (the seed phase itself trains at ``lr``): a branch
    continues a trained model, often for few steps. ``checkpoint_every`` steps (0: never) a resumable
    checkpoint is written; ``retries`` is how often the flow restarts a failed expert (each restart resumes
    from its last checkpoint).
    """

    steps: int = 150
    batch_size: int = 8
    block_size: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    branch_lr_ratio: float = 1.0
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    total_tokens: int | None = None
    budget_split: str = "proportional"
    checkpoint_every: int = 50
    compile: bool = False
    retries: int = 2
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        check_fields(self, "train")
        check_device_name(self.device, "train.device")
        for name in ("steps", "batch_size", "block_size", "eval_every", "grad_accum"):
            if getattr(self, name) < 1:
                raise UserInputError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserInputError(f"train.lr must be > 0, got {self.lr}")
        if not 0.0 < self.branch_lr_ratio <= 1.0:
            raise UserInputError(f"train.branch_lr_ratio must be in (0, 1] (the branches' peak lr over train.lr), "
                                 f"got {self.branch_lr_ratio}")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserInputError("train.warmup_steps must be >= 0 and train.min_lr_ratio in [0, 1]")
        if self.grad_clip <= 0:
            raise UserInputError(f"train.grad_clip must be > 0, got {self.grad_clip}")
        if self.precision not in PRECISIONS:
            raise UserInputError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.total_tokens is not None and self.total_tokens <= 0:
            raise UserInputError(f"train.total_tokens is {self.total_tokens}: a budget of zero trains nothing; "
                                 "give a positive number of tokens, or leave it unset to train train.steps per expert")
        if self.budget_split not in BUDGET_SPLITS:
            raise UserInputError(f"train.budget_split must be one of {', '.join(BUDGET_SPLITS)}, "
                                 f"got {self.budget_split!r}")
        if self.checkpoint_every < 0 or self.retries < 0:
            raise UserInputError("train.checkpoint_every (0: never) and train.retries must be >= 0")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size * self.grad_accum

    def branched(self, seed_phase: bool) -> "TrainConfig":
        """The settings a model branched from the seed trains with: peak lr ``branch_lr_ratio * lr`` after a
        seed phase (``seed_phase``); without one the seed is untrained and the branches train at ``lr``."""
        if not seed_phase or self.branch_lr_ratio == 1.0:
            return self
        return replace(self, lr=self.lr * self.branch_lr_ratio, branch_lr_ratio=1.0)
