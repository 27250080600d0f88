"""Status that tells the truth: each failure a user meets has its phase, kstatus conditions,
a reason that names the cause and the fix, a ``lastFailure`` and one aggregated event.

Real where the control plane is real: a missing PersistentVolumeClaim is the real
scheduler's verdict. Image pulls, missing Secrets and crash loops are kubelet states; kwok
plays the kubelet here (stage ``kwok-pod-waiting``), and the real-pod tier covers the rest.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.conftest import bind_claims
from tests.controlplane.test_control_plane import wait_for
from tests.operator.test_quantization_job_e2e import (
    GROUP,
    PLURAL,
    RESULT,
    VERSION,
    condition,
    get,
    phase,
    qjob,
    running_pod,
)
from tests.operator.test_quantized_model_e2e import (
    create_qmodel,
    model_phase,
    play_worker,
    qmodel,
    serving_pods,
)

pytestmark = pytest.mark.controlplane
from kubernetes import client, watch  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402


def transcript(name: str, *outputs: str) -> None:
    """What kubectl showed, kept under $GPTQ_TRANSCRIPTS when set (KopfRunner holds stdout)."""
    where = os.environ.get("GPTQ_TRANSCRIPTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        (Path(where) / f"{name}.txt").write_text("\n".join(outputs))


def events_for(api, namespace, name, reason=None) -> list:
    """Events of ``name``; with a reason, once at least one is there (an event is posted
    right after the status write it belongs to)."""
    selector = f"involvedObject.name={name}" + (f",reason={reason}" if reason else "")

    def listed():
        return client.CoreV1Api(api).list_namespaced_event(namespace, field_selector=selector).items

    if reason:
        wait_for(listed, what=f"a {reason} event", timeout=30)
    return listed()


def make_wait(api, namespace, pod_name, reason, message="", exit_code=None) -> None:
    annotations = {
        "kwok.gptq.dev/waiting-reason": reason,
        "kwok.gptq.dev/waiting-message": message,
    }
    if exit_code is not None:
        annotations["kwok.gptq.dev/last-exit-code"] = str(exit_code)
    client.CoreV1Api(api).patch_namespaced_pod(
        pod_name, namespace, {"metadata": {"annotations": annotations}}
    )


def stalled_with(obj: dict, reason: str) -> bool:
    c = condition(obj, "Stalled") or {}
    return c.get("status") == "True" and c.get("reason") == reason


def ready_model(api, namespace, name="m", backend="vllm") -> None:
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, qjob(f"{name}-job")
    )
    play_worker(api, namespace, f"{name}-job", RESULT)
    create_qmodel(api, namespace, name, f"{name}-job", backend)
    wait_for(lambda: model_phase(api, namespace, name) == "Ready", what="Ready", timeout=90)


def test_missing_pvc_stalls_the_job_and_it_recovers_when_the_claim_appears(
    operator, control_plane, api, namespace
):
    """The scheduler's own verdict on a claim that does not exist becomes PVCNotFound."""
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, qjob("nopvc")
    )
    control_plane.kubectl(
        "wait", "-n", namespace, "--for=condition=Stalled", "qjob/nopvc", "--timeout=60s"
    )
    job = get(api, namespace, "nopvc")
    stalled, ready = condition(job, "Stalled"), condition(job, "Ready")
    assert stalled["reason"] == ready["reason"] == "PVCNotFound"
    assert ready["status"] == "False" and condition(job, "Reconciling")["status"] == "False"
    assert "PersistentVolumeClaim datasets does not exist" in stalled["message"] or (
        "PersistentVolumeClaim models does not exist" in stalled["message"]
    )
    assert job["status"]["lastFailure"]["reason"] == "PVCNotFound"
    assert job["status"]["phase"] == "Pending"
    events = events_for(api, namespace, "nopvc", "PVCNotFound")
    assert len(events) == 1 and events[0].type == "Warning"
    assert events[0].source.component == "gptq-operator"
    transcript(
        "qjob-PVCNotFound",
        control_plane.kubectl("get", "qjob", "-n", namespace, "-o", "wide"),
        control_plane.kubectl("describe", "qjob", "nopvc", "-n", namespace),
    )

    # the cause goes away: the claims appear, the scheduler binds, the job runs
    core = client.CoreV1Api(api)
    bind_claims(api, namespace, size="1Gi")
    try:
        wait_for(lambda: phase(api, namespace, "nopvc") == "Running", what="Running", timeout=120)
        job = get(api, namespace, "nopvc")
        assert condition(job, "Stalled")["status"] == "False"
        assert condition(job, "Reconciling")["status"] == "True"
        # kept as history (the scheduler may have said "unbound claims" in between)
        assert job["status"]["lastFailure"]["reason"] in ("PVCNotFound", "Unschedulable")
    finally:
        for claim in ("models", "datasets"):
            core.delete_persistent_volume(f"{namespace}-{claim}")


@pytest.mark.parametrize(
    ("reason", "message", "exit_code", "expected", "says"),
    [
        (
            "ImagePullBackOff",
            'Back-off pulling image "vllm/vllm-openai:v0.32.0"',
            None,
            "ImagePullBackOff",
            "cannot be pulled",
        ),
        ("CrashLoopBackOff", "back-off 5m0s restarting failed container", 1, "CrashLoopBackOff",
         "keeps exiting (exit code 1"),
        (
            "CreateContainerConfigError",
            'secret "hf-token" not found',
            None,
            "MissingSecret",
            "Secret hf-token does not exist",
        ),
    ],
)  # fmt: skip
def test_a_serving_pod_that_cannot_run_stalls_the_model_with_its_cause(
    operator, control_plane, api, namespace, volumes, reason, message, exit_code, expected, says
):
    ready_model(api, namespace)
    pod = serving_pods(api, namespace, "m")[0]
    make_wait(api, namespace, pod.metadata.name, reason, message, exit_code)
    control_plane.kubectl(
        "wait", "-n", namespace, "--for=condition=Stalled", "qmodel/m", "--timeout=60s"
    )
    model = qmodel(api, namespace, "m")
    assert stalled_with(model, expected)
    assert model["status"]["phase"] == "Failed" and model["status"]["readyReplicas"] == 0
    assert condition(model, "Ready")["status"] == "False"
    assert condition(model, "Reconciling")["status"] == "False"
    assert says in condition(model, "Stalled")["message"]
    last = model["status"]["lastFailure"]
    assert last["reason"] == expected and last.get("exitCode") == exit_code
    events = events_for(api, namespace, "m", expected)
    assert len(events) == 1 and events[0].type == "Warning" and events[0].count == 1
    # the model's normal lifecycle is in events too, from the same source
    assert {e.reason for e in events_for(api, namespace, "m")} >= {"Ready", expected}
    table = control_plane.kubectl("get", "qjob,qmodel", "-n", namespace, "-o", "wide")
    assert expected in table, table
    transcript(
        f"qmodel-{expected}",
        table,
        control_plane.kubectl("describe", "qmodel", "m", "-n", namespace),
    )


def test_a_failed_source_job_recovers_when_re_created(
    operator, control_plane, api, namespace, volumes
):
    objects = client.CustomObjectsApi(api)
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, qjob("src"))
    create_qmodel(api, namespace, "svc", "src", "vllm")
    pod = wait_for(lambda: running_pod(api, namespace, "src-worker-1"), what="worker pod")
    from tests.operator.test_quantization_job_e2e import finish

    finish(api, namespace, pod, 2, {"error": "no such file: config.json"})
    control_plane.kubectl(
        "wait", "-n", namespace, "--for=condition=Stalled", "qmodel/svc", "--timeout=60s"
    )
    assert condition(qmodel(api, namespace, "svc"), "Stalled")["reason"] == "SourceJobFailed"
    objects.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "src")
    wait_for(
        lambda: (
            not [
                j
                for j in objects.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)[
                    "items"
                ]
            ]
        ),
        what="job gone",
    )
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, qjob("src"))
    wait_for(lambda: model_phase(api, namespace, "svc") == "Waiting", what="Waiting again")
    play_worker(api, namespace, "src", RESULT)
    wait_for(lambda: model_phase(api, namespace, "svc") == "Ready", what="Ready", timeout=90)
    assert condition(qmodel(api, namespace, "svc"), "Stalled")["status"] == "False"


def test_a_steady_model_never_flaps(operator, api, namespace, volumes):
    """100 status updates of a Ready model, each after a trigger that makes the operator
    reconcile (Deployment and pod changes, the model's own metadata): none regresses."""
    ready_model(api, namespace)
    objects, apps, core = (
        client.CustomObjectsApi(api),
        client.AppsV1Api(api),
        client.CoreV1Api(api),
    )
    seen: list[tuple[str, str]] = []
    said: list[str] = []
    start = qmodel(api, namespace, "m")["metadata"]["resourceVersion"]
    stop = threading.Event()

    def poke() -> None:
        pod = serving_pods(api, namespace, "m")[0].metadata.name
        i = 0
        while not stop.is_set():
            i += 1
            note = {"metadata": {"annotations": {"test.gptq.dev/poke": str(i)}}}
            apps.patch_namespaced_deployment("m", namespace, note)
            core.patch_namespaced_pod(pod, namespace, note)
            objects.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, "quantizedmodels", "m", note
            )

    poker = threading.Thread(target=poke, daemon=True)
    poker.start()
    stream = watch.Watch()
    try:
        for event in stream.stream(
            objects.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            "quantizedmodels",
            field_selector="metadata.name=m",
            resource_version=start,
            timeout_seconds=120,
        ):
            obj = event["object"]
            ready = condition(obj, "Ready") or {}
            seen.append((obj["status"]["phase"], ready.get("status")))
            said.append(ready.get("message"))
            if len(seen) >= 100:
                break
    finally:
        stop.set()
        stream.stop()
        poker.join(timeout=10)
    assert len(seen) >= 100
    assert set(seen) == {("Ready", "True")}, [
        m for s, m in zip(seen, said, strict=True) if s[1] != "True"
    ][:5]


def test_switching_backend_rolls_the_one_deployment_to_the_new_engine(
    operator, api, namespace, volumes
):
    ready_model(api, namespace)
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "quantizedmodels", "m", {"spec": {"backend": "builtin"}}
    )
    apps = client.AppsV1Api(api)

    def serving_args() -> list[str]:
        deployments = apps.list_namespaced_deployment(
            namespace, label_selector="gptq.dev/quantized-model=m"
        ).items
        assert [d.metadata.name for d in deployments] == ["m"]  # never two at once
        return deployments[0].spec.template.spec.containers[0].args

    wait_for(lambda: serving_args()[0] == "serve", what="the built-in server's arguments")

    def ready_for_the_new_spec() -> bool:  # kstatus: Ready counts once observedGeneration is 2
        status = qmodel(api, namespace, "m").get("status") or {}
        return status.get("observedGeneration") == 2 and status.get("phase") == "Ready"

    wait_for(ready_for_the_new_spec, what="Ready for generation 2", timeout=90)
    model = qmodel(api, namespace, "m")
    assert (model["status"]["backend"], model["status"]["kernel"]) == ("builtin", "builtin/torch")
    assert model["status"]["observedGeneration"] == model["metadata"]["generation"] == 2


def test_a_quantization_jobs_spec_cannot_change(operator, api, namespace, volumes):
    objects = client.CustomObjectsApi(api)
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, qjob("fixed"))
    with pytest.raises(ApiException) as err:
        objects.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "fixed", {"spec": {"quantization": {"bits": 8}}}
        )
    assert err.value.status == 422
    assert "spec is immutable: a QuantizationJob runs once" in err.value.body


def test_a_spec_only_the_operator_can_judge_is_stalled_with_the_field(
    operator, control_plane, api, namespace, volumes
):
    """A `dynamic` key that is no regex passes the schema (CEL cannot compile a regex), so
    the operator refuses it: Stalled, the field named, one Warning, no worker."""
    body = qjob("badregex", quantization={"bits": 4, "dynamic": {"+:(": {"bits": 8}}})
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body
    )
    control_plane.kubectl(
        "wait", "-n", namespace, "--for=condition=Stalled", "qjob/badregex", "--timeout=60s"
    )
    job = get(api, namespace, "badregex")
    stalled = condition(job, "Stalled")
    assert job["status"]["phase"] == "Failed" and stalled["reason"] == "InvalidSpec"
    assert stalled["message"].startswith("spec.quantization.dynamic: dynamic key '+:(' is not")
    events = events_for(api, namespace, "badregex", "InvalidSpec")
    assert len(events) == 1 and events[0].type == "Warning"
    assert client.BatchV1Api(api).list_namespaced_job(namespace).items == []
