"""A real clamd for the tests: private socket, private signatures, started and stopped here.

The signature database is written by the tests: EICAR (built from its parts here, never
stored as a file) as a body signature that matches anywhere, and a custom MD5 signature
of a harmless test payload.  clamd answers about 0.1 s after start with such a database.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

CLAMD = "/usr/sbin/clamd"

# EICAR's test string, assembled so that no file of this project carries it whole.
EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS" + b"-TEST-FILE!$H+H*")
EICAR_NAME = "Test.Eicar.UNOFFICIAL"
CUSTOM = b"ispmailgate custom test signature: harmless bytes a scanner must flag\n"
CUSTOM_NAME = "Test.Custom.UNOFFICIAL"


def write_database(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "test.ndb").write_text(f"Test.Eicar:0:*:{EICAR.hex()}\n")
    (directory / "test.hdb").write_text(f"{hashlib.md5(CUSTOM).hexdigest()}:{len(CUSTOM)}:Test.Custom\n")
    return directory


class ClamdProcess:
    """One clamd on a short Unix socket under /tmp (socket paths are limited to 107 bytes)."""

    def __init__(self, **settings: str) -> None:
        assert Path(CLAMD).exists(), "clamd is missing: install clamav-daemon (tools/debian-packages)"
        self.home = Path(tempfile.mkdtemp(prefix="cv", dir="/tmp"))
        self.socket = str(self.home / "s")
        self.database = write_database(self.home / "db")
        (self.home / "tmp").mkdir()
        self.log = self.home / "clamd.log"
        config = {"Foreground": "yes", "LocalSocket": self.socket, "DatabaseDirectory": str(self.database),
                  "TemporaryDirectory": str(self.home / "tmp"), "PidFile": str(self.home / "pid"),
                  "Bytecode": "no", "SelfCheck": "0", "AlertExceedsMax": "yes", "AlertEncryptedArchive": "yes",
                  "StreamMaxLength": "30M", **settings}
        self.config = self.home / "clamd.conf"
        self.config.write_text("".join(f"{key} {value}\n" for key, value in config.items()))
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> ClamdProcess:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([CLAMD, "-c", str(self.config)], stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"clamd exited at start: {self.log.read_text()[-2000:]}"
            if self.ping():
                return self
            time.sleep(0.02)
        raise AssertionError(f"clamd did not answer within {timeout} s")

    def ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as connection:
                connection.settimeout(5)
                connection.connect(self.socket)
                connection.sendall(b"zPING\0")
                return connection.recv(16) == b"PONG\0"
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture(scope="session")
def clamd():
    """A real clamd shared by the session (it only reads: one is enough)."""
    daemon = ClamdProcess().start()
    try:
        yield daemon
    finally:
        daemon.remove()


@pytest.fixture
def own_clamd():
    """A real clamd for one test that stops it (the stopped-mid-run case)."""
    daemon = ClamdProcess()
    try:
        yield daemon
    finally:
        daemon.remove()


@pytest.fixture(scope="session")
def clamscan_database():
    """The same signatures for the real clamscan (command back end)."""
    assert shutil.which("clamscan"), "clamscan is missing: install clamav (tools/debian-packages)"
    home = Path(tempfile.mkdtemp(prefix="cs", dir="/tmp"))
    try:
        yield write_database(home / "db")
    finally:
        shutil.rmtree(home, ignore_errors=True)

