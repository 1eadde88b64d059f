"""A real ``ispmailgate serve`` in a subprocess, and the real client, for the serve tests.

The tests run as root (here and in CI), so the server drops its workers to nobody/nogroup.
A worker that dropped root must still be able to read the Python it runs on; the
development venv's interpreter may live under root's 0700 home, so the server runs on
Debian's /usr/bin/python3 with this venv's packages (pure Python) added to its path --
what a production install looks like.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from conftest import PLUGINS, Run, Sink, running_sink, wait_for

CLIENT = Path(sys.executable).parent / "ispmailgate-client"
SYSTEM_PYTHON = Path("/usr/bin/python3")


def served_python(folder: Path) -> Path:
    """A venv of Debian's python whose site-packages include this venv's."""
    assert SYSTEM_PYTHON.exists(), "Debian's python3 is missing (tools/debian-packages: python3-venv)"
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    [site] = folder.glob("lib/python3*/site-packages")
    ours = sysconfig.get_paths()["purelib"]
    (site / "zz_bridge.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    return folder / "bin" / "python3"


@pytest.fixture(scope="module")
def python(tmp_path_factory) -> Path:
    return served_python(tmp_path_factory.mktemp("served-python"))


@pytest.fixture(scope="module")
def sink():
    """One SMTP sink for a module's servers (the conftest fixture is per test)."""
    with running_sink() as sink:
        yield sink


def drain(sink: Sink) -> list:
    """What the sink received since the last drain."""
    messages = list(sink.messages)
    sink.messages.clear()
    return messages


def shared_folder(prefix: str = "igs-") -> Path:
    """A short path under /tmp that the workers (nobody) can read and write."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    folder.chmod(0o777)
    atexit.register(shutil.rmtree, folder, True)      # removed when the test session ends
    return folder


def client_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISPMAILGATE_")}
    env["PYTHONPATH"] = str(PLUGINS)
    env.update(extra or {})
    return env


def run_client(socket_path: Path | str, args: list[str], stdin: bytes, *,
               env: dict[str, str] | None = None, timeout: float = 120, cwd: Path | None = None) -> Run:
    process = subprocess.run([str(CLIENT), "--socket", str(socket_path), *args], input=stdin,
                             capture_output=True, env=client_env(env), timeout=timeout, check=False,
                             cwd=cwd)
    stderr = process.stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr, stderr
    return Run(process.returncode, process.stdout, stderr)


class Server:
    """``python -m ispmailgate serve`` with its own folder, rule file, socket and log."""

    def __init__(self, python: Path, config: str, *, args: tuple[str, ...] = (),
                 user: str = "nobody", group: str = "nogroup") -> None:
        self.python = python
        self.folder = shared_folder()
        self.folder.chmod(0o755)    # root's alone: serve refuses a rule file, socket or pid file others could swap
        self.socket = self.folder / "s.sock"
        self.pidfile = self.folder / "serve.pid"
        self.config = self.folder / "rules.toml"
        self.gate_log = self.folder / "gate.log"
        self.server_log = self.folder / "server.log"
        self.spool = self.folder / "spool"
        self.spool.mkdir(mode=0o777)
        self.spool.chmod(0o777)
        self.gate_log.touch(mode=0o666)
        self.gate_log.chmod(0o666)
        self.user, self.group = user, group
        self.write_config(config)
        self.args = args
        self.process: subprocess.Popen | None = None
        self.notices: list[str] = []
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.folder / "n.sock"))

    def write_config(self, body: str) -> None:
        """The test's rules, with this server's folder, socket and user filled in."""
        body = textwrap.dedent(body)
        before, _, serve = body.partition("[serve]\n")
        if not re.search(r"^socket\s*=", serve, re.M):
            serve += f'socket = "{self.socket}"\n'
        head = f'tmp_dir = "{self.spool}"\nlog_file = "{self.gate_log}"\n'
        head += "".join(f'{key} = "{value}"\n' for key, value in
                        (("mail_user", self.user), ("mail_group", self.group))
                        if not re.search(rf"^{key}\s*=", before, re.M))
        self.config.write_text(head + before + "\n[serve]\n" + serve)

    def command(self) -> list[str]:
        return [str(self.python), "-m", "ispmailgate", "serve", "-c", str(self.config),
                "--pidfile", str(self.pidfile), *self.args]

    def env(self) -> dict[str, str]:
        env = client_env({"NOTIFY_SOCKET": str(self.folder / "n.sock")})
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        return env

    def start(self, timeout: float = 60) -> Server:
        with open(self.server_log, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env=self.env(), cwd=self.folder)
        assert self.wait_notice("READY=1", timeout), self.log()
        return self

    def wait_notice(self, state: str, timeout: float = 60) -> bool:
        """Waits for a systemd notification (sent after ``state`` was last waited for)."""
        self.notify.settimeout(0.2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = self.notify.recv(4096).decode()
            except socket.timeout:
                if self.process is not None and self.process.poll() is not None:
                    return False
                continue
            self.notices.append(message)
            if state in message.splitlines():
                return True
        return False

    def client(self, args: list[str], stdin: bytes, **kwargs) -> Run:
        return run_client(self.socket, args, stdin, **kwargs)

    def log(self) -> str:
        return self.server_log.read_text(errors="replace") if self.server_log.exists() else ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def workers(self) -> set[int]:
        """The master's children but the doorkeepers (which each log their pid as they start)."""
        return children_of(self.pid) - self.doorkeepers()

    def doorkeepers(self) -> set[int]:
        return {int(pid) for pid in re.findall(r"doorkeeper (\d+) takes connections", self.log())}

    def doorkeeper(self) -> int:
        """The doorkeeper that runs now."""
        assert wait_for(lambda: self.doorkeepers() & children_of(self.pid), 30), self.log()
        [pid] = self.doorkeepers() & children_of(self.pid)
        return pid

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 60) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.notify.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def children_of(pid: int) -> set[int]:
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.add(int(stat.parent.name))
    return children


def wait_for_workers(server: Server, count: int, exclude: set[int] = frozenset(),
                     timeout: float = 30) -> set[int]:
    # the doorkeeper logged its start first: until then it would be counted among the workers
    assert wait_for(lambda: server.doorkeepers() & children_of(server.pid)
                    and len(server.workers() - exclude) >= count, timeout), server.log()
    return server.workers()


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}
