"""Fixtures shared by every tier."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    """A real kube-apiserver, controller-manager and scheduler with kwok GPU nodes.

    Started once per test session. Without the binaries (and without Go to build them) the
    tests that use it are skipped with instructions, except in CI, where they must run.
    """
    from tests.controlplane.cluster import ControlPlane, ControlPlaneUnavailable, ensure_binaries

    try:
        ensure_binaries(build=True)
    except ControlPlaneUnavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"the control-plane tier must run in CI: {err}")
        pytest.skip(str(err))
    cp = ControlPlane(tmp_path_factory.mktemp("controlplane"))
    try:
        cp.start()
    except Exception:
        cp.stop()
        raise
    print(f"\ncontrol plane ready in {cp.startup_s:.1f}s at {cp.server}")
    yield cp
    cp.stop()
