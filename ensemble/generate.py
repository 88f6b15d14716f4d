"""Token-by-token generation from a probability mixture of experts, each with its own KV cache."""
from __future__ import annotations

from typing import Iterator

import numpy as np


def pick_token(probs, do_sample: bool, temperature: float, top_p: float, generator) -> int:
    """Choose the next token from mixture probabilities (float32 [vocab]): greedy, or temperature + top-p."""
    import torch

    if not do_sample:
        return int(torch.argmax(probs))
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    # Temperature acts on the mixture: p_i^(1/T), renormalised.
    logp = torch.log(probs.clamp_min(1e-30)) / temperature
    p = torch.softmax(logp, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(p, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # always keeps the most likely token
        p = torch.zeros_like(p).scatter(0, order[keep], sorted_p[keep])
        p = p / p.sum()
    return int(torch.multinomial(p.cpu(), 1, generator=generator))


def mixture_tokens(ens, prompt: str, expert_ids: np.ndarray, weights: np.ndarray, max_new_tokens: int,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                   seed: int | None = None) -> Iterator[int]:
    """Yield generated token ids until eos or ``max_new_tokens``.

    Only the experts in ``expert_ids`` run; at every step their next-token probabilities are mixed with
    ``weights`` (float [top_k], sums to 1). Each expert keeps its own KV cache, so a step costs one token
    per expert.
    """
    import torch

    tok = ens.tokenizer
    eos = tok.eos_token_id
    max_new_tokens = min(max_new_tokens, ens.max_positions - 2)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"][-(ens.max_positions - max_new_tokens - 1):]
    models = [ens.expert_model(int(c)) for c in expert_ids]
    w = torch.tensor(np.asarray(weights), dtype=torch.float32, device=ens.device)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    step_input = torch.tensor([[eos, *prompt_ids]], device=ens.device)
    caches = [None] * len(models)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            probs = None
            for j, model in enumerate(models):
                out = model(input_ids=step_input, past_key_values=caches[j], use_cache=True)
                caches[j] = out.past_key_values
                p = w[j] * torch.softmax(out.logits[0, -1].float(), dim=-1)
                probs = p if probs is None else probs + p
            next_id = pick_token(probs, do_sample, temperature, top_p, generator)
            if next_id == eos:
                return
            yield next_id
            step_input = torch.tensor([[next_id]], device=ens.device)


def generate_one(ens, prompt: str, expert_ids, weights, max_new_tokens: int, do_sample: bool,
                 temperature: float, top_p: float, seed: int | None, stops: list[str]) -> str:
    """The continuation of ``prompt`` as text, cut before the first stop string."""
    out: list[int] = []
    for token in mixture_tokens(ens, prompt, expert_ids, weights, max_new_tokens, do_sample, temperature,
                                top_p, seed):
        out.append(token)
        if stops:
            text = ens.tokenizer.decode(out, skip_special_tokens=True)
            hits = [text.index(s) for s in stops if s and s in text]
            if hits:
                return text[: min(hits)]
    return ens.tokenizer.decode(out, skip_special_tokens=True)
