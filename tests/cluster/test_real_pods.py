"""Real pods: the worker really quantizes and the server really serves, on a real node.

One scenario, real processes all the way (``conftest.cluster``): images built from the
Dockerfile, the operator installed by the Helm chart and running in a pod, a QuantizationJob
whose worker pod quantizes a small model on the CPU and reports progress through the API with
its own ServiceAccount, a QuantizedModel whose built-in serving pod passes Pod Security
"restricted" and answers through its Service; then faults (a worker pod deleted mid-run, the
operator killed during a reconcile, a QuantizationJob deleted) and the examples.

What each step printed goes to ``cluster-tier.txt`` (in ``$GPTQ_TRANSCRIPTS`` when set).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client, watch

from tests.controlplane.test_control_plane import wait_for

ROOT = Path(__file__).resolve().parents[2]
NS = "demo"
GROUP, VERSION = "gptq.dev", "v1alpha1"
# a layer of this model takes long enough on the CPU for a test to delete the worker pod
# between two layers (the resume test)
MODEL = {"hidden": 256, "layers": 8, "steps": 20}
CALIBRATION = {"nsamples": 128, "seqlen": 256}

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def workspace(cluster):
    """Namespace ``demo`` enforcing Pod Security "restricted", a PVC ``models`` holding a
    small trained model (real byte-level BPE tokenizer) and its calibration text."""
    from gptq_worker.demo.models import build_demo_model

    cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": NS,
                    "labels": {
                        "pod-security.kubernetes.io/enforce": "restricted",
                        "pod-security.kubernetes.io/enforce-version": "latest",
                    },
                },
            }
        ),
    )
    volume = cluster.node.provision(NS, "models")
    files = build_demo_model(
        volume / "tiny",
        steps=MODEL["steps"],
        hidden=MODEL["hidden"],
        layers=MODEL["layers"],
        vocab_size=1024,
        log_every=0,
        train_chars=400_000,
    )
    subprocess.run(["chmod", "-R", "a+rX", str(volume / "tiny")], check=True)
    wait_for(
        lambda: (
            cluster.kubectl("get", "pvc", "models", "-n", NS, "-o", "jsonpath={.status.phase}")
            == "Bound"
        ),
        what="PVC models bound",
    )
    return {"volume": volume, **files}


def qjob(name: str, output: str, **extra) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "QuantizationJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "model": {"uri": "pvc://models/tiny/model"},
            "quantization": {"bits": 4, "groupSize": 64},
            "calibration": {"dataset": "pvc://models/tiny/calibration.txt", **CALIBRATION},
            "output": {"uri": f"pvc://models/{output}"},
            "resources": {"gpus": 1, "memory": "6Gi"},
            **extra,
        },
    }


def qmodel(name: str, source: dict) -> dict:
    """A QuantizedModel on the built-in runtime (the one backend this node can run)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "QuantizedModel",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "source": source,
            "backend": "builtin",
            "resources": {"gpus": 1, "memory": "3Gi"},
        },
    }


class ProgressWatch:
    """Every status.progress.message a QuantizationJob shows, in order, from a watch."""

    def __init__(self, api, name: str):
        self.messages: list[str] = []
        self.phases: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(api, name), daemon=True)
        self._thread.start()

    def _run(self, api, name):
        objects = client.CustomObjectsApi(api)
        while not self._stop.is_set():
            w = watch.Watch()
            try:
                for event in w.stream(
                    objects.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    NS,
                    "quantizationjobs",
                    field_selector=f"metadata.name={name}",
                    timeout_seconds=5,
                ):
                    status = event["object"].get("status") or {}
                    message = (status.get("progress") or {}).get("message")
                    if message and (not self.messages or self.messages[-1] != message):
                        self.messages.append(message)
                    phase = status.get("phase")
                    if phase and (not self.phases or self.phases[-1] != phase):
                        self.phases.append(phase)
                    if self._stop.is_set():
                        break
            except Exception:
                time.sleep(0.2)

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=10)


def layer_of(message: str) -> int:
    """'layer 3/8 ...' -> 3."""
    word = message.split("layer", 1)[1].strip().split("/", 1)[0]
    return int(word)


def digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def apply(cluster, obj: dict) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))


def wait_condition(cluster, kind: str, name: str, condition: str, timeout: int) -> str:
    out = subprocess.run(
        [
            str(cluster.cp.bin / "kubectl"),
            "--kubeconfig",
            str(cluster.cp.kubeconfig_path()),
            *("wait", "-n", NS, f"--for=condition={condition}", f"{kind}/{name}"),
            f"--timeout={timeout}s",
        ],
        capture_output=True,
        text=True,
        timeout=timeout + 60,
    )
    if out.returncode != 0:
        details = cluster.cp.run_kubectl("get", kind, name, "-n", NS, "-o", "yaml").stdout
        pods = cluster.cp.run_kubectl("describe", "pods", "-n", NS).stdout
        logs = cluster.cp.run_kubectl(
            "logs", "-n", NS, "-l", "app.kubernetes.io/managed-by=gptq-operator", "--tail=50"
        ).stdout
        operator = cluster.cp.run_kubectl(
            "logs", "-n", "gptq-system", "deploy/gptq-gptq-operator", "--tail=60"
        ).stdout
        pytest.fail(
            f"kubectl wait {kind}/{name} {condition}: {out.stderr}\n{details}\n"
            f"{pods[-6000:]}\n--- pod logs ---\n{logs}\n--- operator ---\n{operator}"
        )
    return out.stdout.strip()


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptq_worker.cli", "validate", str(path)],
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def quantized(cluster, workspace):
    """Step 1: a QuantizationJob quantizes the model in a real worker pod on the CPU."""
    progress = ProgressWatch(cluster.api, "tiny")
    apply(cluster, qjob("tiny", "out/tiny-w4"))
    lines = []
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        line = cluster.kubectl("get", "qjob", "tiny", "-n", NS, "--no-headers")
        if not lines or lines[-1] != line:
            lines.append(line)
        if progress.phases and progress.phases[-1] in ("Succeeded", "Failed", "QualityGateFailed"):
            break
        time.sleep(2)
    waited = wait_condition(cluster, "qjob", "tiny", "Ready", 60)
    progress.stop()
    cluster.say(
        f"kubectl get qjob tiny -n {NS} --no-headers  (polled every 2 s, distinct lines)",
        "".join(lines),
    )
    cluster.say("progress messages seen by a watch", "\n".join(progress.messages))
    cluster.say(f"kubectl wait --for=condition=Ready qjob/tiny -n {NS}", waited)
    return {"messages": progress.messages, "phases": progress.phases, "lines": lines}


def test_a_real_worker_quantizes_and_a_restricted_pod_serves_it(cluster, workspace, quantized):
    # 1. progress moved, layer by layer, as the worker in the pod reported it
    layers = [layer_of(m) for m in quantized["messages"] if "layer" in m]
    assert len(set(layers)) >= 2 and layers == sorted(layers), quantized["messages"]
    assert quantized["phases"][-1] == "Succeeded", quantized["phases"]
    output = workspace["volume"] / "out" / "tiny-w4"
    checked = validate(output)
    cluster.say("gptq-worker validate <pvc models>/out/tiny-w4", checked.stdout + checked.stderr)
    assert checked.returncode == 0
    modes = {oct(p.stat().st_mode & 0o777) for p in output.rglob("*") if p.is_file()}
    assert modes == {"0o644"}, modes  # readable by a serving pod running as another user

    # 2. the built-in runtime serves it from a pod that meets "restricted"
    apply(cluster, qmodel("tiny", {"job": "tiny"}))
    waited = wait_condition(cluster, "qmodel", "tiny", "Ready", 600)
    cluster.say(f"kubectl wait --for=condition=Ready qmodel/tiny -n {NS}", waited)
    cluster.say(
        f"kubectl get qmodel,deploy,svc,pods -n {NS}",
        cluster.kubectl("get", "qmodel,deploy,svc,pods", "-n", NS, "-o", "wide"),
    )
    answer = client_pod(
        cluster,
        "ask",
        """
import json, urllib.request
req = urllib.request.Request(
    "http://tiny.demo.svc/v1/completions",
    data=json.dumps({"model": "tiny", "prompt": "def main(", "max_tokens": 12,
                     "temperature": 0}).encode(),
    headers={"Content-Type": "application/json"})
body = json.load(urllib.request.urlopen(req, timeout=60))
print(json.dumps(body))
metrics = urllib.request.urlopen("http://tiny.demo.svc/metrics", timeout=10).read().decode()
print("\\n".join(l for l in metrics.splitlines() if l.startswith(
    ("vllm:request_success_total", "vllm:generation_tokens_total", "vllm:prompt_tokens_total"))))
""",
    )
    cluster.say("a pod in namespace demo asks http://tiny.demo.svc (completion, /metrics)", answer)
    body = json.loads(answer.splitlines()[0])
    assert body["choices"][0]["text"] and body["usage"]["completion_tokens"] >= 1
    samples: dict[str, float] = {}  # summed over labels (finished_reason, ...)
    for line in answer.splitlines()[1:]:
        metric = line.split("{")[0].split(" ")[0]
        samples[metric] = samples.get(metric, 0.0) + float(line.rsplit(" ", 1)[1])
    assert samples["vllm:generation_tokens_total"] >= body["usage"]["completion_tokens"]
    assert samples["vllm:request_success_total"] >= 1


def client_pod(cluster, name: str, script: str) -> str:
    """Run ``script`` with the worker image's Python in a restricted-compliant pod; its logs."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 10001,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "client",
                    "image": "localhost/gptq-operator/worker:dev",
                    "command": ["python3", "-c", script],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }
    cluster.kubectl("delete", "pod", name, "-n", NS, "--ignore-not-found", "--wait")
    apply(cluster, pod)
    phase = wait_for(
        lambda: (
            cluster.kubectl("get", "pod", name, "-n", NS, "-o", "jsonpath={.status.phase}").strip()
            in ("Succeeded", "Failed")
            and cluster.kubectl("get", "pod", name, "-n", NS, "-o", "jsonpath={.status.phase}")
        ),
        timeout=180,
        interval=1,
        what=f"pod {name} to finish",
    )
    logs = cluster.kubectl("logs", name, "-n", NS)
    assert phase == "Succeeded", logs
    return logs


def test_a_worker_pod_deleted_mid_run_resumes_to_the_same_bytes(cluster, workspace, quantized):
    """Step 3a: the Job's next pod resumes from the last finished layer; the checkpoint is
    byte-identical to the uninterrupted run of step 1."""
    progress = ProgressWatch(cluster.api, "resumed")
    apply(cluster, qjob("resumed", "out/resumed-w4"))
    total = MODEL["layers"]
    wait_for(
        lambda: any("layer" in m and 2 <= layer_of(m) < total for m in progress.messages),
        timeout=600,
        interval=0.1,
        what="the worker to finish two layers",
    )
    killed_after = progress.messages[-1]
    pods = client.CoreV1Api(cluster.api).list_namespaced_pod(
        NS, label_selector="job-name=resumed-worker-1"
    )
    assert len(pods.items) == 1
    first = pods.items[0].metadata.name
    cluster.kubectl("delete", "pod", first, "-n", NS, "--wait=false")
    waited = wait_condition(cluster, "qjob", "resumed", "Ready", 900)
    progress.stop()
    cluster.say(
        f"kubectl delete pod {first} (after '{killed_after}'); messages seen",
        "\n".join(progress.messages),
    )
    cluster.say("kubectl wait --for=condition=Ready qjob/resumed", waited)
    pods = client.CoreV1Api(cluster.api).list_namespaced_pod(
        NS, label_selector="job-name=resumed-worker-1"
    )
    second = [p for p in pods.items if p.metadata.name != first]
    assert second, "the Job made no second pod"
    log = cluster.kubectl("logs", second[0].metadata.name, "-n", NS)
    resumed = [line for line in log.splitlines() if "resuming" in line]
    cluster.say("the second pod's log lines about resuming", "\n".join(resumed))
    assert resumed, log[-3000:]
    # "... 3/8 layers were finished by an earlier run ...": at least what status had shown
    finished = int(resumed[0].split(": ", 2)[2].split("/", 1)[0])
    assert layer_of(killed_after) <= finished < MODEL["layers"], resumed
    reference = digests(workspace["volume"] / "out" / "tiny-w4")
    again = digests(workspace["volume"] / "out" / "resumed-w4")
    assert again == reference


def test_the_operator_killed_during_a_reconcile_makes_no_duplicates(cluster, workspace):
    """Step 3b: the operator pod is killed right after a QuantizedModel appears; its
    successor finishes the reconcile with one Deployment and one Service."""
    apply(cluster, qmodel("twice", {"uri": "pvc://models/out/tiny-w4"}))
    killed = cluster.kubectl(
        "delete",
        "pod",
        "-n",
        "gptq-system",
        "-l",
        "app.kubernetes.io/name=gptq-operator",
        "--grace-period=0",
        "--force",
    )
    waited = wait_condition(cluster, "qmodel", "twice", "Ready", 600)
    cluster.say("kubectl delete operator pod --force; then wait qmodel/twice", killed + waited)
    apps = client.AppsV1Api(cluster.api)
    deployments = apps.list_namespaced_deployment(
        NS, label_selector="gptq.dev/quantized-model=twice"
    ).items
    services = [
        s
        for s in client.CoreV1Api(cluster.api).list_namespaced_service(NS).items
        if s.metadata.name.startswith("twice")
    ]
    assert len(deployments) == 1 and len(services) == 1
    cluster.kubectl("delete", "qmodel", "twice", "-n", NS, "--wait")


def test_deleting_a_quantization_job_collects_its_children(cluster, workspace, quantized):
    """Step 3c: the Job, its pods and ConfigMaps go with the QuantizationJob (owner
    references, the garbage collector); the checkpoint on the volume stays."""
    batch = client.BatchV1Api(cluster.api)
    assert batch.read_namespaced_job("resumed-worker-1", NS).metadata.owner_references
    cluster.kubectl("delete", "qjob", "resumed", "-n", NS, "--wait")

    def gone():
        jobs = [
            j for j in batch.list_namespaced_job(NS).items if j.metadata.name.startswith("resumed-")
        ]
        pods = [
            p
            for p in client.CoreV1Api(cluster.api).list_namespaced_pod(NS).items
            if p.metadata.name.startswith("resumed-")
        ]
        cms = [
            c
            for c in client.CoreV1Api(cluster.api).list_namespaced_config_map(NS).items
            if c.metadata.name.startswith("resumed-")
        ]
        return not jobs and not pods and not cms

    wait_for(gone, timeout=120, interval=1, what="the children of qjob/resumed to be collected")
    cluster.say(
        "kubectl delete qjob resumed; then jobs,pods,configmaps named resumed-*",
        cluster.kubectl("get", "jobs,pods,configmaps", "-n", NS),
    )
    assert validate(workspace["volume"] / "out" / "resumed-w4").returncode == 0


def runs_here(docs: list[dict]) -> bool:
    """Local sources only (pvc://, no hub, no S3) and the built-in runtime (no GPU engine)."""
    for d in docs:
        spec = d.get("spec") or {}
        if d["kind"] == "QuantizationJob" and not spec["model"]["uri"].startswith("pvc://"):
            return False
        if d["kind"] == "QuantizedModel" and spec.get("backend") != "builtin":
            return False
    return True


def test_every_example_passes_a_dry_run_and_the_local_ones_run(cluster, workspace):
    """Step 4: every example as written, in a server-side dry run; those with local sources
    and the built-in runtime for real, until their QuantizedModel answers."""
    out, real = [], []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        if any(d.get("apiVersion", "").startswith("argoproj.io") for d in docs):
            continue  # an Argo CD Application: its CRD is Argo CD's, not installed here
        done = cluster.cp.run_kubectl("apply", "--dry-run=server", "-n", NS, "-f", str(path))
        out.append(f"{path.name}: {(done.stdout or done.stderr).strip()}")
        assert done.returncode == 0, done.stderr
        if runs_here(docs):
            real.append((path, docs))
    cluster.say("kubectl apply --dry-run=server -f examples/<each>.yaml", "\n".join(out))
    assert real, "no example runs on this cluster: keep one with local sources"
    for path, docs in real:
        cluster.kubectl("apply", "-n", NS, "-f", str(path))
        said = []
        for d in docs:
            kind = "qjob" if d["kind"] == "QuantizationJob" else "qmodel"
            said.append(wait_condition(cluster, kind, d["metadata"]["name"], "Ready", 900))
        cluster.say(
            f"kubectl apply -f examples/{path.name}; kubectl wait ... Ready", "\n".join(said)
        )
        for d in docs:
            if d["kind"] == "QuantizedModel":
                name = d["metadata"]["name"]
                answer = client_pod(
                    cluster,
                    f"ask-{name}",
                    f"""
import json, urllib.request
req = urllib.request.Request("http://{name}.{NS}.svc/v1/completions",
    data=json.dumps({{"model": "{name}", "prompt": "import", "max_tokens": 8}}).encode(),
    headers={{"Content-Type": "application/json"}})
print(json.dumps(json.load(urllib.request.urlopen(req, timeout=60))))
""",
                )
                cluster.say(f"a pod asks http://{name}.{NS}.svc", answer)
                assert json.loads(answer)["usage"]["completion_tokens"] >= 1
        cluster.kubectl("delete", "-n", NS, "-f", str(path), "--wait")
