"""A real one-machine Kubernetes node beside the test control plane.

On top of ``tests.controlplane.cluster.ControlPlane`` (real apiserver, controller-manager,
scheduler; no kwok nodes here) this starts, as root on the host:

- containerd (Debian's 1.6 package) with runc and the CNI bridge plugin (Debian's
  containernetworking-plugins): pods get addresses in ``10.244.0.0/24`` on bridge ``cni0``;
- kubelet, built from the Go module proxy at the control plane's Kubernetes version, with
  ``failCgroupV1: false`` (this host has cgroup v1 only) and the cgroupfs driver;
- kube-proxy (iptables mode, same build), so ClusterIP Services work, the ``kubernetes``
  Service too: pods reach the apiserver through it as in any cluster;
- CoreDNS (Go module proxy) as a host process on the node's address, named as the cluster
  DNS in the kubelet's configuration, so ``<service>.<namespace>.svc`` names resolve.

The node is ``gptq-node`` at ``172.30.0.1`` (an address added to ``lo``). It carries the
labels NVIDIA GPU Feature Discovery puts on a node with the chosen GPU and advertises
``nvidia.com/gpu`` as an extended resource (the node-status patch Kubernetes documents for
extended resources), so the operator schedules onto it unchanged; a worker that finds no CUDA
runs on the CPU. Volumes are hostPath PersistentVolumes bound to claims (``provision``).

Needs root, the Debian packages named in ``REQUIRED_PACKAGES`` and the binaries of
``tests/controlplane/build.sh``. Images come from ``tests/cluster/images.sh``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.controlplane.cluster import ControlPlane, ControlPlaneUnavailable, _free_port

HERE = Path(__file__).resolve().parent
NODE_NAME = "gptq-node"
NODE_IP = "172.30.0.1"
POD_CIDR = "10.244.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"
CNI_BIN = Path("/usr/lib/cni")
# Debian package -> a file it installs, checked before starting
REQUIRED_PACKAGES = {
    "containerd": "/usr/bin/containerd",
    "runc": "/usr/sbin/runc",
    "containernetworking-plugins": "/usr/lib/cni/bridge",
    "iptables": "/usr/sbin/iptables",
    "conntrack": "/usr/sbin/conntrack",
    "mmdebstrap": "/usr/bin/mmdebstrap",
    "buildah": "/usr/bin/buildah",
}
# The labels GPU Feature Discovery writes for eight NVIDIA L4s (SM 8.9), the GPUs this node plays.
GPU_LABELS = {
    "nvidia.com/gpu.present": "true",
    "nvidia.com/gpu.product": "NVIDIA-L4",
    "nvidia.com/gpu.compute.major": "8",
    "nvidia.com/gpu.compute.minor": "9",
    "nvidia.com/gpu.family": "ada-lovelace",
    "nvidia.com/gpu.memory": "23034",
    "nvidia.com/gpu.count": "8",
}


def missing_packages() -> list[str]:
    return [pkg for pkg, path in REQUIRED_PACKAGES.items() if not Path(path).exists()]


def install_packages() -> None:
    """apt-get the node's Debian packages when they are missing (root, Debian host)."""
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ControlPlaneUnavailable(
            f"the cluster tier needs root and the Debian packages {missing} (apt-get install)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"[cluster] apt-get install {' '.join(missing)}", flush=True)
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        check=True,
        env=env,
        capture_output=True,
    )


@dataclass
class Node:
    cp: ControlPlane
    root: Path
    images: Path  # the directory of tests/cluster/images.sh's archives
    image_tag: str = "dev"
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    run_dir: Path = Path("/run/gptq-operator/node")
    # containerd's content and snapshots outlive a run (the worker image is gigabytes);
    # containers and sandboxes do not (``_start_containerd`` removes what a run left)
    containerd_root: Path = field(
        default_factory=lambda: (
            Path(os.environ.get("GPTQ_CACHE", Path.home() / ".cache" / "gptq-operator"))
            / "node"
            / "containerd"
        )
    )

    @property
    def socket(self) -> Path:
        return self.run_dir / "containerd.sock"

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self, timeout: float = 180) -> Node:
        started = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        self._host_network()
        self._start_containerd()
        self.import_images()
        self._start_kubelet()
        self._wait(self._node_ready, timeout, "the kubelet did not register a Ready node")
        self._start_kube_proxy()
        self._start_coredns()
        self._advertise_gpu()
        self._wait(
            lambda: self.cp.run_kubectl("get", "endpointslices", "-n", "default").returncode == 0,
            timeout,
            "endpoint slices are not served",
        )
        self.startup_s = time.monotonic() - started
        return self

    def stop(self) -> None:
        """Kubelet first (it stops no pods on exit), then every pod's containers, then the rest."""
        for name in ("coredns", "kube-proxy", "kubelet"):
            self._terminate(name)
        if "containerd" in self.processes and self.processes["containerd"].poll() is None:
            self._remove_containers()
        self._terminate("containerd")
        # shims outlive a containerd that is killed: end them and what they ran
        subprocess.run(["pkill", "-KILL", "-f", f"containerd-shim.*-address {self.socket}"])
        # leave no mounts behind for the next run (deepest first)
        mounts = [
            line.split()[1]
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith((str(self.root), str(self.run_dir)))
        ]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        subprocess.run(["ip", "link", "del", "cni0"], capture_output=True)
        subprocess.run(["ip", "addr", "del", f"{NODE_IP}/32", "dev", "lo"], capture_output=True)

    # ---- pieces ------------------------------------------------------------------------
    def _host_network(self) -> None:
        for key, value in (
            ("net.ipv4.ip_forward", "1"),
            ("net.bridge.bridge-nf-call-iptables", "1"),
        ):
            subprocess.run(["sysctl", "-qw", f"{key}={value}"], check=True)
        addrs = subprocess.run(["ip", "-4", "addr", "show", "lo"], capture_output=True, text=True)
        if f"{NODE_IP}/32" not in addrs.stdout:
            subprocess.run(["ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo"], check=True)
        cni = self.root / "net.d"
        cni.mkdir(exist_ok=True)
        (cni / "10-gptq.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "gptq",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": "cni0",
                            "isGateway": True,
                            "ipMasq": True,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_CIDR}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": str(self.root / "cni-ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                },
                indent=2,
            )
        )

    def _start_containerd(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.socket.exists():
            self.socket.unlink()
        config = self.root / "containerd.toml"
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config.write_text(
            f"""version = 2
root = "{self.containerd_root}"
state = "{self.run_dir / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[{cri}]
  sandbox_image = "localhost/gptq-operator/pause:{self.image_tag}"
  # no CAP_SYS_RESOURCE here: never ask for an oom_score_adj below containerd's own
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_unprivileged_ports = true
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{self.root / "net.d"}"
"""
        )
        self._spawn("containerd", ["containerd", "--config", str(config)])
        self._wait(self.socket.exists, 30, "containerd did not open its socket")
        self._wait(lambda: self._ctr("version").returncode == 0, 30, "containerd does not answer")
        self._remove_containers()

    def _remove_containers(self) -> None:
        """Kill and remove every container and pod sandbox (those of an earlier run too)."""
        tasks = self._ctr("-n", "k8s.io", "tasks", "ls", "-q").stdout.split()
        for task in tasks:
            self._ctr("-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", task)
        if tasks:
            time.sleep(1)
        for task in tasks:
            self._ctr("-n", "k8s.io", "tasks", "delete", "-f", task)
        containers = self._ctr("-n", "k8s.io", "containers", "ls", "-q").stdout.split()
        if containers:
            self._ctr("-n", "k8s.io", "containers", "rm", *containers)

    def _ctr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ctr", "--address", str(self.socket), *args], capture_output=True, text=True
        )

    def import_images(self) -> None:
        """Stream each image images.sh built from buildah's storage into containerd, unless
        containerd already holds that build (the ID images.sh wrote)."""
        stamps = self.containerd_root.parent / "imported"
        stamps.mkdir(parents=True, exist_ok=True)
        present = set(self._ctr("-n", "k8s.io", "images", "ls", "-q").stdout.split())
        for built in sorted(self.images.glob("*.id")):
            name = built.stem
            image = f"localhost/gptq-operator/{name}:{self.image_tag}"
            stamp = stamps / f"{name}.id"
            if image in present and stamp.exists() and stamp.read_text() == built.read_text():
                print(f"[cluster] {image} is already in containerd", flush=True)
                continue
            t = time.monotonic()
            push = subprocess.Popen(
                [
                    "buildah",
                    *("--root", str(self.images.parent / "containers" / "storage")),
                    *("--runroot", "/run/gptq-operator/containers"),
                    *("push", "--quiet", image, f"docker-archive:/dev/stdout:{image}"),
                ],
                stdout=subprocess.PIPE,
            )
            done = subprocess.run(
                ["ctr", "--address", str(self.socket), "-n", "k8s.io", "images", "import", "-"],
                stdin=push.stdout,
                capture_output=True,
                text=True,
            )
            push.stdout.close()
            if push.wait() != 0 or done.returncode != 0:
                raise ControlPlaneUnavailable(f"importing {image}: {done.stderr[-2000:]}")
            stamp.write_text(built.read_text())
            print(f"[cluster] imported {image} in {time.monotonic() - t:.0f} s", flush=True)

    def _start_kubelet(self) -> None:
        pki = self.cp.pki
        self.kubelet_port = _free_port()
        config = self.root / "kubelet.yaml"
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    "failCgroupV1": False,  # KEP-5573: this host has cgroup v1 only
                    "cgroupDriver": "cgroupfs",
                    "containerRuntimeEndpoint": f"unix://{self.socket}",
                    "authentication": {
                        "anonymous": {"enabled": False},
                        "webhook": {"enabled": True},
                        "x509": {"clientCAFile": str(pki / "ca.crt")},
                    },
                    "authorization": {"mode": "Webhook"},
                    "address": NODE_IP,
                    "port": self.kubelet_port,
                    "readOnlyPort": 0,
                    "healthzBindAddress": "127.0.0.1",
                    "healthzPort": _free_port(),
                    "clusterDomain": "cluster.local",
                    "clusterDNS": [NODE_IP],
                    "resolvConf": "/etc/resolv.conf",
                    "failSwapOn": False,
                    "oomScoreAdj": 0,
                    "serializeImagePulls": False,
                    "maxPods": 30,
                    "podCIDR": POD_CIDR,
                    # the images are imported, never pulled: keep them whatever the disk
                    "imageGCHighThresholdPercent": 100,
                    "imageGCLowThresholdPercent": 99,
                    # a test machine's disk is shared with its caches: evict only near full
                    "evictionHard": {
                        "memory.available": "200Mi",
                        "nodefs.available": "1Gi",
                        "imagefs.available": "1Gi",
                        "nodefs.inodesFree": "1%",
                        "imagefs.inodesFree": "1%",
                    },
                    "localStorageCapacityIsolation": True,
                    "podLogsDir": str(self.root / "pod-logs"),
                }
            )
        )
        kubeconfig = self.cp.kubeconfig_path("kubelet")
        self._spawn(
            "kubelet",
            [
                str(self.cp.bin / "kubelet"),
                "--config",
                str(config),
                "--kubeconfig",
                str(kubeconfig),
                "--hostname-override",
                NODE_NAME,
                "--node-ip",
                NODE_IP,
                "--root-dir",
                str(self.root / "kubelet"),
                "--cert-dir",
                str(self.root / "kubelet-pki"),
                "--node-labels",
                ",".join(f"{k}={v}" for k, v in GPU_LABELS.items()),
                "--v=1",
            ],
        )

    def _node_ready(self) -> bool:
        out = self.cp.run_kubectl("get", "node", NODE_NAME, "-o", "json")
        if out.returncode != 0:
            return False
        conditions = json.loads(out.stdout)["status"].get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _start_kube_proxy(self) -> None:
        config = self.root / "kube-proxy.yaml"
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "clientConnection": {"kubeconfig": str(self.cp.kubeconfig_path("kube-proxy"))},
                    "mode": "iptables",
                    "clusterCIDR": CLUSTER_CIDR,
                    "hostnameOverride": NODE_NAME,
                    "bindAddress": NODE_IP,
                    "healthzBindAddress": f"127.0.0.1:{_free_port()}",
                    "metricsBindAddress": f"127.0.0.1:{_free_port()}",
                    "oomScoreAdj": 0,
                    # leave the host's conntrack sysctls alone
                    "conntrack": {
                        "maxPerCore": 0,
                        "tcpEstablishedTimeout": "0s",
                        "tcpCloseWaitTimeout": "0s",
                    },
                }
            )
        )
        self._spawn("kube-proxy", [str(self.cp.bin / "kube-proxy"), "--config", str(config)])

    def _start_coredns(self) -> None:
        corefile = self.root / "Corefile"
        corefile.write_text(
            f""".:53 {{
    bind {NODE_IP}
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {self.cp.kubeconfig_path("coredns")}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    forward . /etc/resolv.conf
    cache 10
}}
"""
        )
        self._spawn("coredns", [str(self.cp.bin / "coredns"), "-conf", str(corefile)])

    def _advertise_gpu(self) -> None:
        """The documented status patch for an extended resource (no device plugin here)."""
        self.cp.kubectl(
            "patch",
            "node",
            NODE_NAME,
            "--subresource=status",
            "--type=json",
            "-p",
            json.dumps(
                [
                    {
                        "op": "add",
                        "path": "/status/capacity/nvidia.com~1gpu",
                        "value": GPU_LABELS["nvidia.com/gpu.count"],
                    }
                ]
            ),
        )
        self._wait(
            lambda: (
                f'"nvidia.com/gpu":"{GPU_LABELS["nvidia.com/gpu.count"]}"'
                in self.cp.kubectl("get", "node", NODE_NAME, "-o", "jsonpath={.status.allocatable}")
            ),
            60,
            "nvidia.com/gpu never became allocatable",
        )

    # ---- volumes -----------------------------------------------------------------------
    def provision(self, namespace: str, claim: str, size: str = "20Gi") -> Path:
        """A hostPath PersistentVolume pre-bound to a new claim (what a local-path provisioner
        does), world-writable like such a provisioner's directories; returns the host path."""
        path = self.root / "volumes" / f"{namespace}-{claim}"
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"{namespace}-{claim}"},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": str(path), "type": "Directory"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        }
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "volumeName": f"{namespace}-{claim}",
                "resources": {"requests": {"storage": size}},
            },
        }
        self.cp.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"kind": "List", "apiVersion": "v1", "items": [pv, pvc]}),
        )
        return path

    # ---- helpers -----------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 (lives as long as the process)
        self.processes[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _terminate(self, name: str) -> None:
        proc = self.processes.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    tail = (self.root / f"{name}.log").read_text()[-3000:]
                    raise ControlPlaneUnavailable(f"{name} exited with {proc.returncode}:\n{tail}")
            if ready():
                return
            time.sleep(0.5)
        raise ControlPlaneUnavailable(what)

    def logs(self, name: str, tail: int = 3000) -> str:
        path = self.root / f"{name}.log"
        return path.read_text()[-tail:] if path.exists() else ""
