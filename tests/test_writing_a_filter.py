"""docs/writing-a-filter.md: the plug-in it shows, built and installed with pip from the page's
own text, found by its entry point and run by the installed ispmailgate as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import PROJECT, run_gate
from support.prepared import offline

PAGE = PROJECT / "docs" / "writing-a-filter.md"
WITH_FROM = b"From: a@example.org\nTo: b@example.com\nSubject: hello\n\nhello\n"
WITHOUT_FROM = b"To: b@example.com\nSubject: anonymous\n\nwho am I\n"


def files_of_the_page() -> dict[str, str]:
    """Each '### NAME' heading followed by a fenced block: the file NAME and its text."""
    text = PAGE.read_text()
    return dict(re.findall(r"^### (\S+)\n\n```\w*\n(.*?)^```$", text, re.M | re.S))


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The page's package, installed by pip into a folder of its own (never into this venv)."""
    files = files_of_the_page()
    assert set(files) == {"pyproject.toml", "ispmailgate_fromcheck.py"}
    source = tmp_path_factory.mktemp("ispmailgate-fromcheck")
    for name, text in files.items():
        (source / name).write_text(text)
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *offline("--no-deps", "--target", str(target), str(source))], check=True, timeout=300)
    assert list(target.glob("ispmailgate_fromcheck-1.0.dist-info/entry_points.txt"))
    return target


def test_the_page_shows_a_complete_package_registered_under_the_filter_packages_name():
    files = files_of_the_page()
    assert "[project.entry-points.ispmailgate_filters]" in files["pyproject.toml"]
    assert "from ispmailgate_filters.base import" in files["ispmailgate_fromcheck.py"]


def test_the_installed_plugin_is_found_by_its_entry_point_and_runs(plugin, config_file):
    rules = config_file('default_filter = ["checked"]\n[filter.checked]\ntype = "fromcheck"\nstamp = "X-Checked"\n')
    env = {"PYTHONPATH": str(plugin)}
    run = run_gate(["-c", str(rules), "--stdout", "-f", "a@example.org", "b@example.com"], WITH_FROM, env=env)
    assert run.code == 0, run.stderr
    stamp = re.match(rb"X-Checked: by ispmailgate, run [0-9A-F]{10}\n", run.stdout)
    assert stamp and run.stdout[stamp.end():] == WITH_FROM         # the rest byte for byte
    run = run_gate(["-c", str(rules), "--stdout", "-f", "a@example.org", "b@example.com"], WITHOUT_FROM, env=env)
    assert (run.code, run.first_line) == (69, "5.6.0 checked: no From: field (RFC 5322 3.6)")


def test_check_reads_its_options_and_refuses_a_wrong_one(plugin, config_file):
    env = {"PYTHONPATH": str(plugin)}
    good = config_file('default_filter = ["fromcheck"]\n')
    run = run_gate(["check", "--config-only", "-c", str(good)], b"", env=env)
    assert run.code == 0, run.stdout
    bad = config_file('default_filter = ["c"]\n[filter.c]\ntype = "fromcheck"\nstamp = 3\n', name="bad.toml")
    run = run_gate(["check", "--config-only", "-c", str(bad)], b"", env=env)
    assert run.code == 78
    assert f"{bad}: filter.c.stamp: expected a string, got 3" in run.stdout.decode()
