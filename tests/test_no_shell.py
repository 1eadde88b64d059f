"""No shell anywhere: every external program runs from an argv list."""

from __future__ import annotations

import ast

from conftest import PROJECT

FORBIDDEN_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"),
                   ("subprocess", "getstatusoutput"), ("os", "popen2"), ("os", "popen3")}
RUNNERS = {"run", "Popen", "call", "check_call", "check_output", "spawnl", "spawnlp", "execl", "execlp"}


def project_sources() -> list:
    skip = {".venv", ".venv-lowest", "build", "dist", ".git"}
    return [p for p in PROJECT.rglob("*.py") if not skip & set(p.relative_to(PROJECT).parts)]


def shell_uses(path) -> list[str]:
    problems = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
        owner = getattr(function.value, "id", "") if isinstance(function, ast.Attribute) else ""
        where = f"{path.relative_to(PROJECT)}:{node.lineno}"
        if (owner, name) in FORBIDDEN_CALLS:
            problems.append(f"{where}: {owner}.{name}")
        for keyword in node.keywords:
            if keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant) and
                                               keyword.value.value is False):
                problems.append(f"{where}: shell=...")
        if name in RUNNERS and node.args and is_string(node.args[0]):
            problems.append(f"{where}: {name}() with a command string")
    return problems


def is_string(node) -> bool:
    """A str literal, an f-string, or text glued to one ("ls " + x, "rm %s" % x)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    return isinstance(node, ast.BinOp) and (is_string(node.left) or is_string(node.right))


def test_no_shell_and_no_command_strings_anywhere():
    sources = project_sources()
    assert len(sources) > 10
    problems = [problem for path in sources for problem in shell_uses(path)]
    assert problems == []


def test_the_checker_would_see_them(tmp_path):
    bad = PROJECT / "tests" / "_shell_probe_tmp.py"
    bad.write_text("import os, subprocess\nos.system('ls')\nsubprocess.run('ls -l', shell=True)\n"
                   "subprocess.Popen(f'rm {x}')\nsubprocess.call('rm ' + x)\n"
                   "subprocess.run(['ls'] + args)\n")
    try:
        found = shell_uses(bad)
    finally:
        bad.unlink()
    assert len(found) == 5, found
