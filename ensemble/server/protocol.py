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


class Unimplemented(BaseModel):
    """OpenAI fields cbtm serve does not implement, read only to refuse a value that would change the answer
    (`refuse_unimplemented`): silently ignoring them would return something the client did not ask for."""

    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(Extensions, Unimplemented):
    model: str | None = None
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
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


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        """The message's text: its string, its text parts joined by newlines, or "" (an assistant turn that
        only called tools); a part that is not text is a 400 (the experts read text only)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        other = next((p.type for p in self.content if p.type != "text"), None)
        if other is not None:
            raise ApiError(400, f"messages: a {other!r} content part cannot be read; cbtm's experts read text only",
                           "messages")
        return "\n".join(p.text or "" for p in self.content)


class ChatRequest(Extensions, Unimplemented):
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
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None


class RouteRequest(Extensions):
    input: Union[str, list[str]]


def refuse_unimplemented(body: BaseModel) -> None:
    """400 for an OpenAI field whose value asks for something cbtm serve does not do (a default value passes)."""
    asked = {"presence_penalty": bool(getattr(body, "presence_penalty", None)),
             "frequency_penalty": bool(getattr(body, "frequency_penalty", None)),
             "logit_bias": bool(getattr(body, "logit_bias", None)),
             "best_of": getattr(body, "best_of", None) not in (None, 1),
             "suffix": bool(getattr(body, "suffix", None)),
             "tools": bool(getattr(body, "tools", None)), "functions": bool(getattr(body, "functions", None)),
             "response_format": (getattr(body, "response_format", None) or {}).get("type", "text") != "text"}
    name = next((k for k, v in asked.items() if v), None)
    if name is not None:
        raise ApiError(400, f"{name} is not supported by cbtm serve: leave it out (or send its default)", name,
                       "unsupported_parameter")


def request_id(kind: Literal["cmpl", "chatcmpl"]) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    """The prompt of a chat: the tokenizer's own chat template when it has one, else `CHAT_TEMPLATE` per message
    followed by "Assistant:" (cbtm's experts are base LMs; the template only frames the text)."""
    turns = [{"role": m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return "".join(CHAT_TEMPLATE.format(role=t["role"].capitalize(), content=t["content"]) for t in turns) + \
        CHAT_PROMPT_END
