"""The single-file build: tools/build-pyz makes ispmailgate.pyz, and a clean interpreter
(Debian's python3, isolated, without site-packages) runs it on real messages."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from conftest import CORPUS, PROJECT, crlf
from support.prepared import wheels

CLEAN_PYTHON = "/usr/bin/python3"
MULTI = (CORPUS / "two-images.eml").read_bytes()
SIMPLE = (CORPUS / "plain.eml").read_bytes()


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    output = tmp_path_factory.mktemp("pyz") / "ispmailgate.pyz"
    process = subprocess.run([sys.executable, str(PROJECT / "tools" / "build-pyz"), "-o", str(output),
                              "--wheels", str(wheels())],
                             capture_output=True, text=True, timeout=900, check=False)
    assert process.returncode == 0, process.stdout + process.stderr
    return output


def run_clean(argv: list[str], stdin: bytes = b"", env: dict[str, str] | None = None):
    """No venv, no site-packages, no PYTHON* variables: only the standard library and the pyz."""
    assert os.path.exists(CLEAN_PYTHON), f"{CLEAN_PYTHON} is missing"
    environment = {"PATH": "/usr/bin:/bin", **(env or {})}
    return subprocess.run(argv, input=stdin, capture_output=True, env=environment, timeout=120, check=False)


def rule_file(tmp_path, smtp_sink):
    """As conftest's config_file: tests run as root, and a run as root needs mail_user."""
    rules = tmp_path / "rules.toml"
    user = 'mail_user = "root"\n' if os.geteuid() == 0 else ""
    rules.write_text(f'tmp_dir = "{tmp_path}"\nlog_file = "{tmp_path}/gate.log"\n'
                     f'mail_host = "{smtp_sink.address}"\n{user}')
    return rules


def test_the_pyz_holds_the_program_and_pure_python_dependencies_only(pyz):
    names = zipfile.ZipFile(pyz).namelist()
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert {"__main__.py", "ispmailgate.py", "ispmailgate_core/admin/check.py", "gnupg.py"} <= set(names)
    for source in (PROJECT / "filters").rglob("*.py"):
        name = source.relative_to(PROJECT / "filters").as_posix()
        assert f"ispmailgate_filters/{name}" in names, name
    assert any(name.startswith("typer/") for name in names)
    assert not [name for name in names if name.endswith((".so", ".pyd", ".dll", ".dylib"))]
    assert "ispmailgate.pyc" in names                     # compiled in: zipimport cannot cache


def test_a_clean_interpreter_runs_it_on_a_corpus_message(pyz):
    run = run_clean([CLEAN_PYTHON, "-I", "-S", str(pyz)], SIMPLE)
    assert run.returncode == 0, run.stderr
    assert run.stdout == SIMPLE
    assert b"rule=default chain=dummy outcome=sent" in run.stderr


def test_it_delivers_by_smtp_byte_for_byte(pyz, smtp_sink, tmp_path):
    rules = rule_file(tmp_path, smtp_sink)
    run = run_clean([CLEAN_PYTHON, "-I", "-S", str(pyz), "-c", str(rules), "-f", "a@b.example",
                     "--", "c@d.example"], MULTI)
    assert run.returncode == 0, run.stderr
    [received] = smtp_sink.messages
    assert received.content == crlf(MULTI)
    assert received.rcpt_tos == ["c@d.example.ispmailgate"]


def test_it_runs_as_an_executable_with_its_admin_commands(pyz, smtp_sink, tmp_path):
    pyz.chmod(0o755)
    run = run_clean([str(pyz), "--version"])
    assert (run.returncode, run.stdout) == (0, b"ispmailgate 2.0.0\n")
    rules = rule_file(tmp_path, smtp_sink)
    run = run_clean([str(pyz), "check", "-c", str(rules)])
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout == f"{rules}: OK (0 rules, 0 named filters)\n".encode()
    run = run_clean([str(pyz), "quarantine", "list", "--json", "-c", str(rules)])     # a group loaded lazily
    assert (run.returncode, run.stdout) == (0, b"[]\n"), run.stderr


def test_smime_in_the_pyz_says_what_it_lacks(pyz, tmp_path, smtp_sink):
    """cryptography has native code, which a zipapp cannot hold: check names the missing package."""
    names = zipfile.ZipFile(pyz).namelist()
    assert "ispmailgate_filters/smime/__init__.py" in names
    assert not any(name.startswith(("cryptography/", "cffi/")) for name in names)
    rules = rule_file(tmp_path, smtp_sink)
    with open(rules, "a") as out:
        out.write('default_filter = ["s"]\n[filter.s]\ntype = "smime"\nrecipient_cert = "/nonexistent/peer.pem"\n')
    run = run_clean([CLEAN_PYTHON, "-I", "-S", str(pyz), "check", "-c", str(rules)])
    assert run.returncode == 78, run.stdout + run.stderr
    assert b"default_filter[0]: the cryptography package is missing" in run.stdout or \
        b"filter.s: the cryptography package is missing" in run.stdout, run.stdout
