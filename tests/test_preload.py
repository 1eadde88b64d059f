"""After privileges drop nothing needs an import: ``preload`` loads what a run can reach.

A run started as root whose mail user cannot read the interpreter (one installed under
root's home) can import nothing once it dropped its privileges.  The first outside attack
review (finding 10) found what preload missed: with ``[arc]``, any incoming ARC-Seal or
``verify_dkim`` raised ModuleNotFoundError('contextvars') and the message went out unsealed;
the codec raw-unicode-escape was missing, so RFC 2231 values silently stopped being decoded.

Two checks of the class: every import written inside a function of the core's run path and
of every built-in filter is loaded by ``preload`` (read from the code, so a new lazy import
cannot be forgotten); and every built-in filter and ARC run, in a process where every import
after the drop fails and is recorded (what the libraries import on their own is found there).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PLUGINS, PROJECT
from support.mailauth import signed
from support.smime_keys import pki
from support.pgp_keys import World

# Modules of the core that never run after a drop: the administrator's commands, and the
# serve master (root until it forks; its workers drop before their first message).
NOT_AFTER_THE_DROP = {"core/admin/check.py", "core/admin/explain.py", "core/serve/boot.py",
                      "core/serve/master.py", "core/serve/listener.py",
                      # a quarantine command imports its module before its session drops them
                      "core/admin/quarantine/commands.py"}


def lazy_imports(path: Path, package: str) -> set[str]:
    """What the functions of this module import: ``module`` for each imported module, and
    ``module:name`` for each name taken from one (a submodule, or an attribute)."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        depth = 0

        def visit_FunctionDef(self, node) -> None:
            self.depth += 1
            self.generic_visit(node)
            self.depth -= 1

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_Import(self, node) -> None:
            if self.depth:
                found.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node) -> None:
            if not self.depth:
                return
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}:{alias.name}" for alias in node.names)
    Visitor().visit(ast.parse(path.read_text()))
    return found


def run_path_imports() -> set[str]:
    """The lazy imports of the core on a run's way and of every built-in filter."""
    names = set()
    for path in sorted(PROJECT.glob("core/**/*.py")):
        relative = path.relative_to(PROJECT).as_posix()
        if relative not in NOT_AFTER_THE_DROP:
            folder = path.parent.relative_to(PROJECT / "core").parts
            names |= lazy_imports(path, ".".join(("ispmailgate_core", *folder)))
    for path in sorted(PROJECT.glob("filters/**/*.py")):
        folder = path.parent.relative_to(PROJECT / "filters").parts
        names |= lazy_imports(path, ".".join(("ispmailgate_filters", *folder)))
    return names


PRELOADED = r"""
import importlib, json, sys, types
from ispmailgate_core import process
from ispmailgate_filters import BUILTIN
from ispmailgate_filters.banner import Banner
from ispmailgate_filters.pgp import Pgp
from ispmailgate_filters.smime import Smime

steps = [Banner(text="x"), Pgp(uid="x"), Smime(recipient_cert="/nowhere")]
for spec in ("ispmailgate_filters.dummy:Dummy", "ispmailgate_filters.packer:Packer",
             "ispmailgate_filters.virscan:VirScan"):
    module, name = spec.split(":")
    steps.append(getattr(importlib.import_module(module), name)())
assert {type(step).__name__ for step in steps} == {spec.split(":")[1] for spec in BUILTIN.values()}
ed25519 = types.SimpleNamespace(key=types.SimpleNamespace(kind="ed25519"))
config = types.SimpleNamespace(filters={}, default_chain=steps, rules=[], sections={"arc": True, "dkim": [ed25519]})
process.preload(config)
missing = []
for name in json.loads(sys.argv[1]):
    module, _, attribute = name.partition(":")
    loaded = sys.modules.get(module)
    if loaded is None or attribute and not hasattr(loaded, attribute) and f"{module}.{attribute}" not in sys.modules:
        missing.append(name)
print(json.dumps(sorted(missing)))
"""


def test_preload_loads_every_module_the_core_and_the_built_in_filters_import_later():
    """In a fresh interpreter: after ``preload`` of every built-in filter and ARC, every
    module a function of theirs imports is loaded (and every name taken from one exists)."""
    names = sorted(run_path_imports())
    process = subprocess.run([sys.executable, "-c", PRELOADED, json.dumps(names)], capture_output=True,
                             text=True, timeout=120, check=False, cwd=PROJECT)
    assert process.returncode == 0, process.stderr
    missing = json.loads(process.stdout)
    assert missing == [], missing


NO_IMPORTS = PROJECT / "tests" / "support" / "no_imports.py"

# RFC 2231 values (decoded through raw-unicode-escape), RFC 2047 words, a charset to decode.
ATTACHED = (b"From: Author <author@sender.example>\nTo: rcpt@example.com\nSubject: =?koi8-r?b?8NLJ18XU?=\n"
            b"Date: Sun, 6 Dec 2026 10:00:00 +0000\nMIME-Version: 1.0\n"
            b'Content-Type: multipart/mixed; boundary="b1"\n\n--b1\n'
            b"Content-Type: text/plain; charset=iso-8859-15\n\nGr\xfc\xdfe\n--b1\n"
            b"Content-Type: application/octet-stream; name*=iso-8859-1''r%E9sum%E9.bin\n"
            b"Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.bin\n"
            b"Content-Transfer-Encoding: base64\n\nAAECAwQ=\n--b1--\n")


def gate_without_imports(tmp_path, rules: str, message: bytes) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The gate on ``message`` with --stdout, importing nothing after its privilege drop."""
    config, record = tmp_path / "rules.toml", tmp_path / "imports"
    (tmp_path / "spool").mkdir()
    config.write_text(f'tmp_dir = "{tmp_path / "spool"}"\nlog_file = "{tmp_path / "gate.log"}"\n'
                      f'mail_user = "root"\nloop_suffix = ""\n{rules}')
    environment = {"PYTHONPATH": f"{PLUGINS}:{PROJECT / 'tests'}", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, str(NO_IMPORTS), str(record), "-c", str(config), "--stdout",
                          "-f", "author@sender.example", "rcpt@example.com"], input=message,
                         capture_output=True, timeout=120, check=False, env=environment)
    tried = record.read_text().split() if record.exists() else []
    return run, tried


def test_arc_and_dkim_checks_need_no_import_after_the_drop(tmp_path, mailauth):
    """Finding 10: an incoming ARC set and a DKIM signature are checked, the result is sealed."""
    arc_set = (b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=relay.example; s=relay; b=AAAA\n"
               b"ARC-Message-Signature: i=1; a=rsa-sha256; c=relaxed/relaxed; d=relay.example; s=relay;"
               b" h=from; bh=AAAA; b=AAAA\nARC-Authentication-Results: i=1; mx.relay.example; dkim=pass\n")
    rules = (f'default_filter = ["b"]\n[filter.b]\ntype = "banner"\ntext = "scanned"\n'
             f'[arc]\ndomain = "{mailauth.gateway_key.domain}"\nselector = "{mailauth.gateway_key.selector}"\n'
             f'private_key_file = "{mailauth.gateway_key.path}"\nauthserv_id = "mx.example.net"\n'
             f'resolver = "{mailauth.dns.address}"\nverify_dkim = true\n')
    run, tried = gate_without_imports(tmp_path, rules, arc_set + signed(mailauth, ATTACHED))
    assert (run.returncode, tried) == (0, []), run.stderr
    assert run.stdout.startswith(b"ARC-Seal: i=2;") and b"scanned" in run.stdout, run.stdout[:300]
    assert b"dkim=pass" in run.stdout


@pytest.mark.parametrize("rules", [
    'default_filter = ["dummy"]\n',
    'default_filter = ["b"]\n[filter.b]\ntype = "banner"\nhtml = "<b>x</b>"\nsubject_prefix = "[X] "\n',
    'default_filter = ["p", "u"]\n[filter.p]\ntype = "packer"\ndirection = "pos"\n'
    '[filter.u]\ntype = "packer"\ndirection = "neg"\n',
    'default_filter = ["v"]\n[filter.v]\ntype = "virscan"\nscanner = "command"\ncommand = ["/bin/true", "{path}"]\n',
], ids=["dummy", "banner", "packer", "virscan"])
def test_each_built_in_filter_needs_no_import_after_the_drop(tmp_path, rules):
    run, tried = gate_without_imports(tmp_path, rules, ATTACHED)
    assert (run.returncode, tried) == (0, []), run.stderr
    assert b"r%C3%A9sum%C3%A9.bin" in run.stdout or "résumé".encode() in run.stdout


def test_pgp_and_smime_need_no_import_after_the_drop(tmp_path):
    world = World()
    try:
        pgp = f'default_filter = ["g"]\n[filter.g]\ntype = "pgp"\ngnupghome = "{world.sending}"\n' \
              f'direction = "pos"\nuid = "{World.B_UID}"\nsign = true\n'
        (tmp_path / "pgp").mkdir()
        run, tried = gate_without_imports(tmp_path / "pgp", pgp, ATTACHED)
        assert (run.returncode, tried) == (0, []), run.stderr
        assert b"-----BEGIN PGP MESSAGE-----" in run.stdout
    finally:
        world.close()
    keys = pki()
    smime = f'default_filter = ["s"]\n[filter.s]\ntype = "smime"\ndirection = "pos"\nsign = true\n' \
            f'recipient_cert = "{keys.gateway_b.cert}"\nkey_file = "{keys.gateway_a.key}"\n' \
            f'cert_file = "{keys.gateway_a.cert}"\n'
    (tmp_path / "smime").mkdir()
    run, tried = gate_without_imports(tmp_path / "smime", smime, ATTACHED)
    assert (run.returncode, tried) == (0, []), run.stderr
    assert b"application/pkcs7-mime" in run.stdout
