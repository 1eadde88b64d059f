"""What gets installed: every filter module, under this project's own import names."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import PROJECT
from prepared import offline


def test_wheel_contains_every_filter_module_and_no_bare_filters_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", *offline(str(PROJECT), "--no-deps", "-q", "-w", str(tmp_path))],
                   check=True, timeout=300)
    [wheel] = tmp_path.glob("ispmailgate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.relative_to(PROJECT / "filters").as_posix() for p in (PROJECT / "filters").rglob("*.py"))
    assert "__init__.py" in sources and "dummy.py" in sources and "smime/__init__.py" in sources
    for source in sources:
        assert f"ispmailgate_filters/{source}" in names, source
    assert "ispmailgate.py" in names
    top_level = {name.split("/", 1)[0] for name in names}
    assert not any(name == "filters" or name.startswith("filters/") for name in names)
    assert {t for t in top_level if not t.endswith(".dist-info")} <= {
        "ispmailgate.py", "ispmailgate_start.py", "ispmailgate_delivery.py", "ispmailgate_arc.py",
        "ispmailgate_filters", "ispmailgate_client.py", "ispmailgate_serve.py", "ispmailgate_admin.py"}
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ispmailgate = ispmailgate_start:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_filters_never_import_the_core():
    for source in (PROJECT / "filters").rglob("*.py"):
        text = source.read_text()
        assert "import ispmailgate\n" not in text and "from ispmailgate import" not in text, source
