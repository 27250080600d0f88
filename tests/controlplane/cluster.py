"""A throwaway Kubernetes control plane on loopback, with simulated GPU nodes.

Real kube-apiserver, kube-controller-manager and kube-scheduler (built by ``build.sh`` from
the Go module proxy), etcd for storage, and kwok playing the kubelets of simulated nodes
that carry NVIDIA GPU Feature Discovery labels. TLS everywhere, with client certificates
for an admin (system:masters) and for a restricted user (no rights until RBAC grants some).

Manual use::

    python -m tests.controlplane.cluster up --dir /tmp/cp    # prints the KUBECONFIG line
    python -m tests.controlplane.cluster down --dir /tmp/cp
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
K8S_VERSION = os.environ.get("K8S_VERSION", "v1.36.3")
CACHE = Path(
    os.environ.get(
        "GPTQ_CONTROLPLANE_CACHE", Path.home() / ".cache" / "gptq-operator" / "controlplane"
    )
)
BINARIES = (
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "etcd",
    "kwok",
    "helm",  # not part of the control plane: the chart's tests install with it
    "kubelet",  # the cluster tier's real node (tests/cluster)
    "kube-proxy",
    "coredns",
)
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


@dataclass(frozen=True)
class SimulatedNode:
    name: str
    product: str | None = None  # nvidia.com/gpu.product; None: a CPU-only node
    compute: tuple[int, int] | None = None
    family: str | None = None
    memory_mib: int | None = None
    gpus: int = 0

    def manifest(self) -> dict:
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
        }
        capacity = {"cpu": "64", "memory": "512Gi", "pods": "110"}
        spec: dict = {}
        if self.product:
            labels.update(
                {
                    "nvidia.com/gpu.present": "true",
                    "nvidia.com/gpu.product": self.product,
                    "nvidia.com/gpu.compute.major": str(self.compute[0]),
                    "nvidia.com/gpu.compute.minor": str(self.compute[1]),
                    "nvidia.com/gpu.family": self.family,
                    "nvidia.com/gpu.memory": str(self.memory_mib),
                    "nvidia.com/gpu.count": str(self.gpus),
                }
            )
            capacity["nvidia.com/gpu"] = str(self.gpus)
            spec["taints"] = [GPU_TAINT]
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": labels,
                "annotations": {FAKE_NODE_ANNOTATION: "fake"},
            },
            "spec": spec,
            "status": {"capacity": capacity, "allocatable": capacity},
        }


# One node per GPU generation the serving kernels care about
# (docs/operations.md and docs/serving-compatibility.md).
NODES = (
    SimulatedNode("gpu-v100", "Tesla-V100-SXM2-32GB", (7, 0), "volta", 32768, 8),
    SimulatedNode("gpu-t4", "Tesla-T4", (7, 5), "turing", 15360, 4),
    SimulatedNode("gpu-a100", "NVIDIA-A100-SXM4-80GB", (8, 0), "ampere", 81920, 8),
    SimulatedNode("gpu-l40s", "NVIDIA-L40S", (8, 9), "ada-lovelace", 46068, 4),
    SimulatedNode("gpu-h100", "NVIDIA-H100-80GB-HBM3", (9, 0), "hopper", 81559, 8),
    SimulatedNode("cpu-only"),
)


class ControlPlaneUnavailable(RuntimeError):
    pass


def bin_dir() -> Path:
    return CACHE / K8S_VERSION / "bin"


def ensure_binaries(build: bool = True) -> Path:
    """The directory with all binaries, building them with Go if allowed and needed."""
    directory = bin_dir()
    missing = [b for b in BINARIES if not (directory / b).exists()]
    if not missing:
        return directory
    if not build or shutil.which("go") is None:
        raise ControlPlaneUnavailable(
            f"control-plane binaries {missing} are not in {directory}. Build them with "
            f"tests/controlplane/build.sh (needs Go >= 1.24 and the Go module proxy; "
            f"about 15 minutes on 2 cores the first time)"
        )
    # build.sh prints a line per binary on stderr, which is left to reach the terminal;
    # Go's own output goes to a log whose tail is reported if the build fails
    log = directory.parent / "build.log"
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        result = subprocess.run(
            ["bash", str(HERE / "build.sh")],
            stdout=out,
            env={**os.environ, "K8S_VERSION": K8S_VERSION, "BUILD_LOG": str(log)},
        )
    if result.returncode != 0:
        raise ControlPlaneUnavailable(f"build.sh failed:\n{log.read_text()[-4000:]}")
    return directory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path, extra_ips: tuple[str, ...] = ()) -> None:
    """CA, apiserver serving certificate, service-account keys and client certificates."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "7",
        "-subj",
        "/CN=gptq-operator-test-ca",
        cwd=directory,
    )
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=directory)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=directory)
    ips = "".join(f"IP:{ip}," for ip in extra_ips)
    sans = (
        f"subjectAltName={ips}IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc,"
        "DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n"
    )
    _sign(directory, "apiserver", "/CN=kube-apiserver", sans)
    for name, subject in CLIENTS.items():
        _sign(directory, name, subject, "extendedKeyUsage=clientAuth\n")


CLIENTS = {
    "admin": "/O=system:masters/CN=gptq-test-admin",
    "controller-manager": "/CN=system:kube-controller-manager",
    "scheduler": "/CN=system:kube-scheduler",
    "kwok": "/O=system:masters/CN=kwok",
    "restricted": "/O=gptq-test:restricted/CN=restricted-user",
    # the real node of the cluster tier (tests/cluster): kubelet, kube-proxy, CoreDNS, and
    # the apiserver's client identity towards the kubelet (logs, exec, port-forward)
    "kubelet": "/O=system:nodes/CN=system:node:gptq-node",
    "kube-proxy": "/CN=system:kube-proxy",
    "coredns": "/O=system:masters/CN=coredns",
    "apiserver-kubelet-client": "/O=system:masters/CN=kube-apiserver-kubelet-client",
}


def _sign(directory: Path, name: str, subject: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        subject,
        cwd=directory,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "7",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.crt",
        cwd=directory,
    )


def kubeconfig(server: str, pki: Path, user: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "gptq-test",
                "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate": str(pki / f"{user}.crt"),
                    "client-key": str(pki / f"{user}.key"),
                },
            }
        ],
        "contexts": [{"name": user, "context": {"cluster": "gptq-test", "user": user}}],
        "current-context": user,
    }


@dataclass
class ControlPlane:
    root: Path
    bin: Path = field(default_factory=bin_dir)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    server: str = ""
    api_port: int = 0
    startup_s: float = 0.0
    # kwok's simulated GPU nodes; the cluster tier runs a real node instead
    simulated: tuple[SimulatedNode, ...] = NODES
    # where the apiserver listens and what it advertises as the ``kubernetes`` Service's
    # endpoint: loopback for the control-plane tier, the node's address when pods must reach it
    bind_address: str = "127.0.0.1"
    advertise_address: str = "127.0.0.1"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    def kubeconfig_path(self, user: str = "admin") -> Path:
        return self.root / f"{user}.kubeconfig"

    def start(self, timeout: float = 120) -> ControlPlane:
        started = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        extra_ips = (self.advertise_address,) if self.advertise_address != "127.0.0.1" else ()
        make_pki(self.pki, extra_ips)
        etcd_port, peer_port, api_port = _free_port(), _free_port(), _free_port()
        self.api_port = api_port
        self.server = f"https://127.0.0.1:{api_port}"
        for user in CLIENTS:
            self.kubeconfig_path(user).write_text(
                json.dumps(kubeconfig(self.server, self.pki, user), indent=2)
            )

        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._spawn(
            "etcd",
            [
                "--name",
                "gptq-test",
                "--data-dir",
                str(self.root / "etcd"),
                "--listen-client-urls",
                etcd_url,
                "--advertise-client-urls",
                etcd_url,
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-cluster",
                f"gptq-test=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--log-level",
                "warn",
            ],
        )
        pki = self.pki
        self._spawn(
            "kube-apiserver",
            [
                "--etcd-servers",
                etcd_url,
                "--bind-address",
                self.bind_address,
                "--advertise-address",
                self.advertise_address,
                "--secure-port",
                str(api_port),
                "--kubelet-client-certificate",
                str(pki / "apiserver-kubelet-client.crt"),
                "--kubelet-client-key",
                str(pki / "apiserver-kubelet-client.key"),
                "--kubelet-preferred-address-types",
                "InternalIP,Hostname",
                "--tls-cert-file",
                str(pki / "apiserver.crt"),
                "--tls-private-key-file",
                str(pki / "apiserver.key"),
                "--client-ca-file",
                str(pki / "ca.crt"),
                "--service-account-issuer",
                "https://kubernetes.default.svc.cluster.local",
                "--service-account-key-file",
                str(pki / "sa.pub"),
                "--service-account-signing-key-file",
                str(pki / "sa.key"),
                "--service-cluster-ip-range",
                "10.0.0.0/24",
                "--authorization-mode",
                "Node,RBAC",
                "--endpoint-reconciler-type",
                # loopback is no valid endpoint address
                "none" if self.advertise_address == "127.0.0.1" else "lease",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
        )
        self._wait_ready(timeout)
        self._spawn(
            "kube-controller-manager",
            [
                *self._component_flags("controller-manager"),
                "--service-account-private-key-file",
                str(pki / "sa.key"),
                "--root-ca-file",
                str(pki / "ca.crt"),
                "--use-service-account-credentials=true",
            ],
        )
        self._spawn("kube-scheduler", self._component_flags("scheduler"))
        if self.simulated:
            self._start_kwok(timeout - (time.monotonic() - started))
        self._wait_default_service_account(timeout - (time.monotonic() - started))
        self.startup_s = time.monotonic() - started
        return self

    def _start_kwok(self, timeout: float) -> None:
        self._spawn(
            "kwok",
            [
                "--kubeconfig",
                str(self.kubeconfig_path("kwok")),
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector",
                f"{FAKE_NODE_ANNOTATION}=fake",
                "--cidr",
                "10.244.0.0/16",
                "--node-ip",
                "10.0.0.2",
                "--config",
                str(HERE / "stages.yaml"),
            ],
        )
        self.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "List",
                    "items": [n.manifest() for n in self.simulated],
                }
            ),
        )
        self._wait_nodes_ready(timeout)

    def _component_flags(self, user: str) -> list[str]:
        """Connection and serving flags shared by controller-manager and scheduler."""
        kubeconfig = str(self.kubeconfig_path(user))
        return [
            "--kubeconfig",
            kubeconfig,
            "--authentication-kubeconfig",
            kubeconfig,
            "--authorization-kubeconfig",
            kubeconfig,
            "--leader-elect=false",
            "--bind-address",
            "127.0.0.1",
            "--secure-port",
            str(_free_port()),
            "--v=1",
        ]

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 (lives as long as the process)
        self.processes[name] = subprocess.Popen(
            [str(self.bin / name), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                tail = (self.root / f"{name}.log").read_text()[-3000:]
                raise ControlPlaneUnavailable(f"{name} exited with {proc.returncode}:\n{tail}")

    def _wait_until(self, ready, timeout: float, what: str) -> None:
        """Poll ``ready()`` until true; fail early if a component died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if ready():
                return
            time.sleep(0.5)
        raise ControlPlaneUnavailable(what)

    def _kubectl_ok(self, *args: str) -> str | None:
        """kubectl's output, or None when it fails (for polling)."""
        result = subprocess.run(
            [str(self.bin / "kubectl"), "--kubeconfig", str(self.kubeconfig_path()), *args],
            capture_output=True,
            text=True,
        )
        return result.stdout if result.returncode == 0 else None

    def _wait_ready(self, timeout: float) -> None:
        self._wait_until(
            lambda: (self._kubectl_ok("get", "--raw", "/readyz") or "").strip() == "ok",
            timeout,
            "kube-apiserver did not become ready",
        )

    def _nodes_ready(self) -> bool:
        out = self._kubectl_ok("get", "nodes", "-o", "json")
        nodes = json.loads(out)["items"] if out else []
        ready = [
            n
            for n in nodes
            if any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in n["status"].get("conditions", [])
            )
        ]
        return len(ready) == len(self.simulated)

    def _wait_nodes_ready(self, timeout: float) -> None:
        self._wait_until(self._nodes_ready, timeout, "kwok did not make the simulated nodes Ready")

    def _wait_default_service_account(self, timeout: float) -> None:
        self._wait_until(
            lambda: (
                self._kubectl_ok("get", "serviceaccount", "default", "-n", "default") is not None
            ),
            timeout,
            "the default ServiceAccount never appeared",
        )

    def run_kubectl(
        self, *args: str, user: str = "admin", input: str | None = None
    ) -> subprocess.CompletedProcess:
        """kubectl as ``user``, whatever its exit code (``auth can-i`` exits 1 for "no")."""
        return subprocess.run(
            [str(self.bin / "kubectl"), "--kubeconfig", str(self.kubeconfig_path(user)), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def kubectl(self, *args: str, user: str = "admin", input: str | None = None) -> str:
        result = self.run_kubectl(*args, user=user, input=input)
        if result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            proc = self.processes[name]
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.processes.clear()


def _main() -> int:
    p = argparse.ArgumentParser(description="start or stop the test control plane")
    p.add_argument("action", choices=("up", "down"))
    p.add_argument("--dir", default="/tmp/gptq-controlplane")
    args = p.parse_args()
    root = Path(args.dir)
    if args.action == "down":
        if not (root / "pids.json").exists():
            print(f"no control plane recorded in {root}", file=sys.stderr)
            return 1
        pids = json.loads((root / "pids.json").read_text())
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        print(f"stopped {', '.join(pids)}")
        return 0
    ensure_binaries()
    cp = ControlPlane(root)
    try:
        cp.start()
    except BaseException:
        cp.stop()
        raise
    (root / "pids.json").write_text(json.dumps({n: p.pid for n, p in cp.processes.items()}))
    print(f"control plane up in {cp.startup_s:.1f}s ({K8S_VERSION}); logs in {root}")
    print(
        f"export KUBECONFIG={cp.kubeconfig_path()}  # restricted user: "
        f"{cp.kubeconfig_path('restricted')}"
    )
    print(f"export PATH={cp.bin}:$PATH")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
