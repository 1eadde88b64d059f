"""Shared fixtures: a real SMTP server on loopback, the corpus, and ways to run the gate."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
CORPUS = HERE / "corpus"          # messages written for these tests: see corpus/README.md
# The test filters are loaded by name (gate_test_filters:Stamp) as any plug-in is: from
# Python's path, in this process and in every gate a test starts (PYTHONPATH).
PLUGINS = HERE / "plugins"
sys.path.insert(0, str(PLUGINS))
GATE = Path(sys.executable).parent / "ispmailgate"


# -- nothing outside the checkout ------------------------------------------------------------
# The tests read what the repository holds, never a folder beside it (a clone on another
# machine has none).  Besides the checkout, a test may open files in the temporary
# directory, in the system's own trees and in Python's installation; an existing file
# anywhere else, or a new one written there, fails the open and the session.  (.ci/run also
# runs the suite from a fresh clone whose parent folder is empty.)

class OutsideTheCheckout(AssertionError):
    """Not an OSError: code that tolerates a missing file must not tolerate this."""


SYSTEM_TREES = ("/usr", "/etc", "/proc", "/sys", "/dev", "/run", "/var", "/lib", "/lib32", "/lib64",
                "/bin", "/sbin", "/tmp")
ALLOWED = tuple({os.path.realpath(p) for p in (PROJECT, tempfile.gettempdir(), *SYSTEM_TREES, sys.prefix,
                                               sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)})
OUTSIDE: list[str] = []


def outside_the_checkout(path: str, writing: bool) -> bool:
    real = os.path.realpath(path)
    if any(real == top or real.startswith(top.rstrip("/") + "/") for top in ALLOWED):
        return False
    return os.path.exists(real) or writing and os.path.isdir(os.path.dirname(real))


def _audit_open(event: str, args: tuple) -> None:
    if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path, mode, flags = os.fsdecode(args[0]), args[1] or "", args[2] or 0
    writing = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
    if outside_the_checkout(path, bool(writing)):
        OUTSIDE.append(path)
        raise OutsideTheCheckout(f"a test opened {path}, outside the checkout {PROJECT}: tests use "
                                 "only what the repository holds (messages: tests/corpus/)")


sys.addaudithook(_audit_open)


def pytest_sessionfinish(session, exitstatus) -> None:
    if OUTSIDE:     # even where the error was caught and swallowed
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    if OUTSIDE:
        terminalreporter.section("files outside the checkout", red=True)
        for path in sorted(set(OUTSIDE)):
            terminalreporter.write_line(path)


def corpus_messages() -> list[Path]:
    """Every corpus message; a missing corpus is a failure, never a silent skip."""
    messages = sorted(CORPUS.glob("*.eml"))
    assert messages, f"the test corpus is missing: {CORPUS}"
    return messages


def without_from_line(data: bytes) -> bytes:
    return data[data.index(b"\n") + 1:] if data.startswith(b"From ") else data


def crlf(data: bytes) -> bytes:
    """What a message looks like on the SMTP wire (before dot-stuffing)."""
    import re
    data = re.sub(rb"(?<!\r)\n", b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- the SMTP next hop --------------------------------------------------------------------

@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]


@dataclass
class SinkHandler:
    """An aiosmtpd handler that records envelopes and answers as a test tells it to.

    ``rcpt_replies`` maps an address (as sent, suffix included) to a reply; ``data_reply``
    answers the end of DATA; ``drop_in_data`` closes the connection in the middle of DATA;
    ``delay`` stalls before answering DATA; ``max_size`` refuses larger messages as a size
    limit would.
    """
    messages: list[Received] = field(default_factory=list)
    mail_reply: str | None = None
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    drop_in_data: bool = False
    delay: float = 0.0
    max_size: int = 0           # a message larger than this gets too_big (0: no limit)
    too_big: str = "552 5.3.4 message size exceeds fixed limit"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.drop_in_data:
            server.transport.close()
            return "421 4.3.0 dropped"
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.data_reply:
            return self.data_reply
        if self.max_size and len(envelope.original_content) > self.max_size:
            return self.too_big
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content, list(envelope.mail_options)))
        return "250 2.0.0 queued"


class Sink:
    def __init__(self, handler: SinkHandler, port: int) -> None:
        self.handler, self.port = handler, port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages


@contextlib.contextmanager
def running_sink():
    """A real SMTP server (aiosmtpd) on a fresh loopback port, stopped afterwards."""
    from aiosmtpd.controller import Controller

    handler = SinkHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, decode_data=False,
                            enable_SMTPUTF8=True, data_size_limit=0)
    controller.start()
    try:
        yield Sink(handler, port)
    finally:
        controller.stop()


@pytest.fixture
def smtp_sink():
    with running_sink() as sink:
        yield sink


@pytest.fixture
def silent_port():
    """A port that accepts connections and never says a word (a hung next hop)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    server.close()


# -- running the gate -----------------------------------------------------------------------

@dataclass
class Run:
    code: int
    stdout: bytes
    stderr: str

    @property
    def first_line(self) -> str:
        return self.stderr.splitlines()[0] if self.stderr else ""


def run_gate(args: list[str], stdin: bytes, *, env: dict[str, str] | None = None,
             timeout: float = 60, cwd: Path | None = None) -> Run:
    """The installed ``ispmailgate`` as an MTA runs it: a process, argv, stdin, exit status."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ISPMAILGATE_")}
    environment["PYTHONPATH"] = str(PLUGINS)
    environment.update(env or {})
    process = subprocess.run([str(GATE), *args], input=stdin, capture_output=True,
                             env=environment, timeout=timeout, check=False, cwd=cwd)
    stderr = process.stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr, stderr
    return Run(process.returncode, process.stdout, stderr)


def run_inline(args: list[str], stdin: bytes) -> Run:
    """The same, in this process (fast, and lets a test reach into the run)."""
    import ispmailgate
    from ispmailgate_core.run import Streams

    stdout, stderr = io.BytesIO(), io.StringIO()
    code = ispmailgate.run(args, Streams(io.BytesIO(stdin), stdout, stderr))
    assert "Traceback" not in stderr.getvalue(), stderr.getvalue()
    return Run(code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture
def config_file(tmp_path):
    """Write a rule file: ``config_file('''toml''')`` -> its path (tmp_dir and log set)."""
    def write(text: str = "", *, name: str = "ispmailgate.toml") -> Path:
        work = tmp_path / "spool"
        work.mkdir(exist_ok=True)
        path = tmp_path / name
        body = textwrap.dedent(text)
        head = ""
        if "tmp_dir" not in body.split("[", 1)[0]:
            head += f'tmp_dir = "{work}"\n'
        if "log_file" not in body.split("[", 1)[0]:
            head += f'log_file = "{tmp_path / "gate.log"}"\n'
        if "mail_user" not in body.split("[", 1)[0] and os.geteuid() == 0:
            # the tests run in-process as root; dropping privileges has tests of its own
            head += 'mail_user = "root"\n'
        path.write_text(head + body)
        return path
    return write


@pytest.fixture
def recorder(tmp_path):
    """A real sendmail-compatible executable that records argv and stdin, exits as told."""
    def make(exit_code: int = 0, name: str = "sendmail") -> tuple[Path, Path]:
        log = tmp_path / f"{name}.calls"
        script = tmp_path / name
        script.write_text(textwrap.dedent(f"""\
            #!{sys.executable}
            import json, sys
            data = sys.stdin.buffer.read()
            with open({str(log)!r}, "a") as out:
                out.write(json.dumps({{"argv": sys.argv[1:], "data": data.decode("latin-1")}}) + "\\n")
            sys.stderr.write("recorder exits {exit_code}\\n")
            sys.exit({exit_code})
            """))
        script.chmod(0o755)
        return script, log
    return make


@pytest.fixture
def infected_scanner(tmp_path):
    """A virscan command scanner that finds a virus in every object (no clamd needed)."""
    script = tmp_path / "scanner"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        for path in sys.argv[1:]:
            print(f"{{path}}: Test.Virus FOUND")
        sys.exit(1)
        """))
    script.chmod(0o755)
    return script


def recorded_calls(log: Path) -> list[dict]:
    import json
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def config_error(text: str, folder: Path):
    """The ConfigError that loading the rule file ``text`` raises (fails if it loads)."""
    from ispmailgate_core import rules
    from ispmailgate_filters.base import ConfigError

    path = folder / "rules.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        rules.load_config(path)
    return caught.value


def assert_documented(filter_class) -> None:
    """Every option has the one line of documentation the man page is made from, and its
    entry in ispmailgate.toml(5) under ".SS <type name>" of the built-in filters."""
    page = (PROJECT / "man" / "ispmailgate.toml.5").read_text()
    section = page.split(f"\n.SS {filter_class.name}\n", 1)[1].split("\n.SS ")[0]
    for name, spec in filter_class.options().items():
        doc = spec.metadata["doc"]
        assert doc and "\n" not in doc and len(doc) < 300, name
        assert f"\\fB{name.replace('-', chr(92) + '-')}\\fR = " in section, name


@pytest.fixture(scope="session")
def gate_executable() -> Path:
    assert GATE.exists(), f"ispmailgate is not installed in this environment ({GATE})"
    assert shutil.which(str(GATE))
    return GATE


# -- ClamAV ----------------------------------------------------------------------------------

from support.clamav import clamd, clamscan_database, own_clamd  # noqa: E402,F401  (fixtures)
from support.mailauth import mailauth  # noqa: E402,F401  (fixture)


@pytest.fixture
def parser_gives_up(monkeypatch):
    """The parser gives up on every message, as it would on a bug of its own."""
    from ispmailgate_filters.mime import ParseError

    def give_up(self, source, depth):
        raise ParseError("the test parser gives up")
    monkeypatch.setattr("ispmailgate_filters.mime._Parser.parse_all", give_up)
