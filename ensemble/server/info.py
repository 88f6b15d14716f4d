"""The model card (/v1/models) and vLLM's tokenizer endpoints (/tokenize, /detokenize, /tokenizer_info).

The tokenizer endpoints let a client count and build token prompts with the server's own tokenizer:
lm-evaluation-harness's ``local-completions`` model finds them and tokenizes through them, so it needs no
tokenizer path (its ``tokenizer_backend=auto`` checks /tokenizer_info and /tokenize).
"""
from __future__ import annotations

import asyncio

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from ensemble.server.protocol import ApiError, ChatMessage, chat_prompt, now


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


def add_model_routes(app: FastAPI, ens, model: str) -> None:
    """GET /v1/models and /v1/models/{model}; /tokenize, /detokenize and GET /tokenizer_info."""
    def card() -> dict:
        experts = [{k: e[k] for k in ("cluster_id", "keywords", "size", "skipped", "removed")} for e in ens.experts]
        return {"id": model, "object": "model", "created": now(), "owned_by": "cbtm",
                "cbtm": {"experts": experts, "top_k": ens.top_k, "route_temperature": ens.route_temperature,
                         "evidence_weight": ens.evidence.weight, "context_length": ens.max_positions}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{name}")
    async def one_model(name: str):
        if name != model:
            raise ApiError(404, f"the model {name!r} does not exist: this server serves {model!r}", "model",
                           "model_not_found")
        return card()

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = ens.tokenizer
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "chat_template": getattr(tok, "chat_template", None),
                "model_max_length": ens.max_positions, "vocab_size": len(tok)}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "send one of prompt (a string) or messages (a chat)", "prompt")
        text = body.prompt if body.prompt is not None else chat_prompt(ens.tokenizer, body.messages)
        # In a worker thread: a long text takes seconds to tokenize (2.9 s for 2.9 MB), which streams must not wait on.
        ids = await asyncio.to_thread(ens.encode, text, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": ens.max_positions}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        vocab = len(ens.tokenizer)
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"tokens: id {bad} is outside this model's vocabulary (0..{vocab - 1})", "tokens")
        return {"prompt": ens.engine.decode(body.tokens)}
