"""The OpenAI-compatible request bodies ``gptq-worker serve`` accepts, and its error shape."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator


class GenerationBody(BaseModel):
    # OpenAI clients send fields we do not use (user, logit_bias, ...): ignore those, but
    # refuse the ones whose meaning we would silently change (n, logprobs, echo, best_of)
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False  # as vLLM: keep decoding past end-of-sequence
    n: Literal[1] = 1
    logprobs: Literal[None, False] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops


class CompletionBody(GenerationBody):
    prompt: str | list[int] | list[str]
    echo: Literal[False] = False
    best_of: Literal[None, 1] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("one prompt per request (send several requests instead)")
            return v[0]
        if isinstance(v, list) and not v:
            raise ValueError("prompt is empty")
        return v


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part of type {part.get('type')!r}: only text is served")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatBody(GenerationBody):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", **extra: Any
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.extra = status, message, kind, extra

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.kind, **self.extra}}
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return web.json_response(body, status=self.status, headers=headers)
