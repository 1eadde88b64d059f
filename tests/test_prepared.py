"""The parts tools/test's install step prepares: a test that finds one missing says so."""

from __future__ import annotations

import pytest

from support import prepared


@pytest.mark.parametrize("part", [prepared.wheels, prepared.e2e_gate, prepared.sendmail_binary])
def test_a_missing_part_fails_naming_the_install_step(part, tmp_path, monkeypatch):
    monkeypatch.setattr(prepared, "WHEELS", tmp_path / "no-wheels")
    monkeypatch.setattr(prepared.tempfile, "gettempdir", lambda: str(tmp_path))
    with pytest.raises(prepared.Missing, match=r"run tools/test \(its install step prepares it, before pytest\)"):
        part()


def test_the_wheels_build_this_project_with_no_index():
    args = prepared.offline("--no-deps", ".")
    assert args[:3] == ["--no-index", "--find-links", str(prepared.WHEELS)]
    assert list(prepared.WHEELS.glob("setuptools-*.whl")) and list(prepared.WHEELS.glob("typer-*.whl"))
    assert not list(prepared.WHEELS.glob("ispmailgate-*"))      # built from the checkout each time
