"""The HTTP application of ``gptq-worker serve``: an OpenAI-compatible API for GPTQ checkpoints.

Endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (streaming with
server-sent events), ``/metrics`` (Prometheus), ``/healthz`` (the process is up) and
``/readyz`` (the model is loaded and the server is not draining).

While draining (set by ``process.py`` on SIGTERM) new work gets 503 and ``/readyz`` fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from gptq_worker.serve.generate import Chunk, Draining, QueueFull, Request, Sampling
from gptq_worker.serve.metrics import ServeMetrics
from gptq_worker.serve.model import Loaded
from gptq_worker.serve.protocol import ApiError, ChatBody, CompletionBody, GenerationBody

log = logging.getLogger(__name__)


class Server:
    def __init__(self, name: str, max_batch: int = 8, max_queue: int = 64) -> None:
        self.name = name
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = ServeMetrics()
        self.model: Loaded | None = None
        self.load_error: str | None = None
        self.draining = False
        self.active = 0  # generation handlers still running
        self.idle = asyncio.Event()
        self.idle.set()
        self.app = web.Application(middlewares=[self._observe], client_max_size=8 * 1024 * 1024)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/health", self.readyz)  # the path vLLM serves
        self.app.router.add_get("/metrics", self.prometheus)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/chat/completions", self.chat)

    def attach(self, loaded: Loaded) -> None:
        self.model = loaded
        self.metrics.info.info(loaded.info)
        self.metrics.weight_bytes.labels("packed").set(loaded.packed_bytes)
        self.metrics.weight_bytes.labels("fp16").set(loaded.fp16_bytes)

    @web.middleware
    async def _observe(self, request: web.Request, handler) -> web.StreamResponse:
        started = time.monotonic()
        endpoint = (
            request.match_info.route.resource.canonical
            if request.match_info.route.resource
            else "other"
        )
        try:
            response = await handler(request)
            status = response.status
        except ApiError as err:
            response, status = err.response(), err.status
        except web.HTTPException as err:
            if err.status < 400:
                raise
            kind = "not_found_error" if err.status == 404 else "invalid_request_error"
            status, response = err.status, ApiError(err.status, err.reason, kind).response()
        except (ConnectionResetError, asyncio.CancelledError):
            raise  # the client went away; its request was cancelled
        except Exception as err:
            log.exception("error handling %s %s", request.method, request.path)
            status = 500
            response = ApiError(500, f"internal error: {err}", "server_error").response()
        if endpoint.startswith("/v1/"):
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
        return response

    # -- probes and listings ----------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.load_error:
            return web.json_response({"status": "failed", "error": self.load_error}, status=503)
        if self.model is None:
            return web.json_response({"status": "loading"}, status=503)
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ready", "model": self.name})

    async def prometheus(self, request: web.Request) -> web.Response:
        if self.model is not None:
            self.metrics.running.set(self.model.engine.running)
            self.metrics.waiting.set(self.model.engine.waiting)
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        m = self._ready()
        card = {
            "id": m.name,
            "object": "model",
            "created": m.created,
            "owned_by": "gptq-operator",
            "max_model_len": m.engine.context,
            "quantization": {k: m.info[k] for k in ("bits", "group_size", "desc_act", "kernel")},
        }
        return web.json_response({"object": "list", "data": [card]})

    # -- generation -------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, CompletionBody)
        m = self._ready(body.model)
        if isinstance(body.prompt, str):
            ids = m.tokenizer(body.prompt, add_special_tokens=True).input_ids
        else:
            vocab = len(m.tokenizer)
            if any(not 0 <= t < vocab for t in body.prompt):
                raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
            ids = list(body.prompt)
        return await self._generate(request, m, body, ids, body.max_tokens or 16, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, ChatBody)
        m = self._ready(body.model)
        if not getattr(m.tokenizer, "chat_template", None):
            raise ApiError(
                400,
                f"model {m.name!r} has no chat template; use /v1/completions with a prompt",
                param="messages",
            )
        try:
            messages = [{"role": msg.role, "content": msg.text()} for msg in body.messages]
        except ValueError as err:
            raise ApiError(400, str(err), param="messages") from err
        ids = m.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 BatchEncoding
            ids = ids["input_ids"]
        requested = body.max_completion_tokens or body.max_tokens
        default = min(512, max(1, m.engine.context - len(ids)))
        return await self._generate(request, m, body, list(ids), requested or default, chat=True)

    async def _body(self, request: web.Request, model: type[BaseModel]):
        try:
            raw = await request.json()
        except json.JSONDecodeError as err:
            raise ApiError(400, f"request body is not valid JSON: {err}") from err
        if not isinstance(raw, dict):
            raise ApiError(400, "request body must be a JSON object")
        try:
            return model.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ApiError(400, f"{where}: {first['msg']}", param=where) from err

    def _ready(self, asked: str | None = None) -> Loaded:
        if self.draining:
            raise ApiError(503, "the server is shutting down", "service_unavailable")
        if self.model is None:
            raise ApiError(503, "the model is still loading", "service_unavailable")
        if asked is not None and asked != self.model.name:
            raise ApiError(
                404,
                f"model {asked!r} is not served here; this server serves {self.model.name!r}",
                "not_found_error",
                param="model",
                code="model_not_found",
            )
        return self.model

    async def _generate(
        self,
        request: web.Request,
        m: Loaded,
        body: GenerationBody,
        ids: list[int],
        max_tokens: int,
        chat: bool,
    ) -> web.StreamResponse:
        context = m.engine.context
        if len(ids) >= context:
            raise ApiError(
                400,
                f"the prompt is {len(ids)} tokens; this model's context is {context} tokens",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        if len(ids) + max_tokens > context:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} + the prompt's {len(ids)} tokens exceed this model's "
                f"context of {context} tokens: ask for at most {context - len(ids)}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[Chunk] = asyncio.Queue()
        sampling = Sampling(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=tuple(body.stop or ()),
            seed=body.seed,
            ignore_eos=body.ignore_eos,
        )
        job = Request(ids, sampling, lambda c: loop.call_soon_threadsafe(chunks.put_nowait, c))
        try:
            m.engine.submit(job)
        except QueueFull as err:
            raise ApiError(
                429, f"too many requests: {err}; try again shortly", "rate_limit_error"
            ) from err
        except Draining as err:
            raise ApiError(503, str(err), "service_unavailable") from err
        self.metrics.prompt_tokens.inc(len(ids))
        self.active += 1
        self.idle.clear()
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        finished = False
        try:
            if body.stream:
                response = await self._stream(request, m, body, job, chunks, rid, chat, started)
            else:
                response = await self._collect(m, job, chunks, rid, chat, started)
            finished = True
            return response
        finally:
            if not finished:
                job.cancelled.set()
            self.active -= 1
            if self.active == 0:
                self.idle.set()

    async def _next(self, chunks: asyncio.Queue[Chunk], first: list[bool], started: float) -> Chunk:
        chunk = await chunks.get()
        if chunk.tokens and first[0]:
            first[0] = False
            self.metrics.ttft.observe(time.monotonic() - started)
        if chunk.finish_reason is not None:
            self.metrics.generated_tokens.inc(chunk.tokens)
        return chunk

    def _usage(self, prompt: int, completion: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def _collect(self, m, job, chunks, rid, chat, started) -> web.Response:
        parts, first = [], [True]
        while True:
            chunk = await self._next(chunks, first, started)
            parts.append(chunk.text)
            if chunk.finish_reason is not None:
                break
        if chunk.finish_reason == "error":
            raise ApiError(500, f"generation failed: {chunk.error}", "server_error")
        text = "".join(parts)
        choice: dict[str, Any] = {"index": 0, "finish_reason": chunk.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        return web.json_response(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": m.name,
                "choices": [choice],
                "usage": self._usage(len(job.prompt_ids), chunk.tokens),
            }
        )

    async def _stream(self, request, m, body, job, chunks, rid, chat, started):
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict[str, Any], usage: dict | None = None) -> bytes:
            payload: dict[str, Any] = {
                "id": rid,
                "object": kind,
                "created": created,
                "model": m.name,
                "choices": [choice] if choice else [],
            }
            if usage is not None:
                payload["usage"] = usage
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        if chat:
            await response.write(
                event(
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                )
            )
        first = [True]
        while True:
            chunk = await self._next(chunks, first, started)
            if chunk.finish_reason == "error":
                error = {
                    "error": {
                        "message": f"generation failed: {chunk.error}",
                        "type": "server_error",
                    }
                }
                await response.write(b"data: " + json.dumps(error).encode() + b"\n\n")
                break
            if chunk.text or chunk.finish_reason is not None:
                choice: dict[str, Any] = {"index": 0, "finish_reason": chunk.finish_reason}
                if chat:
                    choice["delta"] = {"content": chunk.text} if chunk.text else {}
                else:
                    choice.update(text=chunk.text, logprobs=None)
                await response.write(event(choice))
            if chunk.finish_reason is not None:
                if (body.stream_options or {}).get("include_usage"):
                    await response.write(event({}, self._usage(len(job.prompt_ids), chunk.tokens)))
                break
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
