"""A cbtm run as an lm-evaluation-harness model, registered as ``cbtm`` when this module is imported.

    import lm_eval
    from ensemble.harness import CbtmLM
    lm_eval.simple_evaluate(model=CbtmLM(run="runs/demo", top_k=2), tasks=["cbtm_agnews_topic"])
    # or, by name:  lm_eval.simple_evaluate(model="cbtm", model_args="run=runs/demo,top_k=2", tasks=[...])

The three request types follow c-BTM's protocols:

- ``loglikelihood(context, continuation)``: the context (the few-shot prompt) is routed once, as c-BTM routes
  downstream prompts; the continuation's tokens are scored by the mixture of the top-k experts' next-token
  probabilities (reweighted per token by `ensemble.evidence` as in scoring), and ``is_greedy`` says whether
  the mixture's argmax is the continuation at every token. The context is cut from the left to fit the experts'
  context (as lm-eval's Hugging Face model does).
- ``loglikelihood_rolling(text)``: `Ensemble.score` — the scoring protocol of `cbtm eval` (a token's weights
  come from the context before it), so the harness's perplexities agree with `cbtm eval`'s.
- ``generate_until(context, gen_kwargs)``: `Ensemble.generate`, batched, with the stop strings of ``until``.

Requests are batched through the decoding backend (`tail_probs`: every (request, expert) pair of a batch in
as few forwards as the stacked experts allow). Works on any run directory, the baselines under
``RUN/baselines`` included.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ensemble.api import Ensemble
from ensemble.evidence import EVIDENCE_TOKENS
from ensemble.scoring import mix_probs
from ground.progress import progress

log = logging.getLogger(__name__)


@register_model("cbtm")
class CbtmLM(LM):
    """``run``: a finished run directory; ``top_k`` / ``route_temperature`` / ``experts`` /
    ``exclude_experts``: the routing of every request (default: the run's); ``batch_size``: requests per
    backend call; ``max_gen_toks``: the generation limit when a task sets none."""

    def __init__(self, run: str | Path | None = None, top_k: int | None = None,
                 route_temperature: float | None = None, device: str = "auto", batch_size: int | str = 16,
                 max_gen_toks: int = 256, experts=None, exclude_experts=None, ensemble: Ensemble | None = None,
                 **unused):
        super().__init__()
        if ensemble is None and run is None:
            raise ValueError("CbtmLM needs run=RUN_DIR (a finished cbtm run) or an ensemble")
        self.ens = ensemble or Ensemble.load(run, device=device)
        self.spec = self.ens.route_spec(_opt_int(top_k), _opt_float(route_temperature), _ids(experts),
                                        _ids(exclude_experts))
        self.batch_size = 16 if batch_size in ("auto", None) else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.eos = self.ens.tokenizer.eos_token_id
        self.max_length = self.ens.max_positions

    @property
    def tokenizer_name(self) -> str:
        return str(self.ens.run.root / "tokenizer")

    # ------------------------------------------------------------------------------------------ requests
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*r.args) for r in requests]
        out: list[tuple[float, bool]] = []
        bar = progress(total=len(pairs), desc="cbtm loglikelihood", unit="req", disable=disable_tqdm)
        for lo in range(0, len(pairs), self.batch_size):
            chunk = pairs[lo:lo + self.batch_size]
            out += self._score_pairs([c for c, _, _ in chunk], [(ctx, cont) for _, ctx, cont in chunk])
            bar.update(len(chunk))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        out: list[float] = []
        bar = progress(total=len(texts), desc="cbtm loglikelihood_rolling", unit="doc", disable=disable_tqdm)
        for lo in range(0, len(texts), self.batch_size):
            chunk = texts[lo:lo + self.batch_size]
            scorable = [t for t in chunk if t.strip()]
            scores = iter(self.ens.score(scorable, self.spec.top_k, self.spec.route_temperature,
                                         self._experts(), None) if scorable else [])
            out += [float(np.sum(next(scores))) if t.strip() else 0.0 for t in chunk]
            bar.update(len(chunk))
        bar.close()
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        out: list[str] = [""] * len(requests)
        bar = progress(total=len(requests), desc="cbtm generate_until", unit="req", disable=disable_tqdm)
        for idx in groups.values():
            kwargs = dict(requests[idx[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 2)
            sample = bool(kwargs.pop("do_sample", False)) and float(kwargs.get("temperature", 1.0) or 0) > 0
            for lo in range(0, len(idx), self.batch_size):
                part = idx[lo:lo + self.batch_size]
                prompts = [self._fit_prompt(requests[i].args[0], max_new) for i in part]
                texts = self.ens.generate(prompts, max_new, self.spec.top_k, do_sample=sample,
                                          temperature=float(kwargs.get("temperature") or 1.0),
                                          stop=until or None, route_temperature=self.spec.route_temperature,
                                          experts=self._experts())
                for i, text in zip(part, texts):
                    out[i] = text
                bar.update(len(part))
        bar.close()
        return out

    # ------------------------------------------------------------------------------------------ internals
    def _experts(self) -> list[int]:
        return [int(c) for c in self.spec.columns]

    def _encode_pair(self, context: str, continuation: str) -> tuple[str, list[int], list[int]]:
        """(routing text, context ids, continuation ids): trailing spaces of the context move to the
        continuation, and the continuation's ids are those of the whole minus the context's, as in lm-eval."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.ens.encode(context + continuation)
        ctx = self.ens.encode(context) if context else []
        if whole[:len(ctx)] != ctx:  # the tokenizer merged across the boundary: score the pieces apart
            return context, ctx, self.ens.encode(continuation)
        return context, ctx, whole[len(ctx):]

    def _weights(self, contexts: list[str]) -> list[dict[int, float]]:
        """The routing of each context: top-k of the run's router; the training-size prior when it is empty."""
        out: list[dict[int, float] | None] = [None] * len(contexts)
        routed = [i for i, c in enumerate(contexts) if c.strip()]
        if routed:
            ids, weights = self.spec.weights(self.spec.router.vectors([contexts[i] for i in routed]))
            for i, row_ids, row_w in zip(routed, ids, weights):
                out[i] = {int(c): float(w) for c, w in zip(row_ids, row_w)}
        prior_ids, prior_w = self.ens.prior(self.spec.columns)
        prior = {int(c): float(w) for c, w in zip(prior_ids, prior_w) if w > 0}
        return [w if w is not None else prior for w in out]

    def _score_pairs(self, contexts: list[str], pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy) of each (context ids, continuation ids) under the mixture of
        its context's experts: each expert's next-token probabilities at the continuation's positions, weighted
        as `ensemble.evidence` reweighs them (which reads each expert's probabilities of the tokens before)."""
        weights = self._weights(contexts)
        jobs, owners = [], []
        for i, ((ctx, cont), w) in enumerate(zip(pairs, weights)):
            if not cont:
                continue
            ids = [self.eos, *ctx, *cont][-self.max_length:]
            tail = min(len(cont) + (EVIDENCE_TOKENS if self.spec.evidence.on else 0), len(ids) - 1)
            for expert in sorted(w):
                jobs.append((expert, ids, tail))
                owners.append((i, expert, ids[-tail:]))
        probs: dict[int, list] = {}
        for (i, expert, _), p in zip(owners, self.ens.backend.tail_probs(jobs) if jobs else []):
            probs.setdefault(i, []).append((expert, p))
        targets = {i: seen for i, _, seen in owners}
        out = []
        for i, (_, cont) in enumerate(pairs):
            if i not in probs:
                out.append((0.0, True))
                continue
            out.append(self._mixed_score(weights[i], probs[i], targets[i], min(len(cont), len(targets[i]))))
        return out

    def _mixed_score(self, weights: dict[int, float], probs: list, seen: list[int], n_cont: int) -> tuple[float, bool]:
        """(log p of the last ``n_cont`` of ``seen``, greedy) under the mixture of (expert, next-token probs
        float32 [len(seen), vocab]) pairs; ``seen``: the tokens those probabilities predict."""
        import torch

        w = np.array([[weights[e] for e, _ in probs]] * len(seen))
        mixed = mix_probs([p for _, p in probs], seen, w, self.spec.evidence)[-n_cont:]
        target = torch.tensor(seen[-n_cont:], device=mixed.device)
        chosen = mixed.gather(1, target[:, None])[:, 0]
        return (float(torch.log(chosen.clamp_min(1e-30)).double().sum()), bool((mixed.argmax(dim=-1) == target).all()))

    def _fit_prompt(self, context: str, max_new: int) -> str:
        """The context cut from the left so that it and ``max_new`` tokens fit the experts' context."""
        ids = self.ens.encode(context)
        room = max(1, self.max_length - 1 - max_new)
        if len(ids) <= room:
            return context if context.strip() else (self.ens.tokenizer.decode([self.eos]) or " ")
        return self.ens.tokenizer.decode(ids[-room:])


def _opt_int(value):
    return None if value in (None, "", "None") else int(value)


def _opt_float(value):
    return None if value in (None, "", "None") else float(value)


def _ids(value):
    """Cluster ids from a list or from lm-eval's ``model_args`` string form "1;3;5"."""
    if value in (None, "", "None"):
        return None
    if isinstance(value, (int, np.integer)):
        return [int(value)]
    if isinstance(value, str):
        return [int(v) for v in value.replace(";", " ").split()]
    return [int(v) for v in value]
