"""The cluster tier: a real node (kubelet, containerd, runc, CNI, kube-proxy, CoreDNS) beside
the test control plane, the project's images built from its Dockerfile, and the operator
installed in-cluster by the Helm chart.

Everything here runs for real; the tier needs root, the Debian packages of
``node.REQUIRED_PACKAGES`` (installed with apt-get when missing) and Go. Outside CI it is
skipped, with the reason, where those are missing; in CI it must run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import live_output

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TAG = "dev"
OPERATOR_NAMESPACE = "gptq-system"


def _unavailable(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the cluster tier must run in CI: {why}")
    pytest.skip(why)


@dataclass
class Cluster:
    cp: object  # tests.controlplane.cluster.ControlPlane
    node: object  # tests.cluster.node.Node
    api: object  # kubernetes ApiClient (admin)
    transcript: Path

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.cp.kubectl(*args, input=input)

    def say(self, title: str, text: str) -> None:
        """Keep what a step printed: in the transcript file and on the terminal."""
        block = f"$ {title}\n{text.rstrip()}\n\n"
        with self.transcript.open("a") as f:
            f.write(block)
        print(block, end="", flush=True)


def build_images(config) -> Path:
    started = time.monotonic()
    with live_output(config):
        done = subprocess.run(
            ["bash", str(HERE / "images.sh")],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "IMAGE_TAG": TAG},
        )
    if done.returncode != 0:
        pytest.fail(f"building the images from the Dockerfile failed (exit {done.returncode})")
    print(f"[cluster] images built in {time.monotonic() - started:.0f} s", flush=True)
    return Path(done.stdout.strip().splitlines()[-1])


def helm_install(cp, transcript) -> None:
    values = {
        "operator": {
            "image": {
                "repository": "localhost/gptq-operator/operator",
                "tag": TAG,
                "pullPolicy": "Never",
            },
        },
        "worker": {
            "image": {"repository": "localhost/gptq-operator/worker", "tag": TAG},
            # the node advertises nvidia.com/gpu with no GPU behind it: workers use the CPU
            "gpuDevice": "auto",
        },
        "policy": {"allowedImages": ["localhost/gptq-operator/"]},
    }
    values_file = transcript.parent / "values.json"
    values_file.write_text(json.dumps(values, indent=2))
    out = subprocess.run(
        [
            str(cp.bin / "helm"),
            "--kubeconfig",
            str(cp.kubeconfig_path()),
            "install",
            "gptq",
            str(ROOT / "charts" / "gptq-operator"),
            "--namespace",
            OPERATOR_NAMESPACE,
            "--create-namespace",
            "--values",
            str(values_file),
            "--wait",
            "--timeout",
            "5m",
        ],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pods = cp.run_kubectl("describe", "pods", "-n", OPERATOR_NAMESPACE).stdout
        pytest.fail(f"helm install failed: {out.stderr}\n{pods[-4000:]}")


# module scope: the node and its pods (a serving pod among them) stop when the cluster
# tier's tests end, not at the end of the whole session
@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pytestconfig):
    from tests.cluster import node as node_mod
    from tests.controlplane.cluster import ControlPlane, ControlPlaneUnavailable, ensure_binaries

    if os.geteuid() != 0:
        _unavailable("the cluster tier runs a kubelet and containerd: it needs root")
    if shutil.which("go") is None:
        _unavailable("the cluster tier builds its node's binaries with Go (>= 1.24)")
    try:
        with live_output(pytestconfig):
            node_mod.install_packages()
            ensure_binaries(build=True)
    except (ControlPlaneUnavailable, subprocess.CalledProcessError) as err:
        _unavailable(str(err))
    images = build_images(pytestconfig)

    root = tmp_path_factory.mktemp("cluster")
    transcript = Path(os.environ.get("GPTQ_TRANSCRIPTS", root)) / "cluster-tier.txt"
    transcript.parent.mkdir(parents=True, exist_ok=True)
    transcript.write_text("")
    cp = ControlPlane(
        root / "cp",
        simulated=(),
        bind_address="0.0.0.0",
        advertise_address=node_mod.NODE_IP,
    )
    node = node_mod.Node(cp, root / "node", images, image_tag=TAG)
    try:
        cp.start()
        with live_output(pytestconfig):
            node.start()
        helm_install(cp, transcript)
    except BaseException:
        for name in ("containerd", "kubelet", "kube-proxy", "coredns"):
            print(f"--- {name} log tail ---\n{node.logs(name)}")
        node.stop()
        cp.stop()
        raise
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(cp.kubeconfig_path()))
    print(f"[cluster] control plane, node and operator up; node in {node.startup_s:.0f} s")
    yield Cluster(cp, node, api, transcript)
    node.stop()
    cp.stop()
