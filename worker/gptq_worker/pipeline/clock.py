"""One origin for the times of the steps in the ``-v`` log (the run's and the warm-up
thread's lines compare)."""

from __future__ import annotations

import time

IMPORTED = time.monotonic()


def since() -> str:
    return f"{time.monotonic() - IMPORTED:.2f}s after import"
