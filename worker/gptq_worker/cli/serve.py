"""``gptq-worker serve``: serve a GPTQ checkpoint over an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse

from gptq_worker.cli.flags import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="serve a GPTQ checkpoint over an OpenAI-compatible HTTP API")
    sv.add_argument("checkpoint", help="directory of a GPTQ checkpoint")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a pod)")
    sv.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    sv.add_argument(
        "--served-model-name",
        dest="served_model_name",
        default=None,
        help="the name clients ask for (default: the directory's name)",
    )
    sv.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    sv.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float16", "bfloat16", "float32"],
        help="activations' dtype (auto: float16 on a GPU, float32 on a CPU); on a CPU, "
        "bfloat16 runs 4-bit layers on torch's int4 kernel, many times faster than float32",
    )
    sv.add_argument(
        "--max-batch", dest="max_batch", type=int, default=8, help="requests decoded together"
    )
    sv.add_argument(
        "--kv-cache-tokens",
        dest="kv_cache_tokens",
        type=int,
        default=None,
        help="KV-cache slots shared by the running requests (default: from free memory); "
        "requests wait while admitting one more could overflow it",
    )
    sv.add_argument(
        "--max-queue",
        dest="max_queue",
        type=int,
        default=64,
        help="requests that may wait for a batch; more are refused with 429",
    )
    sv.add_argument(
        "--shutdown-grace",
        dest="grace",
        type=float,
        default=30.0,
        help="seconds to finish accepted requests after SIGTERM",
    )
    sv.add_argument(
        "--api-key",
        dest="api_key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $GPTQ_SERVE_API_KEY; "
        "probes and /metrics stay open)",
    )
    sv.add_argument(
        "--max-prompt-bytes",
        dest="max_prompt_bytes",
        type=int,
        default=1 << 20,
        help="longest prompt (UTF-8 bytes) accepted; longer ones get 413 (default 1 MiB)",
    )
    sv.add_argument(
        "--keepalive-timeout",
        dest="keepalive_timeout",
        type=float,
        default=15.0,
        help="seconds an idle keep-alive connection stays open",
    )
    sv.add_argument(
        "--body-timeout",
        dest="body_timeout",
        type=float,
        default=60.0,
        help="seconds a client may take to send a request body (408 after)",
    )
    sv.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true")
    sv.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import os

    from gptq_worker.serve.process import serve

    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, not {value}")
    if args.kv_cache_tokens is not None and args.kv_cache_tokens < 1:
        raise UsageError(f"--kv-cache-tokens must be at least 1, not {args.kv_cache_tokens}")
    if args.max_prompt_bytes < 1:
        raise UsageError(f"--max-prompt-bytes must be at least 1, not {args.max_prompt_bytes}")
    for flag, value in (
        ("--keepalive-timeout", args.keepalive_timeout),
        ("--body-timeout", args.body_timeout),
        ("--shutdown-grace", args.grace),
    ):
        if not value >= 0:
            raise UsageError(f"{flag} must be at least 0, not {value}")
    api_key = args.api_key or os.environ.get("GPTQ_SERVE_API_KEY") or None
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, not {args.port}")
    return serve(
        args.checkpoint,
        name=args.served_model_name,
        host=args.host,
        port=args.port,
        device=args.device,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        kv_cache_tokens=args.kv_cache_tokens,
        grace=args.grace,
        trust_remote_code=args.trust_remote_code,
        dtype=args.dtype,
        api_key=api_key,
        max_prompt_bytes=args.max_prompt_bytes,
        keepalive_timeout=args.keepalive_timeout,
        body_timeout=args.body_timeout,
    )
