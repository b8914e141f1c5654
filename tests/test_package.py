"""The package's shape, read from its source (ast and text only, nothing imported): no import
cycle between its modules, no module over the size budget, no `noqa: F401` re-export lists, no
private name used across subpackages; and tests share code only through tests/helpers/.

Import edges. `import a.b` and `from a.b import c` add an edge to module `a.b`, or to `a.b.c` when
that is a module; relative imports are resolved against the importing module's package. Importing
`a.b` also runs `a/__init__.py`, but that edge is left out: the top-level `__init__` maps its public
names to modules lazily (`import_module` by string, not visible here), and parent packages are
initialised before their children anyway. Imports under `if TYPE_CHECKING:` are left out (never
run). Two graphs are checked:
- module level: what runs when a module is imported (top level, `if` / `try` / class bodies);
  a cycle here is an import-order failure waiting to happen, and always fails the test;
- every import, also those inside functions: a function-level import still makes the importing
  layer depend on the imported one, and deferring an import is the usual way a layering cycle is
  hidden (the issue's `analysis -> conversion -> checkpointing -> conversion`). This fails too.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "megatron_hdpissa"
MAX_MODULE_LINES = 350


# ---- reading the package ----------------------------------------------------------------------
def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_package(root: Path = ROOT, package: str = PACKAGE) -> dict[str, tuple[Path, ast.Module]]:
    """{module name: (path, parsed source)} of every .py file under root/package."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        modules[module_name(path, root)] = (path, ast.parse(path.read_text(), filename=str(path)))
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_nodes(tree: ast.Module, module_level_only: bool):
    """(node) for each Import / ImportFrom, skipping `if TYPE_CHECKING:` bodies, and function
    bodies when `module_level_only`."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        todo.extend(ast.iter_child_nodes(node))


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (its `from` part)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def imported(module: str, path: Path, node, modules: dict) -> list[tuple[ast.alias, str, str | None]]:
    """(alias, target module, imported name or None) for each name the node imports from the
    package; the name is None where a module itself is imported."""
    if isinstance(node, ast.Import):
        return [(alias, alias.name, None) for alias in node.names
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + ".")]
    base = _base(module, path.name == "__init__.py", node)
    if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
        return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append((alias, sub, None) if sub in modules else (alias, base, alias.name))
    return out


def import_graph(modules: dict, module_level_only: bool) -> dict[str, set[str]]:
    graph = {name: set() for name in modules}
    for name, (path, tree) in modules.items():
        for node in import_nodes(tree, module_level_only):
            for _, target, _ in imported(name, path, node, modules):
                if target in modules:
                    graph[name].add(target)
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Modules reachable from `start` by one edge or more."""
    seen, todo = set(), list(graph[start])
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return seen


def _shortest_cycle(graph: dict[str, set[str]], start: str) -> list[str]:
    """start -> ... -> start, fewest edges (breadth first)."""
    previous, frontier = {}, [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return path[::-1] + [start]
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    raise ValueError(f"no cycle through {start}")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle per group of modules that import each other (strongly connected
    component), starting at the group's first module by name."""
    reach = {node: _reachable(graph, node) for node in graph}
    cycles, done = [], set()
    for node in sorted(graph):
        if node in done or node not in reach[node]:
            continue
        done |= {other for other in reach[node] if node in reach[other]}
        cycles.append(_shortest_cycle(graph, node))
    return cycles


def _describe(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(c) for c in cycles)


# ---- the checks -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def modules():
    return read_package()


def test_graph_reader_sees_every_kind_of_import(tmp_path):
    """A small package on disk: absolute, relative (`.`, `..`, `from . import mod`), function-level
    and TYPE_CHECKING imports resolve to the right edges, and the cycle is named."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from megatron_hdpissa.sub import b\n",
        "sub/__init__.py": "from .c import C\n",
        "sub/b.py": "import megatron_hdpissa.d\ndef f():\n    from ..a import x\n",
        "sub/c.py": "from .. import d\nif TYPE_CHECKING:\n    from megatron_hdpissa.sub import b\n",
        "d.py": "class K:\n    from megatron_hdpissa.sub.c import C\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    mods = read_package(tmp_path)
    a, b, c, d, sub = (f"{PACKAGE}.{m}" for m in ("a", "sub.b", "sub.c", "d", "sub"))
    module_level = import_graph(mods, module_level_only=True)
    assert module_level == {PACKAGE: set(), a: {b}, sub: {c}, b: {d}, c: {d}, d: {c}}
    assert find_cycles(module_level) == [[d, c, d]]
    every = import_graph(mods, module_level_only=False)
    assert every == {**module_level, b: {a, d}}
    assert find_cycles(every) == [[a, b, a], [d, c, d]]
    assert find_cycles({"x": {"x"}, "y": set()}) == [["x", "x"]]


def test_no_import_cycle_at_module_level(modules):
    cycles = find_cycles(import_graph(modules, module_level_only=True))
    assert not cycles, f"import cycles (module level):\n{_describe(cycles)}"


def test_no_import_cycle_counting_function_level_imports(modules):
    cycles = find_cycles(import_graph(modules, module_level_only=False))
    assert not cycles, f"import cycles (counting imports inside functions):\n{_describe(cycles)}"


def test_no_module_over_the_line_budget(modules):
    over = {str(path.relative_to(ROOT)): n for path, _ in modules.values()
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}"


def test_no_reexport_lists(modules):
    """Names are imported from the module that defines them; `noqa: F401` marks a name imported
    only to be re-exported."""
    found = [f"{path.relative_to(ROOT)}:{i}" for path, _ in modules.values()
             for i, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"noqa:.*F401", line)]
    assert not found, f"re-export imports (noqa: F401): {found}"


def _subpackage(module: str) -> str:
    """megatron_hdpissa.<subpackage>...; top-level modules form a group of their own."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else ""


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses_across_subpackages(modules: dict) -> list[str]:
    """`from <other subpackage> import _x`, an import of a `_module` of another subpackage, and
    `mod._x` where `mod` names a module of another subpackage."""
    found = []
    for name, (path, tree) in modules.items():
        where = f"{path.relative_to(ROOT)}"
        module_aliases = {}
        for node in import_nodes(tree, module_level_only=False):
            for alias, target, item in imported(name, path, node, modules):
                if item is None and target in modules and (alias.asname or isinstance(node, ast.ImportFrom)):
                    module_aliases[alias.asname or alias.name] = target
                if _subpackage(target) == _subpackage(name):
                    continue
                private = [p for p in target.split(".") if _is_private(p)]
                if item is not None and _is_private(item):
                    private.append(item)
                if private:
                    found.append(f"{where}:{node.lineno} imports {target}{'.' + item if item else ''}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _is_private(node.attr) and isinstance(node.value, ast.Name)
                    and (target := module_aliases.get(node.value.id))
                    and _subpackage(target) != _subpackage(name)):
                found.append(f"{where}:{node.lineno} uses {target}.{node.attr}")
    return sorted(set(found))


def test_no_private_names_across_subpackages(modules):
    found = private_uses_across_subpackages(modules)
    assert not found, "private names used from another subpackage:\n" + "\n".join(found)


def test_tests_share_code_only_through_helpers():
    """A test module imports shared code from tests/helpers/, never from another test module or
    from conftest.py (which holds fixtures only)."""
    imports = re.compile(r"^[ \t]*(?:from\s+(\.+\w*|tests\b[\w.]*)\s+import|import\s+(tests\b[\w.]*))", re.M)
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        text = path.read_text()
        for match in imports.finditer(text):
            name = match.group(1) or match.group(2)
            if not name.startswith("tests.helpers"):
                found.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1} imports {name}")
    assert not found, "\n".join(found)
