"""The package's shape (issue 26): no import cycle inside mtp_jax/, no function over 120 lines, no module
over 450. Read from the source with `ast`, as the tree is: nothing is imported."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mtp_jax"
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 120, 450
# modules not held to the limits (none: the decoding modules are checked in mtp_jax/decoding/)
NOT_YET: set[str] = set()


def modules() -> dict[str, Path]:
    """{dotted name: file} of every module of mtp_jax (a package as its __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def top_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The mtp_jax modules that importing `name` runs: its module-level imports (also under a top-level
    `if`/`try`, not inside functions or classes), with the packages above each imported module that are
    not packages above `name` itself (those are initialised already when `name` runs)."""
    is_package = path.name == "__init__.py"
    targets = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module
                targets.add(mod)
                targets.update(f"{mod}.{alias.name}" for alias in node.names)
            elif isinstance(node, (ast.If, ast.Try)):
                for block in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", []),
                              *[h.body for h in getattr(node, "handlers", [])]):
                    visit(block)

    visit(ast.parse(path.read_text()).body)
    own_parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    edges = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod in known and mod != name and (i == len(parts) or mod not in own_parents):
                edges.add(mod)
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def dfs(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_mtp_jax():
    mods = modules()
    graph = {name: top_level_imports(name, path, set(mods)) for name, path in mods.items()}
    assert graph["mtp_jax.train.loop"] >= {"mtp_jax.checkpoints", "mtp_jax.train.step"}, "the import graph reads nothing"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def too_long() -> list[str]:
    """Every function over MAX_FUNCTION_LINES lines and every module over MAX_MODULE_LINES, as 'path: what'."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE.parent))
        if rel in NOT_YET:
            continue
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            out.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(f"{rel}:{node.lineno}: {node.name} has {lines} lines")
    return out


def test_no_long_function_or_module():
    assert too_long() == [], "over the limits:\n" + "\n".join(too_long())
