"""Virus scanner back ends: clamd over its socket, or any scanner run from an argv list.

A back end turns a stream of :class:`~ispmailgate_filters.virscan.archives.Item` into findings.
Only an answer that is exactly "clean" or exactly "found" counts; everything else (no
connection, a timeout, an error line, output nobody can read) raises
:class:`ScannerError`, and the filter then defers the message: a scanner fault is never
reported as clean.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .archives import Item
from ..base import parse_size, printable

INFECTED, UNSCANNABLE = "infected", "unscannable"

# clamd with AlertExceedsMax reports its own skipped limits as a "virus" of this family:
# the object was not looked at, which is not the same as infected.
LIMIT_SIGNATURE = "Heuristics.Limits.Exceeded"
# The same with AlertEncrypted(Archive): clamd could not look inside.
ENCRYPTED_SIGNATURE = "Heuristics.Encrypted."


_TOO_LONG = "larger than clamd's StreamMaxLength"


class ScannerError(Exception):
    """The scanner gave no usable answer: down, timed out, or answering nonsense."""


@dataclass(frozen=True)
class Finding:
    """Something wrong with one scanned object: a virus name or why it was not scanned."""
    label: str
    verdict: str        # INFECTED or UNSCANNABLE
    detail: str


def found(label: str, name: str) -> Finding:
    name = printable(name.strip(), 120) or "unknown virus"
    if name.startswith(LIMIT_SIGNATURE):
        return Finding(label, UNSCANNABLE, f"scanner limit reached ({name})")
    if name.startswith(ENCRYPTED_SIGNATURE):
        return Finding(label, UNSCANNABLE, f"encrypted, the scanner cannot look inside ({name})")
    return Finding(label, INFECTED, name)


# -- clamd ----------------------------------------------------------------------------------

class Clamd:
    """clamd's zINSTREAM protocol over a Unix socket (a path) or TCP (``host:port``)."""

    CHUNK = 256 * 1024
    MAX_REPLY = 4096

    def __init__(self, address: str, *, tcp: bool, timeout: float, max_stream: int) -> None:
        self.address, self.tcp = address, tcp
        self.timeout, self.max_stream = timeout, max_stream

    def __str__(self) -> str:
        return f"clamd at {self.address}"

    def scan(self, items: Iterable[Item]) -> Iterator[Finding]:
        for item in items:
            if len(item.data) > self.max_stream:
                if not item.extra:      # an extra view of bytes scanned as well in parts
                    yield Finding(item.label, UNSCANNABLE, f"larger than max_stream ({self.max_stream} bytes)")
                continue
            finding = self._judge(item.label, self.instream(item.data))
            if finding is not None and not (item.extra and finding.detail == _TOO_LONG):
                yield finding

    def _judge(self, label: str, reply: str) -> Finding | None:
        if reply == "stream: OK":
            return None
        match = re.fullmatch(r"stream: (.+) FOUND", reply)
        if match:
            return found(label, match.group(1))
        if reply == "INSTREAM size limit exceeded. ERROR":
            return Finding(label, UNSCANNABLE, _TOO_LONG)
        raise ScannerError(f"{self} answered {printable(reply, 120)!r}")

    def instream(self, data: bytes) -> str:
        """Send one object, return clamd's reply line."""
        with self._connect() as connection:
            try:
                connection.sendall(b"zINSTREAM\0")
                view = memoryview(data)
                for start in range(0, len(view), self.CHUNK):
                    chunk = view[start:start + self.CHUNK]
                    connection.sendall(len(chunk).to_bytes(4, "big") + chunk)
                connection.sendall(b"\0\0\0\0")
            except (BrokenPipeError, ConnectionResetError):
                pass        # clamd hangs up past StreamMaxLength: its reply says so
            except OSError as error:
                raise ScannerError(f"{self}: {_reason(error)} while sending") from None
            return self._reply(connection)

    def command(self, name: str) -> str:
        """A short command such as PING or VERSION."""
        with self._connect() as connection:
            try:
                connection.sendall(b"z" + name.encode("ascii") + b"\0")
            except OSError as error:
                raise ScannerError(f"{self}: {_reason(error)}") from None
            return self._reply(connection)

    def problems(self, config: str, whole: tuple[str, ...] = ()) -> list[str]:
        """For ``ispmailgate check``: is clamd there, and does its configuration fit?

        ``whole``: the archive kinds clamd gets whole and unpacks itself.
        """
        trouble = []
        try:
            if self.command("PING") != "PONG":
                trouble.append(f"{self} does not answer PING with PONG")
        except ScannerError as error:
            trouble.append(str(error))
        settings = _clamd_settings(config) if config else {}
        if settings and not _on(settings, "alertexceedsmax"):
            trouble.append(f"{config}: AlertExceedsMax is off: clamd reports objects past its limits "
                         "as clean; set 'AlertExceedsMax yes'")
        encrypted = _on(settings, "alertencryptedarchive") or _on(settings, "alertencrypted")
        if settings and whole and not encrypted:
            trouble.append(f"{config}: AlertEncryptedArchive is off: clamd reports an encrypted archive "
                           f"inside a {' or '.join(whole)} as clean; set 'AlertEncryptedArchive yes'")
        stream = settings.get("streammaxlength", "")
        if _size(stream) < self.max_stream:
            trouble.append(f"max_stream ({self.max_stream}) is above clamd's StreamMaxLength ({stream})")
        return trouble

    def _connect(self):
        import socket

        try:
            if self.tcp:
                host, _, port = self.address.rpartition(":")
                return socket.create_connection((host.strip("[]"), int(port)), timeout=self.timeout)
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            connection.settimeout(self.timeout)
            try:
                connection.connect(self.address)
            except BaseException:
                connection.close()
                raise
            return connection
        except OSError as error:
            raise ScannerError(f"cannot connect to {self}: {_reason(error)}") from None

    def _reply(self, connection) -> str:
        reply = b""
        try:
            while not reply.endswith(b"\0") and len(reply) < self.MAX_REPLY:
                chunk = connection.recv(self.MAX_REPLY)
                if not chunk:
                    break
                reply += chunk
        except OSError as error:
            raise ScannerError(f"{self}: {_reason(error)} waiting for the answer") from None
        if not reply.endswith(b"\0"):
            raise ScannerError(f"{self} closed the connection without a complete answer")
        return reply[:-1].decode("utf-8", "replace").strip()


def _clamd_settings(path: str) -> dict[str, str]:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return {}
    pairs = (line.split(None, 1) for line in lines if line.strip() and not line.lstrip().startswith("#"))
    return {pair[0].lower(): pair[1].strip() for pair in pairs if len(pair) == 2}


def _on(settings: dict[str, str], name: str) -> bool:
    return settings.get(name, "no").lower() in ("yes", "true")


def _size(value: str) -> float:
    try:
        return parse_size(value)
    except ValueError:
        return float("inf")     # unset or unreadable: nothing to compare


def _reason(error: OSError) -> str:
    import socket

    if isinstance(error, socket.timeout):
        return "timed out"
    return error.strerror or type(error).__name__


# -- any scanner, run from an argv list ----------------------------------------------------------

class Command:
    """A scanner program: ``{path}`` runs it once per object, ``{paths}`` once per batch.

    Objects are written under generated names into a private directory (0700, files
    0600).  The exit status decides (clean, infected, anything else an error); the virus
    names come from ``pattern`` (groups ``name`` and optionally ``path``).
    """

    BATCH = 100

    def __init__(self, argv: tuple[str, ...], *, clean_codes: tuple[int, ...],
                 infected_codes: tuple[int, ...], pattern: str, timeout: float,
                 directory: Callable[[], Path]) -> None:
        self.argv, self.clean_codes, self.infected_codes = argv, clean_codes, infected_codes
        self.pattern = re.compile(pattern, re.MULTILINE)
        self.timeout, self.directory = timeout, directory
        self.per_object = "{paths}" not in argv
        self.count = 0

    def __str__(self) -> str:
        return f"scanner {self.argv[0]}"

    def scan(self, items: Iterable[Item]) -> Iterator[Finding]:
        batch: dict[str, str] = {}
        for item in items:
            batch[self._store(item.data)] = item.label
            if self.per_object or len(batch) >= self.BATCH:
                yield from self._run(batch)
                batch = {}
        if batch:
            yield from self._run(batch)

    def _store(self, data: bytes) -> str:
        folder = self.directory() / "scan"
        self.count += 1
        path = folder / f"{self.count:06d}.bin"
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            write_private(path, data)
        except OSError as error:        # a full or unwritable tmp_dir: the scanner cannot run
            raise ScannerError(f"cannot write {path} for {self}: {error.strerror or error}") from None
        return str(path)

    def _run(self, batch: dict[str, str]) -> Iterator[Finding]:
        try:
            code, output = self._execute(list(batch))
        finally:
            for path in batch:
                os.unlink(path)
        names = list(self.pattern.finditer(output))
        if code in self.infected_codes or (names and code in self.clean_codes):
            if not names:
                yield found(_only_label(batch), "unknown virus")
            for match in names:
                yield found(self._label(match, batch), _group(match, "name"))
        elif code not in self.clean_codes:
            last = output.strip().splitlines()[-1:] or [""]
            raise ScannerError(f"{self} exited {code}: {printable(last[0], 160)}")

    MAX_OUTPUT = 1 << 20        # a report, not a stream: more is a scanner gone wrong

    def _execute(self, paths: list[str]) -> tuple[int, str]:
        argv = []
        for word in self.argv:
            argv += paths if word == "{paths}" else [word.replace("{path}", paths[0])]
        return bounded_run(argv, self.directory(), self.timeout, self.MAX_OUTPUT, str(self))

    def _label(self, match: re.Match, batch: dict[str, str]) -> str:
        path = _group(match, "path") if "path" in match.re.groupindex else ""
        for stored, label in batch.items():
            if path.startswith(stored):       # clamscan: "PATH!member" for archive contents
                return label
        return _only_label(batch)


def bounded_run(argv: list[str], folder: Path | None, timeout: float, most: int, name: str,
                error: type[Exception] = ScannerError, too_much: str = "") -> tuple[int, str]:
    """Run ``argv`` in ``folder``, stdin closed, and read at most ``most`` bytes of its output
    (stdout and stderr together) in ``timeout`` seconds; else ``error`` naming ``name``."""
    import select
    import subprocess
    import time

    from ..processes import end, start

    try:
        process = start(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, cwd=folder)
    except OSError as failure:
        raise error(f"cannot run {name} ({argv[0]}): {failure.strerror or failure}") from None
    output, deadline = bytearray(), time.monotonic() + timeout
    try:
        while len(output) <= most:
            left = deadline - time.monotonic()
            if left <= 0:
                raise error(f"{name} took longer than {timeout:g} s")
            if select.select([process.stdout], [], [], left)[0]:
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    break
                output += chunk
        else:
            raise error(f"{name} said more than {most} bytes{too_much}")
        code = end(process, kill=False, timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise error(f"{name} took longer than {timeout:g} s") from None
    finally:       # killed and reaped on every way out: a limit, the time limit, an exception
        if process.returncode is None:
            end(process, kill=True)
        process.stdout.close()
    return code, output.decode("utf-8", "replace")


def write_private(path: Path, data: bytes) -> None:
    """A new file only this user can read; never through an existing file or symlink."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(data)


def _group(match: re.Match, name: str) -> str:
    if name in match.re.groupindex:
        return match.group(name) or ""
    return match.group(1) if match.re.groups else match.group(0)


def _only_label(batch: dict[str, str]) -> str:
    return next(iter(batch.values())) if len(batch) == 1 else f"one of {len(batch)} objects"
