"""``gptq-worker``: quantize, validate, evaluate and serve GPTQ checkpoints.

One module per subcommand, each with ``add_parser`` and ``run``. Exit codes: 0 success,
1 the checkpoint or run failed a check, 2 bad input (arguments, config, model,
calibration data, output path), always as one line that names the problem.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading

from pydantic import ValidationError

from gptq_worker import __version__
from gptq_worker.cli import evaluate, quantize, quickstart, serve, validate
from gptq_worker.cli.flags import UsageError

SUBCOMMANDS = (quantize, validate, evaluate, serve, quickstart)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptq-worker", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"gptq-worker {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = p.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return p


def _format_validation(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        lines.append(f"{where}: {e['msg']}")
    return "invalid settings: " + "; ".join(" ".join(line.split()) for line in lines)


class Terminated(BaseException):
    """SIGTERM arrived (a pod being deleted or evicted): stop now, keep finished layers."""


def _terminate(signum, frame):
    raise Terminated


# what a run stopped by SIGTERM exits with (128 + 15, as a shell reports it): not the exit
# code of bad input (2), which fails a QuantizationJob's Job at once instead of retrying
EXIT_TERMINATED = 143


def main(argv: list[str] | None = None) -> int:
    return run_parsed(parser().parse_args(argv))


def run_parsed(args: argparse.Namespace) -> int:
    """:func:`main` after the arguments are parsed."""
    # As a container's PID 1 the process would ignore SIGTERM (no default action there) and
    # run on until SIGKILL; with a handler it stops at once, like anywhere else.
    # (`serve` drains on SIGTERM with its own handler; the other commands are short)
    previous = None
    if (
        getattr(args, "run", None) is quantize.run
        and threading.current_thread() is threading.main_thread()
    ):
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(args)
    except Terminated:
        print(
            "error: terminated (SIGTERM); finished layers are kept beside the output, and "
            "running the same command again resumes after the last one",
            file=sys.stderr,
        )
        return EXIT_TERMINATED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    """The ``gptq-worker`` command (and ``python -m gptq_worker.cli``): :func:`main`; after
    ``quantize``, out of the process at once. The interpreter's teardown after a run (the
    CUDA context, gigabytes of pinned host buffers, every module) took about 2 s on an H100
    (the end-to-end bench's wall against its "done" event), seconds a pod holds the GPU
    for nothing: by then the checkpoint is published, the progress file closed and every
    status patch sent (they are synchronous); the streams and the log are flushed here."""
    args = parser().parse_args()
    code = run_parsed(args)
    if getattr(args, "run", None) is quantize.run:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe
                stream.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def _main(args) -> int:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from gptq_worker.arch import UnsupportedModel
    from gptq_worker.device import DeviceError
    from gptq_worker.pipeline.calibration import CalibrationError
    from gptq_worker.pipeline.run import RunError

    try:
        return args.run(args)
    except ValidationError as err:
        message = _format_validation(err)
    except (UsageError, RunError, CalibrationError, UnsupportedModel, DeviceError) as err:
        message = str(err)
    except ValueError as err:  # shape and settings checks raised before any work is written
        message = str(err)
    except OSError as err:  # a path that cannot be read or written
        where = f" ({err.filename})" if err.filename else ""
        message = f"{err.strerror or err}{where}"
    except KeyboardInterrupt:
        message = "interrupted"
    except Exception as err:
        if args.verbose:
            raise
        text = str(err).splitlines()[0] if str(err) else ""
        message = f"{type(err).__name__}: {text} (rerun with --verbose for the traceback)"
    message = " ".join(message.split()) if "\n" in message else message
    print(f"error: {message}", file=sys.stderr)
    if getattr(args, "termination_message", None):
        quantize.write_termination_message(args.termination_message, {"error": message})
    return 2
