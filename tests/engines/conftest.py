"""The engines tier: the real vLLM (CPU build, in its own cached virtualenv) loads our
checkpoints. Outside CI the tier is skipped with instructions when the virtualenv cannot
be built; in CI it must run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TABLE: list[str] = []  # the comparison table, printed at the end of the session


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The Python of the vLLM virtualenv, built by scripts/engines_env.sh when missing."""
    script = ROOT / "scripts" / "engines_env.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=3600)
    print(done.stdout + done.stderr)
    if done.returncode != 0:
        message = f"{script} failed ({done.returncode}): {done.stderr[-2000:]}"
        if os.environ.get("CI"):
            pytest.fail(f"the engines tier must run in CI: {message}")
        pytest.skip(message + " (run scripts/engines_env.sh by hand to see why)")
    return done.stdout.strip().splitlines()[-1]


def pytest_terminal_summary(terminalreporter) -> None:
    if TABLE:
        terminalreporter.section("engines tier: vLLM 0.32.0 against our rules")
        for line in TABLE:
            terminalreporter.write_line(line)
