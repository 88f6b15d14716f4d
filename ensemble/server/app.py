"""The FastAPI application of `cbtm serve`: OpenAI-compatible routes over one `Ensemble`."""
from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ensemble.routing import route_texts
from ensemble.server.echo import PromptLimit, echo_blocks, join_blocks, prompt_logprobs, read_prompts
from ensemble.server.generation import (
    ChoiceText,
    build_job,
    check_logprobs,
    chunk,
    finish_reason,
    routing_extension,
    sampling_for,
    sse,
    usage,
)
from ensemble.server.info import add_model_routes
from ensemble.server.metrics import Metrics
from ensemble.server.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    RouteRequest,
    chat_prompt,
    now,
    refuse_unimplemented,
    request_id,
)
from ensemble.server.scheduler import QueueFull, RouteBatcher, Scheduler

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    """Limits and identity of one server (`cbtm serve` flags)."""

    model: str
    max_batch_size: int = 32
    max_queue: int = 256
    max_prompt_tokens: int | None = None  # None: the context length
    max_tokens: int | None = None         # None: the context length
    api_key: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_prompt_tokens", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")


class ServerState:
    def __init__(self, ens, settings: ServeSettings):
        context = ens.max_positions
        settings.max_prompt_tokens = min(settings.max_prompt_tokens or context, context)
        settings.max_tokens = min(settings.max_tokens or context, context)
        self.ens, self.settings, self.metrics = ens, settings, Metrics()
        self.limit = PromptLimit.of(ens, settings.max_prompt_tokens)
        self.scheduler = Scheduler(ens.engine, settings.max_batch_size, settings.max_queue, self.metrics)
        self.router = RouteBatcher(route_texts)


def create_app(ens, settings: ServeSettings):
    """The ASGI app serving ``ens``; the scheduler thread starts and stops with the app's lifespan."""
    state = ServerState(ens, settings)
    app = FastAPI(title="cbtm", description="A c-BTM ensemble behind an OpenAI-compatible API",
                  lifespan=_lifespan(state))
    app.state.cbtm = state
    _add_error_handlers(app, state)
    if settings.api_key:
        app.add_middleware(ApiKey, key=settings.api_key, metrics=state.metrics)
    _add_info_routes(app, state)
    add_model_routes(app, ens, settings.model)
    _add_completion_route(app, state)
    _add_chat_route(app, state)
    return app


def _lifespan(state: ServerState):
    """The app's lifespan: the scheduler runs while the app does; SIGHUP reloads changed experts."""
    @asynccontextmanager
    async def lifespan(app):
        state.scheduler.start()
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP,
                                                          lambda: asyncio.ensure_future(_reload(state.ens)))
        except (RuntimeError, ValueError, NotImplementedError):
            pass  # not the main thread (tests) or no SIGHUP on this platform
        yield
        state.scheduler.stop()
        state.router.stop()
    return lifespan


async def _reload(ens) -> dict:
    changed = await asyncio.to_thread(ens.reload)
    return {"object": "reload", "changed_experts": changed}


def _add_error_handlers(app: FastAPI, state: ServerState) -> None:
    """OpenAI-style error bodies for ApiError and for request validation (400 bad JSON, 422 bad field)."""
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        state.metrics.request(request.url.path, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return await api_error(request, ApiError(400, "the request body is not valid JSON", None, "invalid_json"))
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ())[1:]]
        param = loc[0] if loc else None  # the request field; the rest of the path says where inside it
        return await api_error(request, ApiError(422, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}",
                                                 param))


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    """/health, /v1/route, /v1/reload and /metrics."""
    ens = state.ens

    @app.get("/health")
    async def health():
        ok = state.scheduler.alive
        return JSONResponse({"status": "ok" if ok else "starting", "experts": ens.n_experts},
                            status_code=200 if ok else 503)

    @app.post("/v1/route")
    async def route(body: RouteRequest):
        texts = [body.input] if isinstance(body.input, str) else body.input
        try:
            routes = await asyncio.to_thread(ens.route, texts, body.top_k, body.route_temperature, body.experts,
                                             body.exclude_experts)
        except ValueError as exc:
            raise ApiError(400, str(exc), "input") from exc
        keywords = {e["cluster_id"]: e["keywords"][:5] for e in ens.experts}
        data = [{"index": i, "routing": [{"cluster_id": c, "weight": w, "keywords": keywords.get(c, [])} for c, w in r]}
                for i, r in enumerate(routes)]
        return {"object": "route", "data": data}

    @app.post("/v1/reload")
    async def reload():
        return await _reload(ens)

    @app.get("/metrics")
    async def metrics():
        state.metrics.batch(state.scheduler.queue_depth(), state.metrics.active_rows, state.metrics.expert_lanes)
        return PlainTextResponse(state.metrics.render([e["cluster_id"] for e in ens.experts]),
                                 media_type="text/plain; version=0.0.4")


def _add_completion_route(app: FastAPI, state: ServerState) -> None:
    """/v1/completions, streamed (SSE) or whole; with ``echo``, the prompt (scored) first."""
    ens, settings = state.ens, state.settings

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model, settings)
        refuse_unimplemented(body)
        prompts = read_prompts(ens, body.prompt, state.limit)
        samplings = sampling_for(body.temperature, body.top_p, body.seed, body.stop, body.n)
        logprobs = check_logprobs(body.logprobs, "logprobs")
        job = build_job(state, prompts, body.max_tokens, samplings, body, logprobs, body.echo)
        n, prompt_tokens = len(samplings), prompts.n_tokens
        heads = await _echo(state, prompts, job.spec, logprobs, n) if body.echo else None
        rid, include = request_id("cmpl"), bool((body.stream_options or {}).get("include_usage"))
        if job.max_new_tokens == 0:  # echo alone: the prompt scored, nothing to generate
            return _echo_only(state, job, rid, heads, prompt_tokens, n, body.stream, include)
        if body.stream:
            return StreamingResponse(_stream(state, job, rid, "text_completion", n, prompt_tokens, include, False,
                                             heads), media_type="text/event-stream")
        texts = await _run(state, job, request, prompt_tokens)
        heads = heads or [("", None)] * len(texts)
        return {"id": rid, "object": "text_completion", "created": now(), "model": settings.model,
                "choices": [{"index": i, "text": head + t.engine.text(t.row),
                             "logprobs": join_blocks(block, t.logprob_block(), len(head)),
                             "finish_reason": finish_reason(t.row)} for i, (t, (head, block)) in
                            enumerate(zip(texts, heads))],
                "usage": usage(prompt_tokens, job), "cbtm": routing_extension(job, n)}


def _add_chat_route(app: FastAPI, state: ServerState) -> None:
    """/v1/chat/completions, streamed (SSE) or whole."""
    ens, settings = state.ens, state.settings

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _check_model(body.model, settings)
        refuse_unimplemented(body)
        if not body.messages:
            raise ApiError(400, "messages is empty: send at least one message", "messages")
        prompts = read_prompts(ens, chat_prompt(ens.tokenizer, body.messages), state.limit)
        samplings = sampling_for(body.temperature, body.top_p, body.seed, body.stop, body.n)
        top = check_logprobs(body.top_logprobs, "top_logprobs") if body.logprobs else None
        job = build_job(state, prompts, body.max_completion_tokens or body.max_tokens, samplings, body,
                        (top or 0) if body.logprobs else None)
        n, prompt_tokens = len(samplings), prompts.n_tokens
        rid, include = request_id("chatcmpl"), bool((body.stream_options or {}).get("include_usage"))
        if body.stream:
            return StreamingResponse(_stream(state, job, rid, "chat.completion.chunk", n, prompt_tokens, include, True),
                                     media_type="text/event-stream")
        texts = await _run(state, job, request, prompt_tokens)
        return {"id": rid, "object": "chat.completion", "created": now(), "model": settings.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": t.engine.text(t.row)},
                             "logprobs": _chat_logprobs(t), "finish_reason": finish_reason(t.row)}
                            for i, t in enumerate(texts)],
                "usage": usage(prompt_tokens, job), "cbtm": routing_extension(job, n)}


class ApiKey:
    """Pure ASGI middleware: every path but /health needs ``Authorization: Bearer KEY`` (a plain ASGI layer,
    because Starlette's BaseHTTPMiddleware slows streamed responses down)."""

    def __init__(self, app, key: str, metrics: Metrics):
        self.app, self.expected, self.metrics = app, f"Bearer {key}".encode(), metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                self.metrics.request(scope["path"], 401)
                response = JSONResponse(ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                                                 None, "invalid_api_key").body(), status_code=401)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _check_model(model: str | None, settings: ServeSettings) -> None:
    if model not in (None, "", settings.model):
        raise ApiError(404, f"the model {model!r} does not exist: this server serves {settings.model!r}", "model",
                       "model_not_found")


async def _submit(state: ServerState, job) -> None:
    """Route the job's prompts here, in a worker thread (the embedder would otherwise stall every row of the
    running batch), then queue it."""
    if state.scheduler.queue_depth() >= state.settings.max_queue:
        raise ApiError(429, f"the server is busy: {state.settings.max_queue} requests are waiting; retry shortly",
                       None, "queue_full", "rate_limit_error", headers={"Retry-After": "1"})
    job.weights = await state.router.route(job.prompts, [job.spec] * len(job.prompts))
    try:
        state.scheduler.submit(job)
    except QueueFull:
        raise ApiError(429, f"the server is busy: {state.settings.max_queue} requests are waiting; retry shortly",
                       None, "queue_full", "rate_limit_error", headers={"Retry-After": "1"}) from None


async def _run(state: ServerState, job, request, prompt_tokens: int) -> list[ChoiceText]:
    """Wait for every row of ``job`` (cancelling it if the client goes away); its choices' texts."""
    await _submit(state, job)
    texts: dict[int, ChoiceText] = {}
    done, total = 0, len(job.prompts)
    try:
        while done < total:
            try:
                kind, payload = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    raise ApiError(499, "the client closed the connection", None, "client_closed")
                continue
            if kind == "error":
                raise ApiError(500, f"generation failed: {payload}", None, "generation_failed", "server_error")
            for index, event in payload:
                texts.setdefault(index, ChoiceText(state.ens.engine, job.rows[index])).add(event)
                done += event.finish is not None
    except BaseException:
        job.cancel()
        raise
    _record(state, job, prompt_tokens, request.url.path)
    return [texts.get(i) or ChoiceText(state.ens.engine, job.rows[i]) for i in range(total)]


async def _echo(state: ServerState, prompts, spec, top_n: int | None, n: int) -> list[tuple[str, dict | None]]:
    """Per choice (prompt i choice j is i * n + j): the echoed prompt's text and its logprobs block, scored in a
    worker thread (as routing is) when logprobs were asked for."""
    scored = None
    if top_n is not None:
        scored = await asyncio.to_thread(prompt_logprobs, state.ens, prompts.encoded, spec, top_n)
    blocks = echo_blocks(state.ens, prompts, scored, top_n)
    return [(text, block) for text, block in zip(prompts.texts, blocks) for _ in range(n)]


def _echo_only(state: ServerState, job, rid: str, heads, prompt_tokens: int, n: int, stream: bool, include: bool):
    """The answer to ``echo`` with ``max_tokens`` 0: each choice is its prompt, finished ("length")."""
    _record(state, job, prompt_tokens, "/v1/completions")
    choices = [{"index": i, "text": head, "logprobs": block, "finish_reason": "length"}
               for i, (head, block) in enumerate(heads)]
    if not stream:
        return {"id": rid, "object": "text_completion", "created": now(), "model": state.settings.model,
                "choices": choices, "usage": usage(prompt_tokens, job), "cbtm": routing_extension(job, n)}

    def events():
        yield sse(chunk("text_completion", rid, state.settings.model, choices))
        if include:
            yield sse(chunk("text_completion", rid, state.settings.model, [], usage=usage(prompt_tokens, job),
                            cbtm=routing_extension(job, n)))
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


async def _stream(state: ServerState, job, rid: str, kind: str, n: int, prompt_tokens: int, include_usage: bool,
                  chat: bool, heads: list[tuple[str, dict | None]] | None = None):
    """Server-sent events: ``data: {chunk}`` per new piece of text, then ``data: [DONE]``; ``heads``: each
    choice's echoed prompt, sent first."""
    await _submit(state, job)
    model = state.settings.model
    texts: dict[int, ChoiceText] = {}
    done, total = 0, len(job.prompts)
    try:
        if chat:
            yield sse(chunk(kind, rid, model, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                               "finish_reason": None} for i in range(total)]))
        if heads:
            yield sse(chunk(kind, rid, model, [{"index": i, "text": head, "logprobs": block, "finish_reason": None}
                                               for i, (head, block) in enumerate(heads)]))
        while done < total:
            items = [await job.events.get()]
            while not job.events.empty():  # steps that came while we wrote: one chunk for all of them
                items.append(job.events.get_nowait())
            if any(kind_ == "error" for kind_, _ in items):
                message = next(payload for kind_, payload in items if kind_ == "error")
                yield sse({"error": {"message": f"generation failed: {message}", "type": "server_error",
                                     "param": None, "code": "generation_failed"}})
                return
            touched, finished = {}, set()
            for _, payload in items:
                for index, event in payload:
                    touched[index] = texts.setdefault(index, ChoiceText(state.ens.engine, job.rows[index]))
                    touched[index].add(event)
                    if event.finish is not None:
                        finished.add(index)
            deltas = []
            for index, text in touched.items():
                piece = text.piece()
                if piece or index in finished:  # tokens of a held-back piece go with the next chunk's
                    deltas.append(_delta(text, index, piece, chat, len(heads[index][0]) if heads else 0))
            done += len(finished)
            if deltas:
                yield sse(chunk(kind, rid, model, deltas))
        _record(state, job, prompt_tokens, "/v1/chat/completions" if chat else "/v1/completions")
        if include_usage:
            yield sse(chunk(kind, rid, model, [], usage=usage(prompt_tokens, job), cbtm=routing_extension(job, n)))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client went away mid-stream (or we are done): its rows leave the batch now


def _delta(text: ChoiceText, index: int, piece: str, chat: bool, shift: int = 0) -> dict:
    """One choice's part of a streamed chunk: its new text and the logprobs of its tokens not sent yet."""
    reason = finish_reason(text.row) if text.row.finish else None
    start, text.logprobs_sent = text.logprobs_sent, len(text.tokens)
    if chat:
        return {"index": index, "delta": {"content": piece} if piece else {}, "logprobs": _chat_logprobs(text, start),
                "finish_reason": reason}
    return {"index": index, "text": piece, "logprobs": text.logprob_block(start, shift), "finish_reason": reason}


def _chat_logprobs(text: ChoiceText, start: int = 0) -> dict | None:
    block = text.logprob_block(start)
    if block is None:
        return None
    tops = block["top_logprobs"] or [None] * len(block["tokens"])
    return {"content": [{"token": t, "logprob": lp,
                         "top_logprobs": [{"token": k, "logprob": v} for k, v in (top or {}).items()]}
                        for t, lp, top in zip(block["tokens"], block["token_logprobs"], tops)]}


def _record(state: ServerState, job, prompt_tokens: int, endpoint: str) -> None:
    state.metrics.tokens(prompt=prompt_tokens)
    for row in job.rows:
        state.metrics.tokens(completion=len(row.produced), experts=row.routed)
    state.metrics.request(endpoint, 200, time.perf_counter() - job.arrived)
