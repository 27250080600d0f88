"""The OpenAI-compatible request bodies ``gptq-worker serve`` accepts, and its error shape.

Every field is validated here, per request, so that a bad value is a 400 for the request
that sent it and never reaches the engine thread. Types are strict: ``"1"`` is not a
number and ``1`` is not a boolean. Fields of OpenAI's API that we do not implement are
ignored when they would not change the output (``user``, ``metadata``, ...) and refused
when a non-default value would (``n``, ``logprobs``, ``echo``, ``best_of``, ``logit_bias``,
``presence_penalty``, ``frequency_penalty``, ``tools``, ``response_format``).
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # int64, as vLLM; torch.Generator takes all of it
MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_TOKENS_CAP = 2**31 - 1  # the context check names the real limit

Number = Annotated[StrictFloat | StrictInt, Field(allow_inf_nan=False)]


class GenerationBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_CAP)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = 1.0
    stop: StrictStr | list[StrictStr] | None = None
    seed: Annotated[StrictInt, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stream: StrictBool | None = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: StrictBool = False  # as vLLM: keep decoding past end-of-sequence
    n: Literal[1] | None = 1
    logprobs: Literal[None, False] = None
    # not implemented: accepted only at their no-op values
    logit_bias: dict[str, Any] | None = None
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None

    @field_validator("temperature", "top_p", "stream", "n", mode="after")
    @classmethod
    def _null_is_default(cls, v, info):  # OpenAI clients send null for "the default"
        if v is None:
            return {"temperature": 1.0, "top_p": 1.0, "stream": False, "n": 1}[info.field_name]
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence may be at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and not isinstance(v.get("include_usage", False), bool):
            raise ValueError("include_usage must be true or false")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: dict[str, Any] | None) -> None:
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("tools", "functions", "response_format", "guided_json"):
                if data.get(key) not in (None, [], {}, {"type": "text"}):
                    raise ValueError(f"{key} is not supported by this server")
        return data


class CompletionBody(GenerationBody):
    prompt: StrictStr | list[StrictInt] | list[StrictStr]
    echo: Literal[False] | None = False
    best_of: Literal[None, 1] = None
    suffix: Literal[None, ""] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("one prompt per request (send several requests instead)")
            v = v[0]
        if not v:
            raise ValueError("prompt is empty")
        return v


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part of type {part.get('type')!r}: only text is served")
            if not isinstance(part.get("text", ""), str):
                raise ValueError("a text content part's text must be a string")
            parts.append(part.get("text", ""))
        return "".join(parts)


class ChatBody(GenerationBody):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_CAP)] | None = None


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", **extra: Any
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.extra = status, message, kind, extra

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.kind, **self.extra}}
        headers = {"Retry-After": "1"} if self.status in (429, 503) else {}
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return web.json_response(body, status=self.status, headers=headers or None)


# -- parsing a request body -----------------------------------------------------------------
MAX_JSON_DEPTH = 32
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|function-.*)$")


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, counted without recursion, stopping past limit."""
    depth, level = 0, [value]
    while level and depth <= limit:
        depth += 1
        nested = []
        for item in level:
            for v in item.values() if isinstance(item, dict) else item:
                if isinstance(v, (dict, list)):
                    nested.append(v)
        level = nested
    return depth


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(data: bytes) -> Any:
    """Strict UTF-8 JSON (no NaN/Infinity) nested at most MAX_JSON_DEPTH deep, or ApiError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(
            400, f"request body is not valid UTF-8: {err.reason} at byte {err.start}"
        ) from err
    try:
        raw = json.loads(text, parse_constant=_no_constants)
    except RecursionError as err:
        raise ApiError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels") from err
    except ValueError as err:  # JSONDecodeError, and the constants above
        raise ApiError(400, f"request body is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ApiError(400, "request body must be a JSON object")
    if json_depth(raw, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ApiError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
    return raw


def validate(raw: dict, model: type[BaseModel]) -> BaseModel:
    """``raw`` as ``model``, or a 400 naming the first bad field (``messages.0.role: ...``)."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        # the deepest error names the field best (a union reports each of its branches)
        first = max(err.errors(), key=lambda e: len(e["loc"]))
        loc = [p for p in first["loc"] if not _UNION_BRANCH.match(str(p))]
        where = ".".join(str(p) for p in loc) or "body"
        msg = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{where}: {msg}", param=where) from err


# -- limits ---------------------------------------------------------------------------------
def check_prompt_bytes(size: int, limit: int, param: str) -> None:
    if size > limit:
        what = "text of the messages" if param == "messages" else param
        raise ApiError(
            413,
            f"the {what} is {size} bytes; this server takes at most {limit} bytes "
            "(--max-prompt-bytes)",
            param=param,
            code="prompt_too_large",
        )


def too_large(size: int | None, limit: int, prompt_limit: int) -> ApiError:
    what = f"{size} bytes" if size is not None else "too large"
    return ApiError(
        413,
        f"request body is {what}; this server takes at most {limit} bytes "
        f"(prompts at most {prompt_limit} bytes, --max-prompt-bytes)",
        code="request_too_large",
    )


def check_context(prompt: int, max_tokens: int, context: int, param: str) -> None:
    if prompt >= context:
        raise ApiError(
            400,
            f"the prompt is {prompt} tokens; this model's context is {context} tokens",
            param=param,
            code="context_length_exceeded",
        )
    if prompt + max_tokens > context:
        raise ApiError(
            400,
            f"max_tokens {max_tokens} + the prompt's {prompt} tokens exceed this model's "
            f"context of {context} tokens: ask for at most {context - prompt}",
            param="max_tokens",
            code="context_length_exceeded",
        )


# -- answers ----------------------------------------------------------------------------------
def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def server_error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error"}}


class Answer:
    """The OpenAI shapes of one request's answer: whole, or as server-sent events."""

    def __init__(self, rid: str, model: str, chat: bool, prompt_tokens: int) -> None:
        self.rid, self.model, self.chat, self.prompt_tokens = rid, model, chat, prompt_tokens
        self.created = int(time.time())

    def usage(self, completion: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def whole(self, text: str, finish_reason: str | None, completion: int) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        return {
            "id": self.rid,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(completion),
        }

    def _payload(self, choices: list) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def event(self, text: str, finish_reason: str | None, role: bool = False) -> bytes:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
        if self.chat and role:
            choice["delta"] = {"role": "assistant", "content": ""}
        elif self.chat:
            choice["delta"] = {"content": text} if text else {}
        else:
            choice.update(text=text, logprobs=None)
        return sse(self._payload([choice]))

    def usage_event(self, completion: int) -> bytes:
        return sse({**self._payload([]), "usage": self.usage(completion)})
