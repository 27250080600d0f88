"""Progress for people (a bar on stderr) and for machines (JSON lines the operator reads)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm


class Progress:
    """Emits ``{"event": ..., "time": ..., ...}`` JSON lines and drives a layer progress bar.

    ``sink`` is a file path, ``-`` for stdout, or None for no events.
    """

    def __init__(
        self, sink: str | None, total_layers: int, show_bar: bool = True, resumed_from: int = 0
    ) -> None:
        self._fh: IO[str] | None = None
        if sink == "-":
            self._fh = sys.stdout
        elif sink:
            Path(sink).parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(sink, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.total = total_layers
        self.start = time.monotonic()
        self._replayed_until = self.start
        self._fresh = 0
        from gptq_worker.progress.kube import from_environment

        self._reporter = from_environment()
        self._bar = tqdm(
            total=total_layers, unit="layer", desc="quantize", disable=not show_bar, file=sys.stderr
        )
        if self._reporter is not None and resumed_from:
            # a resumed run says at once how far the earlier one got; the layers it replays
            # to rebuild their outputs are not reported again (status would go back to 1/N)
            self._reporter.layer(resumed_from, total_layers, None, force=True)

    def emit(self, event: str, **fields: Any) -> None:
        if self._fh is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self._fh.write(json.dumps(record, sort_keys=False) + "\n")
        self._fh.flush()

    def layer_done(
        self,
        layer: int,
        modules: dict[str, dict[str, float]],
        resumed: bool,
        phases: dict[str, float] | None = None,
    ) -> None:
        """Layer ``layer`` (0-based) finished; ``modules`` maps a name to its loss and damping.

        The ETA extrapolates from freshly quantized layers only: resumed ones are fast replays.
        """
        now = time.monotonic()
        done = layer + 1
        if resumed:
            self._replayed_until = now
        else:
            self._fresh += 1
        per_layer = (now - self._replayed_until) / self._fresh if self._fresh else 0.0
        self.emit(
            "layer",
            layer=done,
            layers=self.total,
            elapsed_s=round(now - self.start, 3),
            eta_s=round(per_layer * (self.total - done), 3),
            resumed=resumed,
            modules=modules,
            **({"phases_s": phases} if phases else {}),
        )
        self._bar.update(1)
        if self._reporter is not None and not resumed:
            self._reporter.layer(done, self.total, per_layer * (self.total - done))

    def close(self) -> None:
        self._bar.close()
        if self._fh is not None and self._fh is not sys.stdout:
            self._fh.close()
