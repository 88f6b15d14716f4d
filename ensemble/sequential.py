"""The sequential backend: every expert is its own Hugging Face model, called once per step on its lanes.

Works for any causal LM. Lanes opened together for one expert form a *cohort* sharing one KV cache
(left-padded); each step runs every cohort once; a lane that leaves is cut out of its cohort's cache. The
stacked backend (`ensemble.stacked`) serves Llama-shaped experts faster; this one is the fallback and the
reference it is tested against.
"""
from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass
from typing import Callable

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


def expert_logprobs(model, ids: list[int], max_positions: int, device: str) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t = 1..len(ids)-1 (float64 [len(ids)-1]), in consecutive segments of
    ``max_positions`` tokens (each segment starts without context)."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, max_positions - 1):
            seg = torch.tensor([ids[start:start + max_positions]], device=device)
            logits = model(input_ids=seg).logits[0, :-1].float()
            lp = torch.log_softmax(logits, dim=-1).gather(1, seg[0, 1:, None])[:, 0]
            out.append(lp.double().cpu().numpy())
    return np.concatenate(out)


@dataclass
class _Cohort:
    model: object
    lanes: list[int]  # lane ids, in cache row order
    cache: object
    mask: object  # attention mask int64 [rows, context]; None when no row is padded


class SequentialLanes:
    """Lanes over HF models: one forward per cohort per step."""

    def __init__(self, backend: "SequentialBackend"):
        self.backend = backend
        self.cohorts: list[_Cohort] = []
        self._where: dict[int, _Cohort] = {}
        self._next = 0

    def add(self, experts: list[int], contexts: list[list[int]], tail: int = 0):
        """Prefill one cohort per expert; returns (lane ids, probs float32 [n, vocab], per lane log p of the last
        min(tail, len - 1) tokens of its context, float64 oldest first) in input order."""
        import torch

        order: dict[int, list[int]] = {}
        for i, e in enumerate(experts):
            order.setdefault(int(e), []).append(i)
        lane_ids = list(range(self._next, self._next + len(experts)))
        self._next += len(experts)
        probs, seen = [None] * len(experts), [np.zeros(0)] * len(experts)
        for expert, idx in order.items():
            seqs = [contexts[i] for i in idx]
            cohort, logits = self._prefill(expert, seqs, [lane_ids[i] for i in idx])
            for j, i in enumerate(idx):
                probs[i] = torch.softmax(logits[j, -1].float(), dim=-1)
                m = min(tail, len(seqs[j]) - 1)
                if m > 0:  # left-padded: the last m + 1 positions end the context
                    lp = torch.log_softmax(logits[j, -1 - m:-1].float(), dim=-1)
                    target = torch.tensor(seqs[j][-m:], device=lp.device)[:, None]
                    seen[i] = lp.gather(1, target)[:, 0].double().cpu().numpy()
        return lane_ids, torch.stack(probs), seen

    def _prefill(self, expert: int, seqs: list[list[int]], lanes: list[int]):
        import torch

        device, pad = self.backend.device, self.backend.pad_id
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        ids, mask = ids.to(device), mask.to(device)
        padded = bool((mask == 0).any())
        # Without padding the model derives positions from its cache; the explicit mask costs ~10% per step.
        extra = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)} if padded else {}
        model = self.backend.models(expert)  # held by the cohort: a reload never swaps weights mid-request
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True, **extra)
        cohort = _Cohort(model, list(lanes), _kv_cache(out), mask if padded else None)
        self.cohorts.append(cohort)
        for lane in lanes:
            self._where[lane] = cohort
        return cohort, out.logits

    def step(self, lanes: list[int], tokens: list[int]):
        """Every listed lane consumes one token (each cohort's lanes must all be listed); probs [n, vocab]."""
        import torch

        token_of = dict(zip(lanes, tokens))
        result = {}
        with torch.inference_mode():
            for cohort in self.cohorts:
                if cohort.lanes[0] not in token_of:
                    continue  # lanes opened this step (a re-route) already hold the next token's probabilities
                step = torch.tensor([[token_of[lane]] for lane in cohort.lanes], device=self.backend.device)
                extra = {}
                if cohort.mask is not None:
                    cohort.mask = torch.cat([cohort.mask, torch.ones_like(cohort.mask[:, :1])], dim=1)
                    extra = {"attention_mask": cohort.mask, "position_ids": cohort.mask.sum(-1, keepdim=True) - 1}
                extra[_cache_kwarg(type(cohort.model))] = cohort.cache
                out = cohort.model(input_ids=step, use_cache=True, **extra)
                cohort.cache = _kv_cache(out)
                probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
                for i, lane in enumerate(cohort.lanes):
                    result[lane] = probs[i]
        return torch.stack([result[lane] for lane in lanes])

    def remove(self, lanes: list[int]) -> None:
        """Cut the lanes out of their cohorts' caches (a cohort with no lane left is dropped)."""
        import torch

        for cohort in {id(self._where[lane]): self._where[lane] for lane in lanes if lane in self._where}.values():
            keep = [i for i, lane in enumerate(cohort.lanes) if lane not in lanes]
            if not keep:
                self.cohorts = [c for c in self.cohorts if c is not cohort]
            else:
                index = torch.tensor(keep, device=self.backend.device)
                cohort.cache.batch_select_indices(index)
                cohort.mask = None if cohort.mask is None else cohort.mask[index]
                cohort.lanes = [cohort.lanes[i] for i in keep]
        for lane in lanes:
            self._where.pop(lane, None)

    def close(self) -> None:
        self.cohorts, self._where = [], {}


class SequentialBackend:
    """Experts as separate HF models (``models(cluster_id)``), one call per expert per step."""

    name = "sequential"

    def __init__(self, models: Callable[[int], object], device: str, pad_id: int, max_positions: int):
        self.models, self.device, self.pad_id, self.max_positions = models, device, pad_id, max_positions
        self._lock = threading.Lock()

    def lanes(self) -> SequentialLanes:
        return SequentialLanes(self)

    def logprobs(self, jobs: list[tuple[int, list[int]]]) -> list[np.ndarray]:
        """Teacher-forced next-token log-probabilities (float64 [len(ids) - 1]) of each (cluster_id, ids) job,
        grouped by expert so that each expert is fetched once."""
        out: list[np.ndarray | None] = [None] * len(jobs)
        by_expert: dict[int, list[int]] = {}
        for i, (expert, _) in enumerate(jobs):
            by_expert.setdefault(int(expert), []).append(i)
        for expert, idx in by_expert.items():
            model = self.models(expert)
            for i in idx:
                out[i] = expert_logprobs(model, jobs[i][1], self.max_positions, self.device)
        return out

    def tail_probs(self, jobs: list[tuple[int, list[int], int]]) -> list:
        """Next-token probabilities (float32 tensors [m, vocab]) predicting the last m tokens of each
        (cluster_id, ids, m) job; ids must fit max_positions."""
        import torch

        out: list = [None] * len(jobs)
        for i, (expert, ids, m) in enumerate(jobs):
            with torch.inference_mode():
                logits = self.models(int(expert))(input_ids=torch.tensor([ids], device=self.device)).logits[0]
            out[i] = torch.softmax(logits[len(ids) - 1 - m:len(ids) - 1].float(), dim=-1)
        return out
