"""LMDeploy's rules are checked from its source, not by a run: TurboMind needs CUDA. This
test fetches the LMDeploy 0.18.0 wheel from PyPI (cached) and fails when a line our rules
cite (``gptq_compat/engines/lmdeploy.py``) no longer says what the rule assumes, or when
the compiled TurboMind library targets other GPUs than the rule set lists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gptq_compat.engines.lmdeploy import LMDEPLOY_0_18, TURBOMIND

pytestmark = pytest.mark.engines
CACHE = Path(os.environ.get("GPTQ_CACHE", Path.home() / ".cache" / "gptq-operator"))


@pytest.fixture(scope="module")
def wheel() -> zipfile.ZipFile:
    folder = CACHE / "engines" / "wheels"
    found = sorted(folder.glob(f"lmdeploy-{LMDEPLOY_0_18.version}-*.whl"))
    if not found:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
             "-d", str(folder), f"lmdeploy=={LMDEPLOY_0_18.version}"],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if done.returncode != 0:
            message = f"cannot fetch the LMDeploy wheel: {done.stderr[-1500:]}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        found = sorted(folder.glob(f"lmdeploy-{LMDEPLOY_0_18.version}-*.whl"))
    return zipfile.ZipFile(found[0])


def _lines(wheel: zipfile.ZipFile, path: str) -> list[str]:
    return wheel.read(f"lmdeploy/{path}").decode().splitlines()


def test_every_rule_cites_a_file_of_the_wheel(wheel):
    names = set(wheel.namelist())
    for rule in LMDEPLOY_0_18.rules:
        path = rule.source.split(":")[0]
        assert f"lmdeploy/{path}" in names, (rule.id, path)


def test_gptq_must_be_symmetric_without_act_order(wheel):
    lines = _lines(wheel, "turbomind/converter.py")
    block = "\n".join(lines[192:195])  # converter.py:193-195
    assert "quant_method == 'gptq'" in block
    assert "not quant_config.get('desc_act', False)" in block and "'sym', True" in block


def test_gptq_group_size_is_128_only(wheel):
    lines = _lines(wheel, "turbomind/converter.py")
    assert "'gptq': frozenset({128})" in lines[99]  # converter.py:100


def test_gptq_weights_are_read_as_4_bit_with_v1_zeros(wheel):
    lines = _lines(wheel, "turbomind/weight_format.py")
    gptq = "\n".join(lines[270:303])  # weight_format.py:271-303
    assert "class GPTQFormat" in gptq and "TYPE_UINT4" in gptq
    assert "_get_u4_slices" in gptq
    assert "+1 offset" in lines[296] and lines[302].rstrip().endswith("+ 1")


def test_turbomind_is_built_for_the_gpus_the_rule_set_lists(wheel):
    name = next(n for n in wheel.namelist() if re.search(r"turbomind/_turbomind.*\.so$", n))
    targets: set[str] = set()
    with wheel.open(name) as fh:
        tail = b""
        while chunk := fh.read(1 << 24):
            targets.update(m.decode() for m in re.findall(rb"sm_(\d{2,3}a?)\b", tail + chunk))
            tail = chunk[-8:]
    listed = {"70", "75", "80", "86", "89", "90a", "100a", "120a"}
    assert listed <= targets, sorted(targets)
    assert TURBOMIND.min_sm == (7, 0) and TURBOMIND.max_sm == (12, 0)
    for target in listed:
        assert target.rstrip("a")[:-1] + "." + target.rstrip("a")[-1] in TURBOMIND.note
