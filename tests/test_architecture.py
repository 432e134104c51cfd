"""The package's shape: no import cycle (imports inside functions included), short functions, short modules,
every config group mapped to the module the README names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "rlkd_cli"
MAX_FUNCTION_LINES = 80   # body lines, docstring not counted
MAX_MODULE_LINES = 620    # "about 600"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every rlkd_cli module ``path`` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("rlkd_cli"):
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    # a package's __init__ is imported with any of its modules: importing a.b imports a
    for name in list(graph):
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 20
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_models_depends_on_nothing_else_and_the_engine_on_no_teacher_or_command():
    graph = _graph()
    assert graph["rlkd_cli.models"] <= {"rlkd_cli.errors"}
    engine = {t for m, deps in graph.items() if m.startswith("rlkd_cli.engine") for t in deps}
    assert not {t for t in engine if t.startswith(("rlkd_cli.teachers", "rlkd_cli.commands", "rlkd_cli.cli",
                                                     "rlkd_cli.hydra_run"))}, engine


def _long_functions() -> list[str]:
    out = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                        and isinstance(body[0].value.value, str):
                    body = body[1:]
                if not body:
                    continue
                lines = body[-1].end_lineno - body[0].lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_over_80_lines():
    assert _long_functions() == []


def test_no_module_over_about_600_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_readme_maps_every_config_group_to_an_existing_module():
    readme = (REPO / "README.md").read_text()
    groups = {p.name for p in (REPO / "conf").iterdir() if p.is_dir()}
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| ([^|]+) \|", readme, re.M)}
    assert groups <= set(rows), groups - set(rows)
    for group in groups - {"experiment"}:  # experiment/ holds presets of the other groups
        module = re.findall(r"`([\w/.]+\.py|[\w/]+/)`", rows[group])[0]
        assert (PACKAGE / module).exists(), (group, module)


def test_docs_name_only_files_that_exist():
    """Every repository path the README and docs/ name in backticks (rlkd_cli/, conf/, bench/, tests/, docs/) exists."""
    missing = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "RESULTS.md"]:
        for path in re.findall(r"`((?:rlkd_cli|conf|bench|tests|docs)/[\w./-]*)`", doc.read_text()):
            if "<" not in path and not (REPO / path.rstrip("/")).exists():
                missing.append(f"{doc.relative_to(REPO)}: {path}")
    assert missing == []
