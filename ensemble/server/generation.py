"""From a validated request to a `Job`, and from a finished (or streaming) job to OpenAI's response shapes."""
from __future__ import annotations

import asyncio
import json
import math

from ensemble.sampling import Sampling
from ensemble.server.echo import Prompts
from ensemble.server.protocol import ApiError, now
from ensemble.server.scheduler import Job

MAX_N = 8
MAX_LOGPROBS = 5


def sampling_for(temperature, top_p, seed, stop, n: int) -> list[Sampling]:
    """One `Sampling` per choice (choice j of a prompt samples with seed + j). temperature 0 means greedy."""
    temperature = 1.0 if temperature is None else temperature
    top_p = 1.0 if top_p is None else top_p
    if not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be between 1 and {MAX_N}, got {n}", "n")
    if not math.isfinite(temperature) or temperature < 0:
        raise ApiError(400, f"temperature must be a number >= 0 (0: greedy), got {temperature}", "temperature")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    try:
        return [Sampling(temperature > 0, temperature if temperature > 0 else 1.0, top_p,
                         None if seed is None else seed + j, tuple(stops)) for j in range(n)]
    except ValueError as exc:
        param = next((p for p in ("top_p", "seed", "stop") if str(exc).startswith(p) or p in str(exc)), None)
        raise ApiError(400, str(exc), param) from exc


def check_logprobs(value: int | None, param: str) -> int | None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise ApiError(400, f"{param} must be between 0 and {MAX_LOGPROBS}, got {value}", param)
    return value


def route_spec(ens, ext):
    """The checked routing of a request's extensions (400 naming the field)."""
    try:
        spec = ens.route_spec(ext.top_k, ext.route_temperature, ext.experts, ext.exclude_experts)
    except ValueError as exc:
        names = ("exclude_experts", "experts", "top_k", "route_temperature")
        param = next((p for p in names if str(exc).startswith(p)), "experts")
        raise ApiError(400, str(exc), param) from exc
    if ext.reroute_every is not None and ext.reroute_every < 1:
        raise ApiError(400, f"reroute_every must be >= 1 (tokens) or null, got {ext.reroute_every}", "reroute_every")
    return spec


def build_job(state, prompts: Prompts, max_tokens: int | None, samplings: list[Sampling], ext, logprobs,
              echo: bool = False) -> Job:
    """Check ``max_tokens`` against the room the prompts leave (never cut them) and build the job: prompt i
    choice j is row i * n + j. ``max_tokens`` None: as many as fit; 0 only with ``echo`` (the prompt scored,
    nothing generated)."""
    ens, settings = state.ens, state.settings
    spec = route_spec(ens, ext)
    context = ens.max_positions
    longest = max(len(ids) for ids in prompts.encoded)  # within max_prompt_tokens: `read_prompts` checked it
    room = context - 1 - longest
    if max_tokens is None:
        max_tokens = min(settings.max_tokens, room)
    if max_tokens < (0 if echo else 1):
        raise ApiError(400, f"max_tokens must be >= 1 (0 only with echo), got {max_tokens}", "max_tokens")
    if max_tokens > room:
        which = "the prompt" if len(prompts.encoded) == 1 else "the longest prompt"
        raise ApiError(400, f"this model's context is {context} tokens: {which} ({longest} token"
                       f"{'' if longest == 1 else 's'}, after one leading end-of-text token) leaves room for "
                       f"{max(room, 0)} new tokens, but max_tokens is {max_tokens}", "max_tokens",
                       "context_length_exceeded")
    if max_tokens > settings.max_tokens:
        raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens}",
                       "max_tokens")
    rows = [(p, ids, s) for p, ids in zip(prompts.texts, prompts.encoded) for s in samplings]
    return Job([r[0] for r in rows], [r[1] for r in rows], max_tokens, [r[2] for r in rows], spec, ext.reroute_every,
               logprobs, asyncio.get_running_loop())


class ChoiceText:
    """The text of one choice as it streams: pieces are released only when they cannot be taken back (a
    half-written character, or what might still grow into a stop string, is held back until the end)."""

    def __init__(self, engine, row):
        self.engine, self.row, self.sent = engine, row, ""
        self.holdback = max((len(s) for s in row.sampling.stop), default=1) - 1
        self.tokens: list[int] = []
        self.pieces: list[str] = []  # each token decoded alone, when logprobs are asked for
        self.logprobs_sent = 0  # tokens whose logprobs a streamed chunk has carried
        self.logprobs: list[float] = []
        self.top: list[dict] = []

    def add(self, event) -> None:
        if event.token is not None:
            self.tokens.append(event.token)
            if self.row.logprobs is not None:
                self.pieces.append(self.engine.decode([event.token]))
            if event.logprob is not None:
                self.logprobs.append(event.logprob)
            if event.top is not None:
                self.top.append({self.engine.decode([t]): lp for t, lp in event.top})

    def piece(self) -> str:
        text = self.engine.text(self.row)
        if self.row.finish is None:
            text = text[: max(len(self.sent), len(text) - self.holdback)]
            if text.endswith("\ufffd"):
                text = text[: len(self.sent)]
        out, self.sent = text[len(self.sent):], max(text, self.sent, key=len)
        return out

    def logprob_block(self, start: int = 0, offset: int = 0) -> dict | None:
        """OpenAI's logprobs block of the tokens from ``start`` on; ``text_offset`` counts from the completion's
        start (plus ``offset``: an echoed prompt's length), also in a streamed chunk that begins mid-text."""
        if self.row.logprobs is None:
            return None
        tokens = self.pieces[start:]  # decoded as they came, not again for every streamed chunk
        offsets, at = [], offset + sum(len(t) for t in self.pieces[:start])
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": self.logprobs[start:], "text_offset": offsets,
                "top_logprobs": self.top[start:] if self.row.logprobs else None}


def finish_reason(row) -> str | None:
    return {"stop": "stop", "length": "length", "cancelled": "stop"}.get(row.finish)


def routing_extension(job: Job, n: int) -> dict:
    choices = []
    for i, row in enumerate(job.rows):
        entry = {"index": i, "prompt_index": i // n,
                 "experts": [{"cluster_id": c, "weight": round(w, 6)} for c, w in row.routed.items()]}
        if row.reroute_every:
            entry["final_experts"] = [{"cluster_id": c, "weight": round(w, 6)} for c, w in row.weights.items()]
        choices.append(entry)
    return {"choices": choices, "top_k": job.spec.top_k, "route_temperature": job.spec.route_temperature,
            "allowed_experts": list(job.spec.columns)}


def usage(prompt_tokens: int, job: Job) -> dict:
    completion = sum(len(r.produced) for r in job.rows)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def chunk(kind: str, rid: str, model: str, choices: list[dict], **extra) -> dict:
    return {"id": rid, "object": kind, "created": now(), "model": model, "choices": choices, **extra}
