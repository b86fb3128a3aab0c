"""The package's shape: no import loop anywhere in ``unclip/`` (lazy imports inside functions included),
and no file past 400 lines."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "unclip"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """unclip module -> the unclip modules it imports anywhere in its body (``from a import b`` counts as
    ``a.b`` when ``a/b.py`` is a module, else as ``a``)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_imports_and_the_cycle_finder_finds_a_loop():
    graph = import_graph()
    assert "unclip.eval.leaderboard" in graph["unclip.eval.run"]  # a lazy import inside a function counts
    assert "unclip.registry" in graph["unclip.modules.base"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_unclip_has_no_import_loop():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_nets_and_diffusion_import_nothing_above_them():
    graph = import_graph()
    for name, imports in graph.items():
        if name.startswith(("unclip.nets", "unclip.diffusion")):
            above = {i for i in imports if not i.startswith(("unclip.nets", "unclip.diffusion"))}
            assert not above, f"{name} imports {sorted(above)}"


def test_no_file_in_unclip_exceeds_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files past {MAX_LINES} lines: {long}"


def test_data_imports_nothing_above_it():
    graph = import_graph()
    allowed = ("unclip.data", "unclip.seeding")
    for name, imports in graph.items():
        if name.startswith("unclip.data"):
            assert all(i.startswith(allowed) for i in imports), f"{name} imports {sorted(imports)}"
