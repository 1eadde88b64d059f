"""The shape of the house (issue 16): arrows point one way, and the modules stay readable.

The project's modules are read, not imported: every import statement counts, at the top,
inside a function or under TYPE_CHECKING, for an import made anywhere is an arrow a reader
has to follow.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from conftest import PROJECT

PACKAGES = {"core": "ispmailgate_core", "filters": "ispmailgate_filters"}
MAX_LINES = 500
LONGER = {"ispmailgate_filters.mime"}       # the MIME tree: one concept, kept whole


def modules() -> dict[str, Path]:
    """Import name -> source file, for the face, the two guards, the core and the filters."""
    found = {path.stem: path for path in PROJECT.glob("ispmailgate*.py")}
    for folder, package in PACKAGES.items():
        for path in (PROJECT / folder).rglob("*.py"):
            parts = [package, *path.relative_to(PROJECT / folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module, names taken from it) of every import statement, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports (a name taken from a package that is one
    of its modules counts as importing that module)."""
    known = modules()
    arrows: dict[str, set[str]] = {}
    for name, path in known.items():
        arrows[name] = set()
        for module, names in imports(name, path):
            for target in [f"{module}.{n}" for n in names] + [module]:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    arrows[name].add(target)
    return arrows


def cycles(arrows: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []
    for root in arrows:
        if root in index:
            continue
        work = [(root, iter(sorted(arrows[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, successors = work[-1]
            step = next(successors, None)
            if step is not None:
                if step not in index:
                    index[step] = low[step] = len(index)
                    stack.append(step)
                    work.append((step, iter(sorted(arrows[step]))))
                elif step in stack:
                    low[node] = min(low[node], index[step])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_import_graph_has_no_cycle():
    arrows = graph()
    assert len(arrows) > 50 and "ispmailgate_core.run" in arrows["ispmailgate"]
    assert cycles(arrows) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_arrows_point_down():
    """Filters know only their interface; the core never imports the command line, which
    hands the server what it serves."""
    for name, targets in graph().items():
        if name.startswith("ispmailgate_filters"):
            assert all(t.startswith("ispmailgate_filters") for t in targets), (name, targets)
        if name.startswith("ispmailgate_core"):
            assert "ispmailgate" not in targets, name


def test_nobody_imports_another_modules_private_names():
    known = modules()
    for name, path in known.items():
        for module, names in imports(name, path):
            if module.split(".")[0] in ("ispmailgate", "ispmailgate_start", "ispmailgate_client",
                                        *PACKAGES.values()):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                assert not private, f"{name} imports {private} from {module}"


def test_the_two_guards_load_with_the_standard_library_alone():
    """ispmailgate_start answers 75 when nothing else loads (it imports the program it guards
    inside its guard); the client imports next to nothing."""
    for name, guarded in (("ispmailgate_start", {"ispmailgate"}), ("ispmailgate_client", set())):
        tops = {module.split(".")[0] for module, _ in imports(name, PROJECT / f"{name}.py")}
        assert tops - guarded <= set(sys.stdlib_module_names), (name, tops)


def test_the_guards_copies_of_the_status_table_agree_with_it():
    import ispmailgate_client
    import ispmailgate_start
    from ispmailgate_core import rules, status

    for guard in (ispmailgate_client, ispmailgate_start):
        assert (guard.EX_TEMPFAIL, guard.LOCAL_TROUBLE) == (status.EX_TEMPFAIL, status.LOCAL_TROUBLE)
    assert ispmailgate_client.DEFAULT_CONFIG_PATH == rules.DEFAULT_CONFIG_PATH


def test_no_module_is_longer_than_a_few_hundred_lines():
    long = {name: lines for name, path in modules().items()
            if (lines := len(path.read_text().splitlines())) > MAX_LINES and name not in LONGER}
    assert long == {}, f"split these along their concepts (issue 16): {long}"
