"""The layout rules of docs/architecture.md, checked on the source itself.

1. Imports point down: infra -> {pipelines, training, model}; pipelines -> model; training -> model;
   model -> nothing of ours. Checked twice: statically (every import statement, those inside
   functions included) and at run time (each package imported whole in a fresh interpreter, then
   `sys.modules` read), which also catches imports made through importlib.
2. No import cycle between our modules, lazy imports included.
3. No source file over 500 lines and no function over 80, unless its first lines carry a
   `# long: <why>` comment (the sampler's loop written out in plain sight is such a case).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "pipelines", "training", "infra")
# What each package may import of ours (besides itself).
ALLOWED = {
    "model": set(),
    "pipelines": {"model"},
    "training": {"model"},
    "infra": {"model", "pipelines", "training"},
}
# Third-party packages a package must not load just by being imported, and why.
NOT_AT_IMPORT = {
    # model/ ships alone inside the MLflow pyfunc; mlflow only in model/pyfunc.py (checked below)
    "model": {"ray", "deepspeed", "pydantic", "mlflow"},
    "pipelines": {"deepspeed", "mlflow"},
    "training": set(),
    "infra": set(),
}
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
LONG_MARK = "# long:"


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` in `path` names, at any depth."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from model import storage` imports the module model.storage
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def our_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in modules(package)}


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_down(package):
    wrong = []
    for path in modules(package):
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top in PACKAGES and top != package and top not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(REPO)} imports {name}")
    assert not wrong, f"{package}/ may import only {sorted(ALLOWED[package]) or 'itself'}: " + "; ".join(wrong)


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_alone_in_a_fresh_interpreter(package):
    names = [module_name(path) for path in modules(package) if path.name != "__main__.py"]  # that one runs a command
    if package == "model":
        names.remove("model.pyfunc")  # the one module of model/ that imports mlflow, by design
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    ours = loaded & set(PACKAGES) - {package} - ALLOWED[package]
    assert not ours, f"importing {package}/ loaded {sorted(ours)}"
    heavy = loaded & NOT_AT_IMPORT[package]
    assert not heavy, f"importing {package}/ loaded {sorted(heavy)}"


def test_no_import_cycles():
    ours = our_modules()
    graph = {
        name: {dep for dep in imported_modules(path) if dep in ours and dep != name}
        for name, path in ours.items()
    }
    # A package's __init__ is imported with any of its modules; an edge to it is no real dependency.
    graph = {name: {dep for dep in deps if not name.startswith(f"{dep}.")} for name, deps in graph.items()}
    cycles = [_cycle_from(graph, name) for name in sorted(graph)]
    cycles = sorted({" -> ".join(c) for c in cycles if c})
    assert not cycles, "import cycles: " + "; ".join(cycles)


def _cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A shortest path start -> ... -> start, or None."""
    frontier, seen = [[start]], {start}
    while frontier:
        path = frontier.pop(0)
        for dep in sorted(graph[path[-1]]):
            if dep == start:
                return path + [start]
            if dep not in seen:
                seen.add(dep)
                frontier.append(path + [dep])
    return None


def _marked_long(lines: list[str], start: int) -> bool:
    """A `# long:` comment within the first lines from `start` (0-based), past any docstring."""
    return any(line.strip().startswith(LONG_MARK) for line in lines[start : start + 12])


def test_files_and_functions_stay_short():
    too_long = []
    for package in PACKAGES:
        for path in modules(package):
            source = path.read_text()
            lines = source.splitlines()
            relative = path.relative_to(REPO)
            if len(lines) > MAX_FILE_LINES and not _marked_long(lines, 0):
                too_long.append(f"{relative}: {len(lines)} lines")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES and not _marked_long(lines, node.lineno):
                        too_long.append(f"{relative}:{node.lineno} {node.name}(): {length} lines")
    assert not too_long, (
        f"over {MAX_FILE_LINES} lines per file or {MAX_FUNCTION_LINES} per function, with no `{LONG_MARK} why` "
        "comment at the top: " + "; ".join(too_long)
    )
