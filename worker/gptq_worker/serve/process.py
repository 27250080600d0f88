"""The ``gptq-worker serve`` process: bind the port, load the model in the background,
serve until SIGTERM or SIGINT, then drain accepted requests within the grace period."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from pathlib import Path

from aiohttp import web

from gptq_worker.serve.app import Server
from gptq_worker.serve.model import load


async def _run(
    checkpoint: str,
    name: str,
    host: str,
    port: int,
    device: str,
    max_batch: int,
    max_queue: int,
    grace: float,
    trust_remote_code: bool,
    ready: threading.Event | None,
    options: dict,
    kv_cache_tokens: int | None = None,
    dtype: str = "auto",
) -> int:
    server = Server(name, max_batch, max_queue, **options)
    # keep-alive connections idle past keepalive_timeout are closed; at shutdown, handlers
    # still running after the drain below (which honours the grace) get 1 s, not aiohttp's 60
    runner = web.AppRunner(
        server.app,
        handle_signals=False,
        access_log=None,
        keepalive_timeout=server.keepalive_timeout,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    print(
        f"gptq-worker serve: listening on http://{bound[0]}:{bound[1]} (model {name!r} loading)",
        flush=True,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)  # only the main thread can
    code = 0
    loading = loop.run_in_executor(
        None,
        load,
        checkpoint,
        name,
        device,
        max_batch,
        max_queue,
        trust_remote_code,
        kv_cache_tokens,
        "auto",
        dtype,
    )
    done, _ = await asyncio.wait(
        {loading, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
    )
    if loading in done:
        try:
            server.attach(loading.result())
            m = server.model
            i = m.info
            print(
                f"gptq-worker serve: ready: {name} ({i['bits']}-bit, group {i['group_size']}, "
                f"{i['kernel']} on {i['device']}); quantized weights "
                f"{m.packed_bytes / 2**20:.2f} MiB packed, {m.fp16_bytes / 2**20:.2f} MiB in fp16; "
                f"KV cache {m.engine.kv_cache_tokens} tokens "
                f"({m.engine.kv_cache_tokens * m.engine.kv_token_bytes / 2**20:.1f} MiB)",
                flush=True,
            )
            if ready is not None:
                ready.set()
            await stop.wait()
        except Exception as err:
            server.load_error = f"{type(err).__name__}: {err}"
            text = " ".join(str(err).split()) or type(err).__name__  # one line
            print(f"error: cannot serve {checkpoint}: {text}", flush=True)
            code = 2
    # graceful shutdown: refuse new work, finish what was accepted, then close
    server.draining = True
    if server.model is not None:
        drained = await loop.run_in_executor(None, server.model.engine.drain, grace)
        try:
            await asyncio.wait_for(server.idle.wait(), timeout=max(1.0, grace))
        except asyncio.TimeoutError:
            drained = False
        if not drained:
            print(
                "gptq-worker serve: grace period over; closing with requests unfinished", flush=True
            )
        server.model.engine.stop()
    await runner.cleanup()
    print("gptq-worker serve: stopped", flush=True)
    return code


def serve(
    checkpoint: str,
    name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    device: str = "auto",
    max_batch: int = 8,
    max_queue: int = 64,
    grace: float = 30.0,
    trust_remote_code: bool = False,
    ready: threading.Event | None = None,
    kv_cache_tokens: int | None = None,
    dtype: str = "auto",
    **options,
) -> int:
    """Serve ``checkpoint`` until SIGTERM/SIGINT; returns the process exit code.

    ``options`` go to :class:`Server` (``api_key``, ``max_prompt_bytes``, ...)."""
    name = name or Path(checkpoint).resolve().name
    return asyncio.run(
        _run(
            checkpoint,
            name,
            host,
            port,
            device,
            max_batch,
            max_queue,
            grace,
            trust_remote_code,
            ready,
            options,
            kv_cache_tokens,
            dtype,
        )
    )
