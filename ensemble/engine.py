"""The decoding engine: rows (prompts) decode together, each row's next token drawn from the routing-weighted
mixture of its experts' next-token probabilities. It knows nothing of `Ensemble`: it takes a backend (which
runs experts by cluster_id), the tokenizer, a routing callable and the context length.

A row is served by one *lane* per expert it is routed to: the lane holds that expert's KV state over the row's
tokens. A `Batch` takes rows at any step (`add`), drops finished or cancelled rows at once, and per `step` asks
the backend once for every lane (a backend runs each expert once on all its lanes, or all experts in one
stacked call). ``reroute_every=N`` re-routes a row every N tokens: lanes of experts that leave are dropped,
experts that enter get a lane prefilled from the row's whole context.

Within a row's routed experts, the weights follow ``route_spec.evidence`` (`ensemble.evidence`): after every
token each lane's probability of it joins that expert's evidence, which a new lane starts from its prefill's
log-probabilities of the context's last tokens — the weights `Ensemble.score` gives the same text.

Backends implement ``lanes() -> LaneSet`` where a LaneSet has ``add(experts, contexts, tail) -> (lane ids, probs,
log-probs of each context's last ``tail`` tokens)``, ``step(lane ids, tokens) -> probs`` and
``remove(lane ids)``; probs are float32 [n, vocab].
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

from ensemble.evidence import EVIDENCE_TOKENS
from ensemble.sampling import Sampling, cut_at_stop, pick_token

# texts, one routing spec per text -> one {cluster_id: weight} per text (weights sum to 1)
RouteFn = Callable[[list[str], list[object]], list[dict[int, float]]]
STOP_WINDOW = 32  # tokens decoded to look for a stop string after each new token


class LaneSet(Protocol):
    def add(self, experts: list[int], contexts: list[list[int]], tail: int = 0): ...
    def step(self, lanes: list[int], tokens: list[int]): ...
    def remove(self, lanes: list[int]) -> None: ...
    def close(self) -> None: ...


@dataclass
class Row:
    """One prompt being continued. ``finish`` is None while it decodes, then "stop" (eos or a stop string),
    "length" (max_new_tokens reached) or "cancelled". ``lanes``, ``lane_probs`` and ``seen`` are keyed by
    cluster_id; ``weights`` are the ``routing`` weights reweighted by the evidence in ``seen``."""

    prompt: str
    ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    route_spec: object = None
    reroute_every: int | None = None
    produced: list[int] = field(default_factory=list)
    weights: dict[int, float] = field(default_factory=dict)
    routed: dict[int, float] = field(default_factory=dict)  # the weights the row started with
    routing: dict[int, float] = field(default_factory=dict)  # the router's weights now (before evidence)
    seen: dict[int, list] = field(default_factory=dict)  # per expert, log p of the row's last tokens, oldest first
    lanes: dict[int, int] = field(default_factory=dict)
    lane_probs: dict[int, object] = field(default_factory=dict)  # float32 [vocab] next-token probs per expert
    finish: str | None = None
    generator: object = None
    tag: object = None  # the caller's handle (a server request)
    logprobs: int | None = None  # report the chosen token's log-probability and this many alternatives

    def mixture(self):
        """The routing-weighted sum of the lanes' next-token probabilities, float32 [vocab]; summed in cluster_id
        order, so the same row gives the same sum in any batch."""
        out = None
        for expert, weight in self.weights.items():
            term = float(weight) * self.lane_probs[expert]
            out = term if out is None else out + term
        return out

    @property
    def evidence(self):
        """The `ensemble.evidence.Evidence` of the row's routing, or None when it is off."""
        evidence = getattr(self.route_spec, "evidence", None)
        return evidence if evidence is not None and evidence.on else None

    def reweigh(self) -> None:
        """``weights`` from ``routing`` and the evidence so far (the routing itself when evidence is off)."""
        evidence = self.evidence
        self.weights = evidence.reweigh_one(self.routing, self.seen) if evidence else dict(self.routing)

    def observe(self, token: int) -> None:
        """Each lane's log-probability of the row's new ``token`` joins its expert's evidence."""
        if self.evidence is None:
            return
        for expert, probs in self.lane_probs.items():
            recent = self.seen.setdefault(expert, [])
            recent.append(math.log(max(float(probs[token]), 1e-300)))
            del recent[:-EVIDENCE_TOKENS]
        self.reweigh()


@dataclass
class StepEvent:
    row: Row
    token: int | None  # None when the row ended without a new token (eos)
    finish: str | None
    logprob: float | None = None  # log of the mixture's probability of the token (rows with logprobs set)
    top: list | None = None       # [(token, logprob)] of the mixture's most likely tokens (logprobs > 0)


def mixtures(rows: list[Row]) -> list:
    """Every row's `Row.mixture` (float32 [vocab] each), computed for all rows with as many experts at once:
    the same operations in the same order per element as row by row, so the result is the same bits."""
    import torch

    out: list = [None] * len(rows)
    by_k: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_k.setdefault(len(row.weights), []).append(i)
    for k, idx in by_k.items():
        if len(idx) == 1:
            out[idx[0]] = rows[idx[0]].mixture()
            continue
        experts = [list(rows[i].weights.items()) for i in idx]
        w = torch.tensor([[w for _, w in pairs] for pairs in experts], dtype=torch.float32)
        total = None
        for j in range(k):
            term = w[:, j:j + 1] * torch.stack([rows[i].lane_probs[experts[n][j][0]] for n, i in enumerate(idx)])
            total = term if total is None else total + term
        for n, i in enumerate(idx):
            out[i] = total[n]
    return out


def _logprobs(mixture, token: int, n: int | None):
    """(log p(token), [(token, log p)] of the ``n`` most likely) under the mixture; (None, None) if not asked."""
    import torch

    if n is None:
        return None, None
    logp = torch.log(mixture.clamp_min(1e-30))
    top = None
    if n > 0:
        values, ids = torch.topk(logp, n)
        top = [(int(i), float(v)) for i, v in zip(ids, values)]
    return float(logp[token]), top


class Batch:
    """Rows decoding together; rows can join (`add`) and leave (`cancel`) between steps. One thread steps a
    batch (the server's scheduler, or one `Engine.generate` call)."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.lanes = engine.backend.lanes()
        self.rows: list[Row] = []
        self._new: list[Row] = []

    def add(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, route_spec=None,
            reroute_every: int | None = None, prompt: str = "", tag=None, row_index: int = 0,
            logprobs: int | None = None, weights: dict[int, float] | None = None) -> Row:
        """Queue a row; it is routed (unless ``weights`` are given, routed already) and prefilled at the next
        `step`. ``prompt_ids`` exclude the leading eos; ``row_index`` offsets the sampling seed (prompt i of a
        call samples with seed + i)."""
        eos = self.engine.tokenizer.eos_token_id
        row = Row(prompt, [eos, *prompt_ids], int(max_new_tokens), sampling, route_spec, reroute_every,
                  generator=sampling.generator(row_index), tag=tag, logprobs=logprobs)
        if weights is not None:
            row.weights = row.routed = row.routing = dict(sorted(weights.items()))
        self._new.append(row)
        return row

    def cancel(self, row: Row) -> None:
        """Stop ``row`` now (a client that went away): its lanes are freed at once."""
        if row.finish is None:
            row.finish = "cancelled"
            self._drop(row)

    @property
    def active(self) -> list[Row]:
        return [r for r in [*self.rows, *self._new] if r.finish is None]

    def step(self) -> list[StepEvent]:
        """Prefill the rows that joined, then give every active row one token. Returns one event per row
        that produced a token or ended in this step."""
        self._admit()
        live = [r for r in self.rows if r.finish is None]
        events = [self._advance(row, mixture) for row, mixture in zip(live, mixtures(live))]
        self.rows = [r for r in live if r.finish is None]
        due = [r for r in self.rows if r.reroute_every and len(r.produced) % r.reroute_every == 0]
        fresh = self._reroute(due) if due else set()
        self._feed([(row, e) for row in self.rows for e in row.lanes if (id(row), e) not in fresh])
        return events

    def close(self) -> None:
        for row in self.active:
            self.cancel(row)
        self.lanes.close()

    # ------------------------------------------------------------------------------------------ internals
    def _admit(self) -> None:
        new = [r for r in self._new if r.finish is None]
        self._new = []
        if not new:
            return
        unrouted = [r for r in new if not r.weights]
        if unrouted:
            routes = self.engine.route([r.prompt for r in unrouted], [r.route_spec for r in unrouted])
            for row, route in zip(unrouted, routes):
                row.weights = row.routed = row.routing = dict(sorted(route.items()))
        self._open([(row, e) for row in new for e in row.weights])
        self.rows.extend(new)

    def _open(self, pairs: list[tuple[Row, int]]) -> None:
        """New lanes, prefilled with their row's whole context: their probs are the next token's, and the
        log-probabilities of the context's last tokens start their expert's evidence."""
        if pairs:
            tail = EVIDENCE_TOKENS if any(row.evidence for row, _ in pairs) else 0
            lane_ids, probs, seen = self.lanes.add([e for _, e in pairs], [row.ids for row, _ in pairs], tail)
            for (row, expert), lane, p, lp in zip(pairs, lane_ids, probs, seen):
                row.lanes[expert], row.lane_probs[expert] = lane, p
                row.seen[expert] = [float(v) for v in lp]
            for row in {id(row): row for row, _ in pairs}.values():
                row.reweigh()

    def _feed(self, pairs: list[tuple[Row, int]]) -> None:
        """The given lanes consume their row's newest token."""
        if pairs:
            probs = self.lanes.step([row.lanes[e] for row, e in pairs], [row.ids[-1] for row, _ in pairs])
            for (row, expert), p in zip(pairs, probs):
                row.lane_probs[expert] = p

    def _advance(self, row: Row, mixture) -> StepEvent:
        token = pick_token(mixture, row.sampling, row.generator)
        logprob, top = _logprobs(mixture, token, row.logprobs)
        if token == self.engine.tokenizer.eos_token_id:
            row.finish = "stop"
            self._drop(row)
            return StepEvent(row, None, "stop", logprob, top)
        row.observe(token)  # the lanes' probabilities of this token, before they move on
        row.produced.append(token)
        row.ids.append(token)
        if row.sampling.stop and any(s in self.engine.decode(row.produced[-STOP_WINDOW:]) for s in row.sampling.stop):
            row.finish = "stop"  # the caller cuts the text at the stop string
        elif len(row.produced) >= row.max_new_tokens:
            row.finish = "length"
        if row.finish:
            self._drop(row)
        return StepEvent(row, token, row.finish, logprob, top)

    def _drop(self, row: Row) -> None:
        if row.lanes:
            self.lanes.remove(list(row.lanes.values()))
        row.lanes, row.lane_probs = {}, {}

    def _reroute(self, rows: list[Row]) -> set[tuple[int, int]]:
        """New weights for ``rows`` from their context so far; returns the (row, expert) lanes opened now."""
        texts = [r.prompt + self.engine.decode(r.produced) for r in rows]
        entering = []
        for row, route in zip(rows, self.engine.route(texts, [r.route_spec for r in rows])):
            leaving = [e for e in row.lanes if e not in route]
            if leaving:
                self.lanes.remove([row.lanes.pop(e) for e in leaving])
                for e in leaving:
                    row.lane_probs.pop(e, None)
                    row.seen.pop(e, None)
            entering += [(row, e) for e in route if e not in row.lanes]
            row.routing = dict(sorted(route.items()))
            row.reweigh()
        self._open(entering)
        return {(id(row), e) for row, e in entering}


class Decoding:
    """One call's rows decoding together; iterating yields each step's events and closes the batch at the end."""

    def __init__(self, engine: "Engine", prompts: list[str], max_new_tokens: int, sampling: Sampling, route_spec,
                 reroute_every: int | None):
        encoded = [engine.encode(p) for p in prompts]
        for i, ids in enumerate(encoded):
            engine.check_fits(len(ids), max_new_tokens, None if len(prompts) == 1 else i)
        self.batch = Batch(engine)
        self.rows = [self.batch.add(ids, max_new_tokens, sampling, route_spec, reroute_every, prompt=p, row_index=i)
                     for i, (p, ids) in enumerate(zip(prompts, encoded))]
        self.max_new_tokens = max_new_tokens

    def __iter__(self) -> Iterator[list[StepEvent]]:
        try:
            while self.max_new_tokens > 0 and self.batch.active:
                yield self.batch.step()
        finally:
            self.batch.close()


class Engine:
    """Generation from a routed mixture of experts over any backend (sequential HF models or stacked)."""

    def __init__(self, backend, tokenizer, route: RouteFn, context_length: int,
                 tokenizer_lock: threading.Lock | None = None):
        self.backend, self.tokenizer, self.route = backend, tokenizer, route
        self.context_length = int(context_length)
        self.tokenizer_lock = tokenizer_lock or threading.Lock()

    def encode(self, text: str) -> list[int]:
        with self.tokenizer_lock:  # fast tokenizers are not safe to call from several threads at once
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def check_fits(self, n_prompt: int, max_new_tokens: int, index: int | None = None) -> None:
        """ValueError when a prompt of ``n_prompt`` tokens cannot take ``max_new_tokens`` more in the context
        (one position holds the leading end-of-text token)."""
        room = self.context_length - 1 - n_prompt
        if max_new_tokens > room:
            which = "the prompt" if index is None else f"prompt {index}"
            raise ValueError(f"{which} has {n_prompt} tokens, so at most {max(room, 0)} new tokens fit in the "
                             f"context of {self.context_length} positions, got max_new_tokens={max_new_tokens}: "
                             "shorten the prompt or ask for fewer tokens")

    def generate(self, prompts: Sequence[str], max_new_tokens: int, sampling: Sampling, route_spec=None,
                 reroute_every: int | None = None) -> "Decoding":
        """Decode ``prompts`` together: iterate the result for each step's events; ``.rows`` in prompt order.
        Raises ValueError at once when a prompt and ``max_new_tokens`` do not fit the context."""
        return Decoding(self, list(prompts), max_new_tokens, sampling, route_spec, reroute_every)

    def text(self, row: Row) -> str:
        """The row's completion so far, cut at its first stop string."""
        return cut_at_stop(self.decode(row.produced), row.sampling.stop)[0]
