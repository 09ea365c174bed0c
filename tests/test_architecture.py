"""The shape of the code: no import circle, and no function much over a screen without a reason."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# functions allowed past a screen, each for the reason docs/design.md ("Architecture") gives
LONG_FUNCTIONS = {"cli.py:search"}
SCREEN = 100


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The poeem modules ``path`` imports when it is imported (not inside functions, not only for
    type checking)."""
    found: set[str] = set()
    statements = list(ast.parse(path.read_text()).body)
    while statements:
        node = statements.pop()
        if isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):  # never runs
                statements += node.body + node.orelse
            continue
        if isinstance(node, ast.Try):
            statements += node.body + node.orelse + node.finalbody
            statements += [n for handler in node.handlers for n in handler.body]
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def test_the_import_graph_has_no_circle() -> None:
    paths = {module_name(p): p for p in SRC.rglob("*.py")}
    graph = {name: top_level_imports(path, set(paths)) - {name} for name, path in paths.items()}
    # a package's __init__ importing its own modules is how a package exports: not a circle
    for name in graph:
        graph[name] = {
            d for d in graph[name] if not (paths[name].name == "__init__.py" and d.startswith(name))
        }
    graph = {name: {d for d in deps if not name.startswith(d + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            assert state.get(dep) != 1, " -> ".join([*trail, name, dep])
            if dep not in state:
                visit(dep, [*trail, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_no_function_is_much_over_a_screen_without_a_reason() -> None:
    long = set()
    for path in (SRC / "poeem").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                if node.end_lineno - node.lineno + 1 > SCREEN:
                    long.add(f"{path.relative_to(SRC / 'poeem')}:{node.name}")
    assert long <= LONG_FUNCTIONS, sorted(long - LONG_FUNCTIONS)
    assert long >= LONG_FUNCTIONS, (
        f"{sorted(LONG_FUNCTIONS - long)} fit a screen now: drop them from the list"
    )
