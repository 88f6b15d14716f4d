"""Generation from a probability mixture of experts, batched per expert, each expert with its own KV cache.

A batch of prompts is grouped by expert: every expert that any prompt routes to runs once per step on the
rows (prompts) that use it, left-padded, with its own KV cache. Each row's next-token distribution is the
routing-weighted sum of its experts' probabilities; sampling, stop strings and re-routing act on that mixture.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Iterator

import numpy as np


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_cls: type) -> str:
    """The forward() keyword of the KV cache: ``cache`` in recent transformers (5.24 here), ``past_key_values``
    in older ones (where the new name does not exist; the old one still works in recent ones but warns)."""
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def _kv_cache(out):
    """The KV cache of a forward() output under either name (reading the old one warns in newer versions)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def pick_token(probs, do_sample: bool, temperature: float, top_p: float, generator) -> int:
    """Choose the next token from mixture probabilities (float32 [vocab]): greedy, or temperature + top-p."""
    import torch

    if not do_sample:
        return int(torch.argmax(probs))
    # Temperature acts on the mixture: p_i^(1/T), renormalised.
    p = torch.softmax(torch.log(probs.clamp_min(1e-30)) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(p, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # always keeps the most likely token
        p = torch.zeros_like(p).scatter(0, order[keep], sorted_p[keep])
        p = p / p.sum()
    return int(torch.multinomial(p.cpu(), 1, generator=generator))


@dataclass
class _ExpertState:
    rows: list[int]  # batch rows this expert serves
    cache: object  # its KV cache over those rows
    mask: object  # attention mask, int64 [len(rows), context length]; None when no row is padded
    probs: object  # next-token probabilities, float32 [len(rows), vocab]


class MixtureDecoder:
    """Step-by-step decoding state for a batch of token sequences and their routing weights."""

    def __init__(self, ens, sequences: list[list[int]], routes: list[dict[int, float]]):
        self.ens = ens
        self.seqs = [list(s) for s in sequences]
        self.routes = routes
        self.states: dict[int, _ExpertState] = {}
        for expert, rows in self._groups().items():
            self._prefill(expert, rows)

    def _groups(self) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for row, route in enumerate(self.routes):
            for expert in route:
                groups.setdefault(int(expert), []).append(row)
        return groups

    def _prefill(self, expert: int, rows: list[int]) -> None:
        """Run ``expert`` over the full sequences of ``rows`` (left-padded) and keep its cache."""
        import torch

        device, pad = self.ens.device, self.ens.tokenizer.eos_token_id
        width = max(len(self.seqs[r]) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(self.seqs[r]):] = torch.tensor(self.seqs[r])
            mask[i, width - len(self.seqs[r]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        padded = bool((mask == 0).any())
        # Without padding the model derives positions from its cache; the explicit mask costs ~10% per step.
        extra = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)} if padded else {}
        with torch.inference_mode():
            out = self.ens.expert_model(expert)(input_ids=ids, use_cache=True, **extra)
        self.states[expert] = _ExpertState(rows, _kv_cache(out), mask if padded else None,
                                           torch.softmax(out.logits[:, -1].float(), dim=-1))

    def probs(self):
        """Mixture next-token probabilities, float32 [n_rows, vocab]."""
        import torch

        mix = [None] * len(self.seqs)
        for expert, state in self.states.items():
            for i, row in enumerate(state.rows):
                p = float(self.routes[row][expert]) * state.probs[i]
                mix[row] = p if mix[row] is None else mix[row] + p
        return torch.stack(mix)

    def advance(self, tokens: list[int]) -> None:
        """Append one token per row and run every active expert one step on its rows."""
        import torch

        for row, token in enumerate(tokens):
            self.seqs[row].append(int(token))
        with torch.inference_mode():
            for expert, st in self.states.items():
                step = torch.tensor([[tokens[r]] for r in st.rows], device=self.ens.device)
                extra = {}
                if st.mask is not None:
                    st.mask = torch.cat([st.mask, torch.ones_like(st.mask[:, :1])], dim=1)
                    extra = {"attention_mask": st.mask, "position_ids": st.mask.sum(-1, keepdim=True) - 1}
                model = self.ens.expert_model(expert)
                extra[_cache_kwarg(type(model))] = st.cache
                out = model(input_ids=step, use_cache=True, **extra)
                st.cache, st.probs = _kv_cache(out), torch.softmax(out.logits[:, -1].float(), dim=-1)

    def reroute(self, routes: list[dict[int, float]]) -> None:
        """New weights per row; experts whose set of rows changed are re-filled from the full context."""
        self.routes = routes
        groups = self._groups()
        for expert in [e for e in self.states if e not in groups]:
            del self.states[expert]
        for expert, rows in groups.items():
            if expert not in self.states or self.states[expert].rows != rows:
                self._prefill(expert, rows)


def routes_from_arrays(expert_ids: np.ndarray, weights: np.ndarray) -> list[dict[int, float]]:
    """[n, top_k] ids and weights -> one {expert: weight} dict per row."""
    return [{int(e): float(w) for e, w in zip(ids, ws)} for ids, ws in zip(expert_ids, weights)]


def decode_batch(ens, prompts: list[str], top_k: int, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 stops: list[str] | None = None, reroute_every: int | None = None) -> Iterator[list[int | None]]:
    """Yield, per step, one new token id per prompt (None once that prompt has finished)."""
    import torch

    tok, eos = ens.tokenizer, ens.tokenizer.eos_token_id
    max_new_tokens = max(0, min(max_new_tokens, ens.max_positions - 2))
    keep = ens.max_positions - max_new_tokens - 1
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"][-keep:] for p in prompts]
    decoder = MixtureDecoder(ens, [[eos, *p] for p in prompt_ids], routes_from_arrays(*ens._route_arrays(prompts,
                                                                                                         top_k)))
    generators = [torch.Generator().manual_seed(seed + i) if seed is not None else None for i in range(len(prompts))]
    produced: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        probs = decoder.probs()
        tokens = [eos if done[r] else pick_token(probs[r], do_sample, temperature, top_p, generators[r])
                  for r in range(len(prompts))]
        emitted: list[int | None] = []
        for r, token in enumerate(tokens):
            if done[r] or token == eos:
                done[r] = True
                emitted.append(None)
                continue
            produced[r].append(token)
            emitted.append(token)
            if stops and any(s in tok.decode(produced[r][-32:], skip_special_tokens=True) for s in stops):
                done[r] = True  # the caller cuts the text at the stop string
        yield emitted
        if all(done) or step == max_new_tokens - 1:
            return
        if reroute_every and (step + 1) % reroute_every == 0:
            texts = [p + tok.decode(out, skip_special_tokens=True) for p, out in zip(prompts, produced)]
            decoder.reroute(routes_from_arrays(*ens._route_arrays(texts, top_k)))
        decoder.advance(tokens)


def cut_at_stop(text: str, stops: list[str] | None) -> str:
    """``text`` up to (not including) the earliest stop string."""
    hits = [text.index(s) for s in stops or [] if s and s in text]
    return text[: min(hits)] if hits else text
