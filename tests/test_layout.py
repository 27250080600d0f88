"""The package tree keeps its shape: no import circles between packages, no private names
imported across modules, and modules small enough to read (or saying why not)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "gptq_compat": ROOT / "compat" / "gptq_compat",
    "gptq_worker": ROOT / "worker" / "gptq_worker",
    "gptq_operator": ROOT / "operator" / "gptq_operator",
}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for name, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = (name, *path.relative_to(folder).with_suffix("").parts)
            out[".".join(p for p in parts if p != "__init__")] = path
    return out


def _package(module: str) -> str:
    """gptq_worker.pipeline.run -> gptq_worker.pipeline; top-level modules stand alone."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "gptq_worker" and len(parts) > 2 else module


def _imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    return [
        n
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.ImportFrom | ast.Import)
    ]


def test_no_import_circle_between_packages():
    modules = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        for node in _imports(path):
            names = (
                [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            )
            for target in names:
                if target and target in modules and _package(target) != _package(module):
                    edges[_package(module)].add(_package(target))

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    circles = sorted(p for p in list(edges) if p in reach(p))
    assert not circles, f"packages that import themselves through others: {circles}"


def test_no_private_name_imported_across_modules():
    offenders = []
    for module, path in _modules().items():
        for node in _imports(path):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gptq_"):
                offenders += [
                    f"{module} imports {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not offenders


def test_modules_are_short_or_say_why():
    long = []
    for module, path in _modules().items():
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and "longer than" not in doc:
            long.append(f"{module}: {lines} lines")
    assert not long, f"over {MAX_LINES} lines without a reason in the docstring: {long}"
