"""The HTTP application of ``gptq-worker serve``: an OpenAI-compatible API for GPTQ checkpoints.

Endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (streaming with
server-sent events), ``/metrics`` (Prometheus), ``/healthz`` (the process is up) and
``/readyz`` (the model is loaded and the server is not draining).

While draining (set by ``process.py`` on SIGTERM) new work gets 503 and ``/readyz`` fails.

One bad request harms only itself: bodies are size-capped and parsed with a nesting cap,
every field is validated per request (``protocol.py``), prompts are size-capped and
tokenized off the event loop, and a client that goes away cancels its generation.

With an API key set, ``/v1/*`` needs ``Authorization: Bearer <key>``; the probes
(``/healthz``, ``/readyz``, ``/health``) and ``/metrics`` stay open, because kubelet probes
and Prometheus scrapers carry no credentials and answer nothing a client could misuse.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from gptq_worker.serve.generate import Chunk, Draining, QueueFull, Request, Sampling, TooLarge
from gptq_worker.serve.metrics import ServeMetrics
from gptq_worker.serve.model import Loaded
from gptq_worker.serve.protocol import (
    Answer,
    ApiError,
    ChatBody,
    CompletionBody,
    GenerationBody,
    check_context,
    check_prompt_bytes,
    parse_json,
    server_error,
    sse,
    too_large,
    validate,
)

log = logging.getLogger(__name__)


DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks that its client is still there


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


class Server:
    def __init__(
        self,
        name: str,
        max_batch: int = 8,
        max_queue: int = 64,
        *,
        api_key: str | None = None,
        max_prompt_bytes: int = 1 << 20,
        body_timeout: float = 60.0,
        keepalive_timeout: float = 15.0,
    ) -> None:
        self.name = name
        self.max_batch, self.max_queue = max_batch, max_queue
        self.api_key = api_key or None
        self.max_prompt_bytes = max_prompt_bytes
        self.body_timeout, self.keepalive_timeout = body_timeout, keepalive_timeout
        # a body may hold the prompt as JSON-escaped text (up to 6 bytes a character for
        # \uXXXX) or as token ids; anything larger is refused by aiohttp with 413
        self.max_body_bytes = max(1 << 20, 6 * max_prompt_bytes + (64 << 10))
        # tokenizers are not safe to call from several threads at once: one worker
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="gptq-tokenize")
        self.metrics = ServeMetrics(name)
        self.model: Loaded | None = None
        self.load_error: str | None = None
        self.draining = False
        self.active = 0  # generation handlers still running
        self.idle = asyncio.Event()
        self.idle.set()
        self.app = web.Application(middlewares=[self._observe], client_max_size=self.max_body_bytes)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/health", self.readyz)  # the path vLLM serves
        self.app.router.add_get("/metrics", self.prometheus)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/chat/completions", self.chat)

    def attach(self, loaded: Loaded) -> None:
        self.model = loaded
        loaded.engine.metrics = self.metrics
        self.metrics.info.info(loaded.info)
        self.metrics.weight_bytes.labels("packed").set(loaded.packed_bytes)
        self.metrics.weight_bytes.labels("fp16").set(loaded.fp16_bytes)
        self.metrics.watch_device(loaded.engine.device)

    @web.middleware
    async def _observe(self, request: web.Request, handler) -> web.StreamResponse:
        started = request["arrived"] = time.monotonic()
        endpoint = (
            request.match_info.route.resource.canonical
            if request.match_info.route.resource
            else "other"
        )
        try:
            if self.api_key and request.path.startswith("/v1/"):
                self._authorize(request)
            response = await handler(request)
            status = response.status
        except ApiError as err:
            response, status = err.response(), err.status
        except web.HTTPException as err:
            if err.status < 400:
                raise
            kind = "not_found_error" if err.status == 404 else "invalid_request_error"
            status, response = err.status, ApiError(err.status, err.reason, kind).response()
        except (ClientGone, ConnectionResetError):
            # the client went away and its generation was cancelled; nobody reads this
            # answer, but the metrics count it (499, as nginx: client closed request)
            status, response = 499, web.Response(status=499)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.exception("error handling %s %s", request.method, request.path)
            status = 500
            response = ApiError(500, f"internal error: {err}", "server_error").response()
        if endpoint.startswith("/v1/"):
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
        return response

    def _authorize(self, request: web.Request) -> None:
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        expected = self.api_key.encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise ApiError(
                401,
                "missing or incorrect API key: send Authorization: Bearer <key>",
                code="invalid_api_key",
            )

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
            engine = self.model.engine
            self.metrics.running.set(engine.running)
            self.metrics.waiting.set(engine.waiting)
            self.metrics.kv_usage.set(engine.kv_usage)
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
            check_prompt_bytes(
                len(body.prompt.encode("utf-8", "surrogatepass")), self.max_prompt_bytes, "prompt"
            )
            try:
                ids = await self._tokenize(m.tokenizer, body.prompt, add_special_tokens=True)
            except Exception as err:  # e.g. a lone surrogate (JSON's "\ud800")
                raise ApiError(
                    400, f"the prompt cannot be tokenized: {err}", param="prompt"
                ) from err
            ids = ids.input_ids
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
        size = sum(len(msg["content"].encode("utf-8", "surrogatepass")) for msg in messages)
        check_prompt_bytes(size, self.max_prompt_bytes, "messages")
        try:
            ids = await self._tokenize(
                m.tokenizer.apply_chat_template,
                messages,
                add_generation_prompt=True,
                tokenize=True,
            )
        except ApiError:
            raise
        except Exception as err:  # a template that rejects these roles, or untokenizable text
            raise ApiError(
                400, f"these messages cannot be templated or tokenized: {err}", param="messages"
            ) from err
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 BatchEncoding
            ids = ids["input_ids"]
        requested = body.max_completion_tokens or body.max_tokens
        default = min(512, max(1, m.engine.context - len(ids)))
        return await self._generate(request, m, body, list(ids), requested or default, chat=True)

    async def _tokenize(self, fn, *args, **kwargs):
        """Run the tokenizer on its own thread, so probes and other clients are not kept
        waiting behind a long prompt."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.tokenizing, lambda: fn(*args, **kwargs))

    async def _body(self, request: web.Request, model: type[BaseModel]):
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise too_large(request.content_length, self.max_body_bytes, self.max_prompt_bytes)
        try:
            data = await asyncio.wait_for(request.read(), self.body_timeout)
        except web.HTTPRequestEntityTooLarge as err:
            raise too_large(None, self.max_body_bytes, self.max_prompt_bytes) from err
        except asyncio.TimeoutError as err:
            raise ApiError(408, f"the request body took over {self.body_timeout:g} s") from err
        if not data:
            raise ApiError(400, "request body is empty: send a JSON object")
        loop = asyncio.get_running_loop()
        if len(data) > 64 << 10:  # a big body is parsed off the event loop
            raw = await loop.run_in_executor(self.tokenizing, parse_json, data)
        else:
            raw = parse_json(data)
        return validate(raw, model)

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
        check_context(len(ids), max_tokens, m.engine.context, "messages" if chat else "prompt")
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
        # the engine counts tokens and times as it makes them (metrics.py), whether or not
        # anyone still reads them: a client that left is visible in the counters, then stops
        job = Request(
            ids,
            sampling,
            lambda c: loop.call_soon_threadsafe(chunks.put_nowait, c),
            arrived=request["arrived"],
        )
        try:
            m.engine.submit(job)
        except QueueFull as err:
            self.metrics.rejections.inc()
            raise ApiError(
                429, f"too many requests: {err}; try again shortly", "rate_limit_error"
            ) from err
        except Draining as err:
            raise ApiError(503, str(err), "service_unavailable") from err
        except TooLarge as err:
            raise ApiError(400, str(err), param="max_tokens", code="kv_cache_too_small") from err
        self.active += 1
        self.idle.clear()
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        finished = False
        try:
            if body.stream:
                response = await self._stream(request, m, body, job, chunks, rid, chat)
            else:
                response = await self._collect(request, m, job, chunks, rid, chat)
            finished = True
            return response
        finally:
            if not finished:
                job.cancelled.set()
            self.active -= 1
            if self.active == 0:
                self.idle.set()

    async def _next(self, request: web.Request, chunks: asyncio.Queue[Chunk]) -> Chunk:
        """The next chunk of a request's generation; raises ``ClientGone`` once
        its client has gone (aiohttp does not cancel the handler), and the caller's
        ``finally`` cancels the generation."""
        while True:
            if request.transport is None or request.transport.is_closing():
                raise ClientGone()
            try:
                chunk = await asyncio.wait_for(chunks.get(), DISCONNECT_POLL_S)
                break
            except asyncio.TimeoutError:
                continue
        return chunk

    async def _collect(self, request, m, job, chunks, rid, chat) -> web.Response:
        parts = []
        while True:
            chunk = await self._next(request, chunks)
            parts.append(chunk.text)
            if chunk.finish_reason is not None:
                break
        if chunk.finish_reason == "error":
            raise ApiError(500, f"generation failed: {chunk.error}", "server_error")
        text = "".join(parts)
        answer = Answer(rid, m.name, chat, len(job.prompt_ids))
        return web.json_response(answer.whole(text, chunk.finish_reason, chunk.tokens))

    async def _stream(self, request, m, body, job, chunks, rid, chat):
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        answer = Answer(rid, m.name, chat, len(job.prompt_ids))
        if chat:
            await response.write(answer.event("", None, role=True))
        try:
            await self._stream_events(request, body, chunks, answer, response)
        except (ClientGone, ConnectionResetError):
            job.cancelled.set()  # the client went away: the answer is over, unfinished
        return response

    async def _stream_events(self, request, body, chunks, answer, response):
        while True:
            chunk = await self._next(request, chunks)
            if chunk.finish_reason == "error":
                await response.write(sse(server_error(f"generation failed: {chunk.error}")))
                break
            if chunk.text or chunk.finish_reason is not None:
                await response.write(answer.event(chunk.text, chunk.finish_reason))
            if chunk.finish_reason is not None:
                if (body.stream_options or {}).get("include_usage"):
                    await response.write(answer.usage_event(chunk.tokens))
                break
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
