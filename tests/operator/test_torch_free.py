"""The operator and the serving rules import without torch: the operator image has none."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_operator_imports_with_torch_unimportable():
    script = textwrap.dedent(
        """
        import importlib, pkgutil, sys

        class Refuse:
            BLOCKED = ("torch", "transformers", "safetensors", "triton")

            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in self.BLOCKED:
                    raise ImportError(f"{name} is blocked: the operator must not need it")
                return None

        sys.meta_path.insert(0, Refuse())
        import gptq_compat, gptq_operator
        for package in (gptq_compat, gptq_operator):
            for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                importlib.import_module(info.name)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in Refuse.BLOCKED)
        assert not leaked, leaked
        assert "gptq_worker" not in sys.modules, "the operator imports the engine package"
        print("imported", len([m for m in sys.modules if m.startswith("gptq_")]), "modules")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "imported" in done.stdout
