"""The package's shape: no import cycles, light settings, commands that do not import cli.py."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "stream_ser"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under `if TYPE_CHECKING:` (imports for the type checker only)."""
    nodes: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return nodes


def imports(path: Path) -> set[str]:
    """The stream_ser modules a file imports at run time anywhere (top level or inside
    functions); `from package import module` counts as the module."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in MODULES else node.module)
    return {name for name in found if name in MODULES}


GRAPH = {name: imports(path) - {name} for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:  # noqa: C901 (Tarjan, one piece)
    """Every strongly connected set of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def reachable(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in GRAPH[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    typing_only = "if TYPE_CHECKING:\n    import json\nimport os\n"
    names = {n.names[0].name for n in _runtime_nodes(ast.parse(typing_only))
             if isinstance(n, ast.Import)}  # fmt: skip
    assert names == {"os"}


def test_no_import_cycles_among_stream_ser_modules() -> None:
    assert len(MODULES) > 30  # the parser did find the package
    assert "stream_ser.pipeline" in GRAPH["stream_ser.app"]
    assert cycles(GRAPH) == []


def test_no_command_imports_the_cli() -> None:
    importers = {name for name, targets in GRAPH.items() if "stream_ser.cli" in targets}
    assert importers == {"stream_ser.__main__"}


def test_settings_and_send_stay_off_the_stages() -> None:
    stages = {"stream_ser.pipeline", "stream_ser.stages", "stream_ser.acoustics",
              "stream_ser.alm", "stream_ser.specialist", "stream_ser.fusion"}  # fmt: skip
    assert not reachable("stream_ser.settings") & stages
    assert "stream_ser.pipeline" not in reachable("stream_ser.send")


def test_importing_the_vad_loads_few_modules() -> None:
    code = (
        "import sys, json; import stream_ser.vad; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('stream_ser'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    loaded = set(json.loads(out))
    assert loaded <= {
        "stream_ser", "stream_ser.errors", "stream_ser.events", "stream_ser.kinds",
        "stream_ser.options", "stream_ser.settings", "stream_ser.vad", "stream_ser.vad_backends",
        "stream_ser.web", "stream_ser.web.options",  # the [http] settings: plain values
    }, loaded  # fmt: skip
