"""What the tests would otherwise fetch from a package registry in the middle of a run.

tools/test prepares it in its install step, before pytest starts, so that the tests run
without a network (.ci/run runs them with none).  A test that finds a part missing fails
and names that step.

    .venv/bin/python tests/support/prepared.py      # what tools/test --install-only runs last

- wheels (build/test-wheels/): setuptools and wheel, to build this project with no index,
  and wheels of its runtime dependencies, for the wheel and the zipapp the tests build;
- the end-to-end gate: a venv of Debian's /usr/bin/python3 under the temp dir with this
  checkout installed, which the unprivileged user of Postfix's pipe(8), sendmail's prog
  mailer and procmail can run (a checkout may sit under root's 0700 home);
- sendmail: Debian's sendmail-bin unpacked under the temp dir (it conflicts with postfix,
  so it is never installed), the version the installed sendmail-cf belongs to.

Between sessions the tests reinstall this checkout into the end-to-end venv when its
sources changed, from the wheels alone.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent.parent
TEST_FILTERS = PROJECT / "tests" / "plugins" / "gate_test_filters.py"
WHEELS = PROJECT / "build" / "test-wheels"
SYSTEM_PYTHON = "/usr/bin/python3"
INSTALL_STEP = "run tools/test (its install step prepares it, before pytest) or tools/test --install-only"
BUILD_REQUIREMENTS = ("setuptools>=77", "wheel")


class Missing(AssertionError):
    """A part the install step prepares is not there."""


# -- wheels -------------------------------------------------------------------------------------

def wheels() -> Path:
    """The folder of wheels for ``pip --no-index --find-links``."""
    if not any(WHEELS.glob("setuptools-*.whl")):
        raise Missing(f"no wheels in {WHEELS}: {INSTALL_STEP}")
    return WHEELS


def offline(*pip_args: str) -> list[str]:
    """pip arguments that install from the wheels alone."""
    return ["--no-index", "--find-links", str(wheels()), *pip_args]


def prepare_wheels() -> None:
    # setuptools builds in build/lib and never removes from it a module that moved away:
    # a build would still carry it (a checkout that predates a move, say).
    shutil.rmtree(PROJECT / "build" / "lib", ignore_errors=True)
    WHEELS.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(WHEELS), *BUILD_REQUIREMENTS, str(PROJECT)])
    for stale in WHEELS.glob("ispmailgate-*.whl"):      # the project is built from the checkout
        stale.unlink()


# -- the end-to-end gate ------------------------------------------------------------------------

def e2e_venv() -> Path:
    """One venv per checkout and pyproject.toml, so other checkouts never see this one's code."""
    recipe = b"venv of /usr/bin/python3, dependencies from the wheels\n"     # change it to rebuild
    key = hashlib.sha256(recipe + str(PROJECT).encode() + (PROJECT / "pyproject.toml").read_bytes())
    return Path(tempfile.gettempdir()) / f"ispmailgate-e2e-venv-{key.hexdigest()[:12]}"


def e2e_gate() -> Path:
    """``ispmailgate`` of the end-to-end venv, holding this checkout's current sources."""
    venv = e2e_venv()
    if not (venv / "ready").exists():
        raise Missing(f"the end-to-end venv {venv} is missing: {INSTALL_STEP}")
    with _locked(venv):
        stamp = _sources_stamp()
        if _read(venv / "installed") != stamp:
            _install_checkout(venv)
            (venv / "installed").write_text(stamp)
    return venv / "bin" / "ispmailgate"


def prepare_e2e_venv() -> None:
    assert os.path.exists(SYSTEM_PYTHON), f"{SYSTEM_PYTHON} is missing (Debian's python3)"
    venv = e2e_venv()
    with _locked(venv):
        if (venv / "ready").exists():
            return
        shutil.rmtree(venv, ignore_errors=True)
        _run([SYSTEM_PYTHON, "-m", "venv", str(venv)])
        _run([str(venv / "bin" / "pip"), "install", "-q", *offline(*BUILD_REQUIREMENTS, str(PROJECT))])
        _install_checkout(venv)
        (venv / "installed").write_text(_sources_stamp())
        (venv / "ready").touch()


def _install_checkout(venv: Path) -> None:
    """The project (and the test filters) as they are now: no index, no dependencies."""
    _run([str(venv / "bin" / "pip"), "install", "-q", *offline("--no-deps", "--force-reinstall", str(PROJECT))])
    site = next((venv / "lib").glob("python3*/site-packages"))
    shutil.copy(TEST_FILTERS, site / TEST_FILTERS.name)
    _readable_by_all(venv)


def _sources_stamp() -> str:
    digest = hashlib.sha256()
    sources = [PROJECT / "pyproject.toml", TEST_FILTERS,
               *sorted(PROJECT.glob("ispmailgate*.py")), *sorted((PROJECT / "core").rglob("*.py")),
               *sorted((PROJECT / "filters").rglob("*.py"))]
    for path in sources:
        digest.update(str(path.relative_to(PROJECT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _readable_by_all(top: Path) -> None:
    """Whatever the umask was, the pipe(8) user must be able to read and run the venv."""
    top.chmod(0o755)
    for root, directories, files in os.walk(top):
        for name, extra in [(d, 0o555) for d in directories] + [(f, 0o444) for f in files]:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, mode | extra | (0o111 if mode & 0o100 else 0))


# -- sendmail -----------------------------------------------------------------------------------

def sendmail_top() -> Path:
    version = installed_version("sendmail-cf")
    return Path(tempfile.gettempdir()) / f"ispmailgate-e2e-sendmail-{version.replace(':', '_')}"


def sendmail_binary() -> Path:
    """/usr/libexec/sendmail/sendmail of sendmail-bin, as the install step unpacked it."""
    top = sendmail_top()
    binary = top / "usr" / "libexec" / "sendmail" / "sendmail"
    if not (top / "ready").exists() or not binary.exists():
        raise Missing(f"sendmail-bin is not unpacked in {top}: {INSTALL_STEP}")
    missing = [line for line in _run(["ldd", str(binary)]).splitlines() if "not found" in line]
    assert not missing, f"sendmail needs libraries that are not installed (tools/debian-packages): {missing}"
    return binary


def prepare_sendmail() -> None:
    top = sendmail_top()
    with _locked(top):
        if (top / "ready").exists() and (top / "usr" / "libexec" / "sendmail" / "sendmail").exists():
            return
        shutil.rmtree(top, ignore_errors=True)
        download = Path(tempfile.mkdtemp(prefix="ism-deb-"))
        try:
            _run(["apt-get", "download", f"sendmail-bin={installed_version('sendmail-cf')}"], cwd=download)
            [deb] = download.glob("sendmail-bin_*.deb")
            _run(["dpkg-deb", "-x", str(deb), str(top)])
        finally:
            shutil.rmtree(download, ignore_errors=True)
        (top / "ready").touch()


def installed_version(package: str) -> str:
    version = _run(["dpkg-query", "-W", "-f", "${Version}", package]).strip()
    assert version, f"{package} is not installed (tools/debian-packages)"
    return version


# -- helpers ------------------------------------------------------------------------------------

class _locked:
    """Sessions of one machine prepare and update a part one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = f"{path}.lock"

    def __enter__(self) -> None:
        self.stream = open(self.path, "w")
        fcntl.flock(self.stream, fcntl.LOCK_EX)

    def __exit__(self, *exc_info) -> None:
        self.stream.close()


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _run(argv: list[str], cwd: Path | None = None, stdin: bytes = b"") -> str:
    process = subprocess.run(argv, input=stdin, capture_output=True, cwd=cwd, timeout=900, check=False)
    assert process.returncode == 0, f"{argv} failed:\n{process.stdout!r}\n{process.stderr!r}"
    return process.stdout.decode(errors="replace")


def main() -> int:
    prepare_wheels()
    prepare_e2e_venv()
    prepare_sendmail()
    print(f"prepared: wheels in {WHEELS}, {e2e_venv()}, {sendmail_top()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
