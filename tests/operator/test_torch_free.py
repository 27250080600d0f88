"""The operator and the serving rules import without torch: the operator image has none."""

from __future__ import annotations

import contextlib
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


def test_every_third_party_import_of_the_operator_is_a_declared_dependency():
    """The operator image installs only the base and ``operator`` dependencies: a module the
    operator's code imports from any other distribution fails there at start (it once did:
    prometheus_client came only with the worker extra)."""
    import ast
    import re
    from importlib.metadata import PackageNotFoundError, packages_distributions, requires
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[2]
    imported: set[str] = set()
    for folder in ("compat/gptq_compat", "operator/gptq_operator"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    imported -= set(sys.stdlib_module_names) | {"__future__", "gptq_compat", "gptq_operator"}

    def name(requirement: str) -> str:
        return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    allowed: set[str] = set()  # the declared dependencies and what they pull in
    todo = [name(r) for r in project["dependencies"] + project["optional-dependencies"]["operator"]]
    while todo:
        dist = todo.pop()
        if dist not in allowed:
            allowed.add(dist)
            with contextlib.suppress(PackageNotFoundError):
                todo += [name(r) for r in requires(dist) or [] if "extra ==" not in r]
    owners = packages_distributions()
    undeclared = {
        module: owners.get(module, ["(not installed)"])
        for module in imported
        if not {d.lower().replace("_", "-") for d in owners.get(module, [])} & allowed
    }
    assert not undeclared, f"imported by the operator but not in its dependencies: {undeclared}"
