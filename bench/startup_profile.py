"""Where the ``quantize`` command's seconds before the first layer go (a diagnostic).

Runs the command in this process under cProfile and stops it where the calibration
inputs are captured; prints the seconds to that point and the functions with the most
cumulative time. Run after ``bench/e2e.py --keep`` (which leaves DIR/model and
DIR/calibration.jsonl): ``python bench/startup_profile.py /tmp/gptq-e2e``.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import pstats
import sys
import time

STARTED = time.monotonic()


class Reached(BaseException):  # not an Exception: the command must not report it
    pass


def main() -> None:
    root = sys.argv[1]
    sys.argv = [
        "gptq-worker", "quantize", "--model", f"{root}/model", "--output", f"{root}/out-profile",
        "--calibration", f"{root}/calibration.jsonl", "--nsamples", "128", "--seqlen", "2048",
        "--no-progress-bar", "--overwrite",
    ]  # fmt: skip
    from gptq_worker.pipeline import run

    def stop(*_a, **_k):
        raise Reached

    run.capture_inputs = stop
    from gptq_worker.cli import main as cli

    profile = cProfile.Profile()
    with contextlib.suppress(Reached):
        profile.runcall(cli)
    print(f"process start to capture: {time.monotonic() - STARTED:.2f}s", flush=True)
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(45)
    print(out.getvalue())


if __name__ == "__main__":
    main()
