"""Progress on the QuantizationJob itself: the worker patches ``status.progress``.

Inside a worker pod the operator sets ``GPTQ_STATUS_TARGET=namespace/name`` and gives the
pod a ServiceAccount whose Role may patch exactly that object's status. Reporting is best
effort: a failed patch is logged, never fatal to the quantization.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)


class StatusReporter:
    def __init__(self, target: str, api_client: Any = None, min_interval: float = 5.0) -> None:
        from kubernetes import client, config

        self.namespace, _, self.name = target.partition("/")
        if not self.name:
            raise ValueError(f"status target {target!r} must be namespace/name")
        if api_client is None:
            config.load_incluster_config()
            api_client = client.ApiClient()
        self._objects = client.CustomObjectsApi(api_client)
        self._min_interval = min_interval
        self._last = 0.0

    def layer(self, done: int, total: int, eta_seconds: float | None, force: bool = False) -> None:
        now = time.monotonic()
        if not force and done < total and now - self._last < self._min_interval:
            return  # at most one patch every few seconds
        self._last = now
        progress = {"layer": done, "layers": total, "message": f"layer {done}/{total}"}
        if eta_seconds is not None:
            progress["etaSeconds"] = round(eta_seconds, 1)
        try:
            self._objects.patch_namespaced_custom_object_status(
                "gptq.dev",
                "v1alpha1",
                self.namespace,
                "quantizationjobs",
                self.name,
                {"status": {"progress": progress}},
            )
        except Exception as err:  # the API client raises several types; reporting is optional
            log.warning("could not report progress to %s/%s: %s", self.namespace, self.name, err)

    def model_size(self, model_bytes: int, memory: str) -> None:
        """The model's size and the memory the sizing formula gives for it, once, before
        the first layer: the operator requests that memory for later attempts."""
        patch = {"status": {"progress": {"modelBytes": model_bytes, "workerMemory": memory}}}
        try:
            self._objects.patch_namespaced_custom_object_status(
                "gptq.dev", "v1alpha1", self.namespace, "quantizationjobs", self.name, patch
            )
        except Exception as err:  # as in layer(): reporting is optional
            log.warning(
                "could not report the model size to %s/%s: %s", self.namespace, self.name, err
            )


def report_model_size(model_bytes: int) -> None:
    """:meth:`StatusReporter.model_size` where the worker runs in a pod; nothing elsewhere."""
    from gptq_compat.sizing import worker_memory

    reporter = from_environment()
    if reporter is not None:
        reporter.model_size(model_bytes, worker_memory(model_bytes))


def from_environment() -> StatusReporter | None:
    target = os.environ.get("GPTQ_STATUS_TARGET")
    if not target or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    try:
        return StatusReporter(target)
    except ImportError:
        log.warning(
            "GPTQ_STATUS_TARGET is set but the kubernetes package is missing; "
            "progress is not reported on the QuantizationJob"
        )
        return None
