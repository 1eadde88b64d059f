"""What gets installed: every module of the core and the filters, under this project's own import names."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import PROJECT
from support.prepared import offline


def test_wheel_contains_every_module_of_the_core_and_the_filters_and_no_bare_folder(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", *offline(str(PROJECT), "--no-deps", "-q", "-w", str(tmp_path))],
                   check=True, timeout=300)
    [wheel] = tmp_path.glob("ispmailgate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in (("core", "ispmailgate_core"), ("filters", "ispmailgate_filters")):
        sources = sorted(p.relative_to(PROJECT / folder).as_posix() for p in (PROJECT / folder).rglob("*.py"))
        assert "__init__.py" in sources and len(sources) > 10
        for source in sources:
            assert f"{package}/{source}" in names, source
    assert "ispmailgate_filters/smime/__init__.py" in names and "ispmailgate_core/delivery/smtp.py" in names
    assert "ispmailgate.py" in names
    top_level = {name.split("/", 1)[0] for name in names}
    assert not any(name.startswith(("filters/", "core/")) for name in names)
    assert {t for t in top_level if not t.endswith(".dist-info")} == {
        "ispmailgate.py", "ispmailgate_start.py", "ispmailgate_client.py", "ispmailgate_core", "ispmailgate_filters",
        "ispmailgate-2.0.0.data"}
    # ispmailgate-client: a script of its own (bin/), not a console script, so that it starts without site
    assert {n for n in names if n.startswith("ispmailgate-2.0.0.data/")} == {"ispmailgate-2.0.0.data/scripts/ispmailgate-client"}
    assert zipfile.ZipFile(wheel).read("ispmailgate-2.0.0.data/scripts/ispmailgate-client") == \
        (PROJECT / "bin" / "ispmailgate-client").read_bytes()
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ispmailgate = ispmailgate_start:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_filters_never_import_the_core():
    for source in (PROJECT / "filters").rglob("*.py"):
        text = source.read_text()
        assert "import ispmailgate\n" not in text and "from ispmailgate import" not in text, source
        assert "ispmailgate_core" not in text, source
