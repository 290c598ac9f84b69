"""The import direction between the repo's packages is pinned (issue 23): a table of which package may import
which, checked against every import in the code, so the layering cannot drift.

Every .py file of every package is parsed with `ast`; every import is counted wherever it stands (module
level, inside a function for a lazy import, under `if TYPE_CHECKING`), as are `importlib.import_module` /
`__import__` calls with a literal name, so a deferred import cannot slip past. docs/ARCHITECTURE.md carries
the same table; a test holds the two equal.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_CORE = ("common", "configs", "lm", "data_prep", "retriever", "knowledge_encoder", "qa")

# Who may import whom (its own modules aside), from the ground floor up; `tests` may import anything.
ALLOWED: dict[str, frozenset[str]] = {
    "common": frozenset(),
    "configs": frozenset({"common"}),
    "lm": frozenset({"common", "configs"}),
    "data_prep": frozenset({"common", "configs"}),
    "retriever": frozenset({"common", "configs", "data_prep"}),
    "knowledge_encoder": frozenset({"common", "configs", "lm"}),
    "qa": frozenset(_CORE[:-1]),
    "eval": frozenset(_CORE),
    "demo": frozenset({*_CORE, "eval"}),
    "bench": frozenset({*_CORE, "eval", "demo"}),  # it measures the demo under load (bench.demo_load)
    "app": frozenset({*_CORE, "eval", "demo"}),
}
UNRESTRICTED = {"tests"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing package
    target: str  # the imported package of ours
    where: str  # file:line
    module: str  # the dotted name as written


def our_packages() -> set[str]:
    """Top-level packages (a folder with __init__.py) and modules (app.py) of the repo."""
    found = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    return found | {p.stem for p in ROOT.glob("*.py")}


def python_files(package: str) -> list[Path]:
    single = ROOT / f"{package}.py"
    return [single] if single.is_file() else sorted((ROOT / package).rglob("*.py"))


def _literal_import_call(node: ast.Call) -> str | None:
    """`importlib.import_module("x.y")` or `__import__("x.y")` with a literal name: "x.y"."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def imported_modules(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import anywhere in the tree; relative imports stay in their
    package and are skipped."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                yield node.lineno, node.module
        elif isinstance(node, ast.Call):
            name = _literal_import_call(node)
            if name:
                yield node.lineno, name


def cross_package_imports(packages: set[str]) -> list[Import]:
    out = []
    for package in sorted(packages):
        for path in python_files(package):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for line, module in imported_modules(tree):
                target = module.split(".")[0]
                if target in packages and target != package:
                    out.append(Import(package, target, f"{path.relative_to(ROOT)}:{line}", module))
    return out


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle in a directed graph as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_package_has_a_row():
    """A new package must be placed on a floor before it can import anything."""
    missing = our_packages() - set(ALLOWED) - UNRESTRICTED
    assert not missing, f"add {sorted(missing)} to ALLOWED here and to the table in docs/ARCHITECTURE.md"
    assert set(ALLOWED) <= our_packages(), f"ALLOWED names packages that are gone: {set(ALLOWED) - our_packages()}"


def test_imports_follow_the_table():
    packages = our_packages()
    imports = cross_package_imports(packages)
    assert imports, "the walk found no imports at all: it is broken, not the code clean"
    bad = [i for i in imports if i.source not in UNRESTRICTED and i.target not in ALLOWED.get(i.source, ())]
    assert not bad, "imports against docs/ARCHITECTURE.md's floors:\n" + "\n".join(
        f"  {i.where}: {i.source} imports {i.module} ({i.source} may import: "
        f"{', '.join(sorted(ALLOWED.get(i.source, ()))) or 'nothing of ours'})" for i in bad
    )


def test_no_cycle_between_packages():
    """Neither the table nor the code lets two packages depend on each other, however indirectly."""
    assert find_cycle({p: set(deps) for p, deps in ALLOWED.items()}) is None
    actual: dict[str, set[str]] = {}
    for i in cross_package_imports(our_packages()):
        if i.source not in UNRESTRICTED:
            actual.setdefault(i.source, set()).add(i.target)
    assert (cycle := find_cycle(actual)) is None, " -> ".join(cycle)


def test_architecture_doc_carries_the_same_table():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text[text.index("## Rooms, from the ground up"):]
    documented: dict[str, frozenset[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names = [n.removesuffix("/").removesuffix(".py") for n in re.findall(r"`([^`]+)`", cells[0])]
        deps = frozenset(re.findall(r"`([^`]+)`", cells[2]))
        assert deps or cells[2] == "nothing", f"docs/ARCHITECTURE.md row {cells[0]}: list the packages by name"
        for name in names:
            documented[name] = deps
    assert documented == ALLOWED


@pytest.mark.parametrize(
    ("source", "code", "flagged"),
    [
        ("common", "from qa.system import QASystem\n", True),
        ("data_prep", "def lazy():\n    from retriever.metrics import retrieval_metrics\n", True),
        ("lm", "import importlib\nimportlib.import_module('knowledge_encoder.encoder')\n", True),
        ("qa", "from knowledge_encoder.prefix_store import prefix_dir\n", False),
        ("retriever", "from . import metrics\nimport numpy\n", False),
    ],
)
def test_the_walk_sees_module_lazy_and_dynamic_imports(source, code, flagged):
    """The checker itself: an import hidden in a function or behind importlib is still an import."""
    packages = set(ALLOWED) | UNRESTRICTED
    found = [(source, m.split(".")[0]) for _, m in imported_modules(ast.parse(code))]
    bad = [(s, t) for s, t in found if t in packages and t != s and t not in ALLOWED[s]]
    assert bool(bad) == flagged


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
