"""What the worker tells the QuantizationJob's status while it runs (progress/events.py)."""

from __future__ import annotations

import gptq_worker.progress.kube as kube
from gptq_worker.progress.events import Progress


class Recorder:
    def __init__(self) -> None:
        self.layers: list[tuple[int, int]] = []

    def layer(self, done, total, eta_seconds, force=False):
        self.layers.append((done, total))


def test_a_resumed_run_reports_where_it_resumes_not_its_replays(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(kube, "from_environment", lambda: recorder)
    progress = Progress(None, 8, show_bar=False, resumed_from=4)
    assert recorder.layers == [(4, 8)]  # at once, before any layer is replayed
    for layer in range(4):  # the finished layers, replayed to rebuild their outputs
        progress.layer_done(layer, {}, resumed=True)
    assert recorder.layers == [(4, 8)]  # status never goes back to 1/8
    for layer in range(4, 8):
        progress.layer_done(layer, {}, resumed=False)
    assert recorder.layers[-1] == (8, 8) and [d for d, _ in recorder.layers] == sorted(
        d for d, _ in recorder.layers
    )


def test_a_fresh_run_reports_every_layer(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(kube, "from_environment", lambda: recorder)
    progress = Progress(None, 3, show_bar=False)
    for layer in range(3):
        progress.layer_done(layer, {}, resumed=False)
    assert recorder.layers == [(1, 3), (2, 3), (3, 3)]
