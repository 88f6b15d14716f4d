"""Request and response shapes of the OpenAI-compatible API, cbtm's extensions, and OpenAI's error format.

The extensions ride in the request body beside OpenAI's fields: ``top_k``, ``route_temperature``,
``experts`` (only these cluster ids may serve the request), ``exclude_experts`` (these may not: a data owner
opting out) and ``reroute_every``. Responses carry a ``cbtm`` object saying which experts served each choice
with which weights.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

# A plain template for base LMs whose tokenizer has none: they continue text, they were not tuned to chat.
CHAT_TEMPLATE = "{role}: {content}\n\n"
CHAT_PROMPT_END = "Assistant:"


class ApiError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Extensions(BaseModel):
    """cbtm's routing fields, accepted on every generating endpoint."""

    model_config = ConfigDict(extra="ignore")

    top_k: int | None = Field(None, description="experts mixed per prompt (default: the run's)")
    route_temperature: float | None = Field(None, description="T in softmax(-d^2/T) (default: the run's)")
    experts: list[int] | None = Field(None, description="only these cluster ids may serve this request")
    exclude_experts: list[int] | None = Field(None, description="these cluster ids may not serve this request")
    reroute_every: int | None = Field(None, description="re-route every N generated tokens")


class CompletionRequest(Extensions):
    model: str | None = None
    prompt: Union[str, list[str]]
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    logprobs: int | None = None
    n: int = 1
    stream_options: dict | None = None
    user: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str


class ChatRequest(Extensions):
    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    logprobs: bool | None = None
    top_logprobs: int | None = None
    n: int = 1
    stream_options: dict | None = None
    user: str | None = None


class RouteRequest(Extensions):
    input: Union[str, list[str]]


def request_id(kind: Literal["cmpl", "chatcmpl"]) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    """The prompt of a chat: the tokenizer's own chat template when it has one, else `CHAT_TEMPLATE` per message
    followed by "Assistant:" (cbtm's experts are base LMs; the template only frames the text)."""
    turns = [{"role": m.role, "content": m.content} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return "".join(CHAT_TEMPLATE.format(role=m.role.capitalize(), content=m.content) for m in messages) + \
        CHAT_PROMPT_END
