"""ispmailgate serve: pre-forked workers behind a Unix socket.

The master loads the rule file and every module once, binds the socket, and forks
workers; each worker drops to the mail user, accepts one connection at a time and runs
the request through ``ispmailgate.run`` -- the very same parser and code path as a one-shot
run -- with the message read from the connection and the output sent back to
``ispmailgate-client``.  The master itself never reads a byte a client sent.

As in gunicorn's arbiter, signal handlers only queue the signal; the main loop handles
them: TERM/INT drain the workers and stop, QUIT stops at once, HUP re-reads the rule file
and replaces the workers (a bad file is refused and the old workers keep serving), CHLD
reaps, and a worker that dies is replaced.  A worker that fails to boot stops the master
instead of a fork loop.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import ispmailgate
from ispmailgate import EX_CONFIG, EX_OK, EX_TEMPFAIL, Config, Setting, Streams
from ispmailgate_client import (ARGUMENTS, CONFIG_VARIABLE, CONTEXT, DATA, DEFAULT_SOCKET, END, EXIT,
                                FALLBACKS, MAX_FRAME, PROTOCOL_VERSIONS, STDERR, STDOUT, frame)
from ispmailgate_filters.base import ConfigError, count, parse_size

log = logging.getLogger("ispmailgate.serve")
log.propagate = False       # the core replaces the "ispmailgate" handlers on every run

WORKER_BOOT_ERROR = 3


# =========================================================================================
# the [serve] section of the rule file
# =========================================================================================

def _mode(value: Any) -> int:
    """A file mode as an integer (0o660 in TOML) or an octal string ("0660")."""
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ValueError(f"expected an octal mode like \"0660\", got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError(f"expected a mode between 0 and 0o777, got {value!r}")
    return value


SERVE_SETTINGS: dict[str, Setting] = {
    "socket": Setting(DEFAULT_SOCKET, ispmailgate._string, "Unix socket the workers accept on, bound with "
                      "socket_mode at once; as root only in a directory nobody else can change."),
    "socket_mode": Setting(0o660, _mode, "Permissions of the socket (who may hand in mail)."),
    "socket_user": Setting("", ispmailgate._string, "Owner of the socket (default: the server's user)."),
    "socket_group": Setting("", ispmailgate._string,
                            "Group of the socket (default: mail_group when started as root)."),
    "pid_file": Setting("", ispmailgate._string, "Write the master's pid here (--pidfile overrides): "
                        "replaced atomically, never through a link, in a directory only root can change."),
    "workers": Setting(2, count(1, 1024), "Worker processes, 1 to 1024 (--workers overrides)."),
    "max_requests": Setting(1000, count(0), "Messages a worker handles before it is replaced (0: never)."),
    "max_requests_jitter": Setting(50, count(0, 1_000_000),
                                   "Up to this many more, at random, so workers are not replaced together."),
    "head_timeout": Setting(5.0, ispmailgate._positive,
                            "Seconds a new connection may take to send its request head (arguments); "
                            "until then it waits without holding a worker, then it is closed."),
    "read_timeout": Setting(30.0, ispmailgate._positive, "Seconds to wait for each read from a client."),
    "request_timeout": Setting(600.0, ispmailgate._positive,
                               "Seconds a client may take to send its whole request."),
    "max_request_size": Setting(64 * 1024 * 1024, parse_size,
                                "Largest request (arguments and message) a worker reads; over it: 75."),
    "graceful_timeout": Setting(300.0, ispmailgate._positive,
                                "On stop or reload, seconds a worker may take to finish its message."),
    "worker_timeout": Setting(900.0, ispmailgate._positive,
                              "A worker silent this long (one message taking longer) is killed."),
    "fallback": Setting("oneshot", ispmailgate._one_of(*FALLBACKS),
                        "What ispmailgate-client does when the server is down: oneshot or tempfail."),
}


@dataclass(frozen=True)
class ServeSettings:
    """The ``[serve]`` table, checked when the rule file is read."""
    values: dict[str, Any] = field(default_factory=lambda: {k: s.default for k, s in SERVE_SETTINGS.items()})

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def with_overrides(self, **overrides: Any) -> ServeSettings:
        return replace(self, values={**self.values, **{k: v for k, v in overrides.items() if v is not None}})


def load_section(table: Any, where: str) -> ServeSettings:
    """The loader registered in ``ispmailgate.SECTIONS``; every error names its key path."""
    if not isinstance(table, dict):
        raise ConfigError(where, "expected a [serve] table")
    values = ServeSettings().values
    for key, value in table.items():
        if key not in SERVE_SETTINGS:
            raise ConfigError(f"{where}.{key}", f"unknown key (known: {', '.join(SERVE_SETTINGS)})")
        try:
            values[key] = SERVE_SETTINGS[key].convert(value)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{where}.{key}", str(error)) from None
    return ServeSettings(values)


def settings_of(config: Config) -> ServeSettings:
    return config.sections.get("serve") or ServeSettings()


@dataclass(frozen=True)
class Identity:
    """Who the workers run as: resolved in the master, so a bad name is a boot error."""
    uid: int
    gid: int

    @classmethod
    def for_workers(cls, config: Config) -> Identity | None:
        """None when not started as root: the workers keep the server's own user.

        The rule file's top-level mail_user/mail_group, as for a one-shot run; unlike a
        one-shot run, a server never lets its workers stay root, not even when asked to.
        """
        if os.geteuid() != 0:
            return None
        import grp
        import pwd

        if not config.mail_user:
            raise ConfigError("mail_user", "empty: the server must not run its workers as root")
        try:
            user = pwd.getpwnam(config.mail_user)
        except KeyError:
            raise ConfigError("mail_user", f"no such user: {config.mail_user!r}") from None
        if user.pw_uid == 0:
            raise ConfigError("mail_user", "must not be root: workers read mail from the internet")
        try:
            gid = grp.getgrnam(config.mail_group).gr_gid if config.mail_group else user.pw_gid
        except KeyError:
            raise ConfigError("mail_group", f"no such group: {config.mail_group!r}") from None
        return cls(user.pw_uid, gid)

    def assume(self) -> None:
        """Drop root for good: supplementary groups cleared, then group, then user."""
        os.setgroups([])
        os.setgid(self.gid)
        os.setuid(self.uid)
        if os.getuid() == 0 or os.geteuid() == 0:
            raise OSError("still root after setuid")


# =========================================================================================
# the wire protocol, server side (docs/protocol.md)
# =========================================================================================

class RequestError(OSError):
    """A request that breaks the protocol, is too large or too slow (an OSError, so the
    core's message reader turns it into a tempfail like any other read error)."""


class ClientContext(NamedTuple):
    """Where the client runs (protocol 2): its working directory and that directory's
    (device, inode) -- "" and None when the client cannot tell -- and its
    $ISPMAILGATE_CONFIG (None when unset).  Nothing else of its environment."""
    cwd: str
    dev_ino: tuple[int, int] | None
    config: str | None

    @classmethod
    def decode(cls, payload: bytes) -> ClientContext:
        """Read strictly: every way a frame can be wrong is a RequestError (a bad request),
        never an exception of the parser's own; numbers are ASCII digits of sane length."""
        raw = payload.split(b"\0")[:-1]
        if not payload.endswith(b"\0") or not 2 <= len(raw) <= 8:     # only 3 are ever right
            raise RequestError("malformed context frame")
        if any(len(item) > MAX_CONTEXT_ITEM for item in raw):
            raise RequestError(f"a context item longer than {MAX_CONTEXT_ITEM} bytes")
        cwd, dev_ino, *variables = [os.fsdecode(item) for item in raw]
        numbers = _DEV_INO.fullmatch(raw[1])
        known = cwd.startswith("/") and numbers is not None
        if not known and (cwd or dev_ino):
            raise RequestError(f"the context frame's working directory is not an absolute path "
                               f"and a device:inode: {cwd[:100]!r} {dev_ino[:50]!r}")
        names = [variable.partition("=")[0] for variable in variables]
        if names not in ([], [CONFIG_VARIABLE]):
            raise RequestError(f"the context frame carries {', '.join(names)[:100]} "
                               f"(only {CONFIG_VARIABLE}, once)")
        config = variables[0].partition("=")[2] if variables else ""
        return cls(cwd, (int(numbers.group(1)), int(numbers.group(2))) if known else None,
                   config or None)      # empty is unset, as for the command line parser


MAX_CONTEXT_ITEM = 4096     # PATH_MAX: a working directory, a rule file's path
MAX_ARGUMENT = 128 * 1024   # MAX_ARG_STRLEN: no one-shot run gets a longer argument
_DEV_INO = re.compile(rb"([0-9]{1,20}):([0-9]{1,20})")      # 2**64 has 20 digits


class Request:
    """One client's request: its context and arguments, then its message as a readable stream."""

    def __init__(self, connection, settings: ServeSettings) -> None:
        self.connection = connection
        self.read_timeout = settings.read_timeout
        self.deadline = time.monotonic() + settings.request_timeout
        self.limit = settings.max_request_size
        self.received = 0
        self.pending = b""
        self.ended = False
        self.version = PROTOCOL_VERSIONS[0]         # the reply's, until the client says
        self.context: ClientContext | None = None   # protocol 1 sends none

    def arguments(self) -> list[str]:
        """The head of the request: the version, the context (protocol 2), the arguments."""
        version = self._exactly(1)[0]
        if version not in PROTOCOL_VERSIONS:
            raise RequestError(f"unsupported protocol version {version} (this server speaks "
                               f"{' and '.join(map(str, PROTOCOL_VERSIONS))})")
        self.version = version
        if version >= 2:
            kind, payload = self._frame()
            if kind != CONTEXT:
                raise RequestError("expected the context frame first")
            self.context = ClientContext.decode(payload)
        kind, payload = self._frame()
        if kind != ARGUMENTS or (payload and not payload.endswith(b"\0")):
            raise RequestError("expected the argument frame " + ("first" if version == 1 else "next"))
        arguments = payload.split(b"\0")[:-1]
        if any(len(argument) > MAX_ARGUMENT for argument in arguments):
            raise RequestError(f"an argument longer than {MAX_ARGUMENT} bytes")
        return [os.fsdecode(argument) for argument in arguments]

    def read(self, size: int = -1) -> bytes:
        """The next piece of the message; b"" at its end (what ``read_message`` expects)."""
        while not self.pending and not self.ended:
            kind, payload = self._frame()
            if kind == END:
                self.ended = True
            elif kind == DATA:
                self.pending = payload
            else:
                raise RequestError(f"unexpected frame {kind!r} in the message")
        size = len(self.pending) if size is None or size < 0 else size
        chunk, self.pending = self.pending[:size], self.pending[size:]
        return chunk

    def _frame(self) -> tuple[bytes, bytes]:
        head = self._exactly(5)
        length = int.from_bytes(head[1:], "big")
        if head[:1] not in (CONTEXT, ARGUMENTS, DATA, END):
            raise RequestError(f"unexpected frame {head[:1]!r}")
        if length > MAX_FRAME:
            raise RequestError(f"frame of {length} bytes (at most {MAX_FRAME})")
        if self.received + length > self.limit:
            raise RequestError(f"request larger than serve.max_request_size ({self.limit} bytes)")
        return head[:1], self._exactly(length)

    def _exactly(self, size: int) -> bytes:
        import socket

        data = bytearray()
        while len(data) < size:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise RequestError("the client took longer than serve.request_timeout")
            self.connection.settimeout(min(self.read_timeout, left))
            try:
                chunk = self.connection.recv(min(size - len(data), 1 << 20))
            except socket.timeout:
                raise RequestError(f"the client sent nothing for {self.read_timeout:g} s") from None
            if not chunk:
                raise RequestError("the client closed the connection in mid-request")
            data += chunk
        self.received += size
        return bytes(data)


class Doorway:
    """Connections accepted but not yet taken: a worker takes one only when its whole request
    head (version, context, arguments) has arrived, so connections that send nothing, or
    half a head, never hold a worker.  Each waits at most ``head_timeout`` from its accept,
    then gets an error reply and is closed; past ``MAX_WAITING`` the oldest goes first.
    What was read while waiting is handed over with the connection."""

    MAX_WAITING = 64
    MAX_HEAD = 256 * 1024       # a head this long is handed over as it is (read on with timeouts)

    def __init__(self, listener, head_timeout: float) -> None:
        import select

        self.listener, self.head_timeout = listener, head_timeout
        self.waiting: dict[int, tuple[Any, float, bytearray]] = {}     # fd: (socket, deadline, read)
        self.poll = select.poll()
        self.poll.register(listener, select.POLLIN)

    def next(self, wait: float) -> tuple[Any, bytes] | None:
        """A connection whose head is complete, with the bytes read from it; None after ``wait``."""
        now = time.monotonic()
        soonest = min((deadline for _, deadline, _ in self.waiting.values()), default=now + wait)
        for fd, _ in self.poll.poll(max(0.0, min(wait, soonest - now)) * 1000):
            if fd == self.listener.fileno():
                self._accept()
            elif fd in self.waiting and (ready := self._read(fd)) is not None:
                return ready
        self._expire(time.monotonic())
        return None

    def _accept(self) -> None:
        import select

        try:
            connection = self.listener.accept()[0]
        except (BlockingIOError, InterruptedError):     # another worker was quicker
            return
        connection.setblocking(False)
        if len(self.waiting) >= self.MAX_WAITING:
            self._drop(min(self.waiting, key=lambda fd: self.waiting[fd][1]), "too many connections waiting")
        self.waiting[connection.fileno()] = (connection, time.monotonic() + self.head_timeout, bytearray())
        self.poll.register(connection, select.POLLIN)

    def _read(self, fd: int) -> tuple[Any, bytes] | None:
        connection, _, data = self.waiting[fd]
        try:
            chunk = connection.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            chunk = b""
        if not chunk:
            if data:                        # half a head, then its end: answer it as bad
                self._drop(fd, "the request head ended before it was complete")
            else:                           # hung up before sending anything: nothing to answer
                self._forget(fd).close()
            return None
        data += chunk
        if not head_complete(data) and len(data) < self.MAX_HEAD:
            return None
        self._forget(fd).setblocking(True)
        return connection, bytes(data)

    def _expire(self, now: float) -> None:
        for fd in [fd for fd, (_, deadline, _) in self.waiting.items() if deadline <= now]:
            self._drop(fd, f"the client sent no complete request head within {self.head_timeout:g} s")

    def _drop(self, fd: int, reason: str) -> None:
        """Answer (if the socket takes it at once) and close: a connection no worker took."""
        data = self.waiting[fd][2]
        connection = self._forget(fd)
        version = data[0] if data and data[0] in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[0]
        log.warning("worker %d: connection closed: %s", os.getpid(), reason)
        try:
            send_reply(connection, b"", f"4.3.0 ispmailgate serve: bad request: {reason}\n".encode(),
                       EX_TEMPFAIL, version)
        except OSError:
            pass
        connection.close()

    def _forget(self, fd: int):
        connection = self.waiting.pop(fd)[0]
        self.poll.unregister(fd)
        return connection

    def close(self) -> None:
        for fd in list(self.waiting):
            self._forget(fd).close()


def head_complete(data: bytes | bytearray) -> bool:
    """Has the whole request head arrived: the version, the context frame (protocol 2 and
    later) and the argument frame?  A head a worker must refuse counts as complete."""
    if not data or data[0] not in PROTOCOL_VERSIONS:
        return bool(data)
    at = 1
    for kind in (CONTEXT, ARGUMENTS) if data[0] >= 2 else (ARGUMENTS,):
        if len(data) < at + 5:
            return len(data) > at and data[at:at + 1] != kind
        length = int.from_bytes(data[at + 1:at + 5], "big")
        if data[at:at + 1] != kind or length > MAX_FRAME:
            return True
        at += 5 + length
    return len(data) >= at


class Prefixed:
    """A connection whose first bytes were read while it waited in the doorway."""

    def __init__(self, connection, data: bytes) -> None:
        self.connection, self.data = connection, data

    def recv(self, size: int) -> bytes:
        if not self.data:
            return self.connection.recv(size)
        chunk, self.data = self.data[:size], self.data[size:]
        return chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self.connection, name)


def acknowledge(connection, version: int, timeout: float) -> bool:
    """Protocol 3: tell the client a worker took its request, so that from now on it waits
    for the result instead of falling back (that would deliver twice)."""
    if version < 3:
        return False
    connection.settimeout(timeout)
    try:
        connection.sendall(bytes([version]))
    except OSError as error:            # gone (it gave up waiting): its request is not run
        raise RequestError(f"the client left before its request was taken ({error.strerror or error})") from None
    return True


def send_reply(connection, stdout: bytes, stderr: bytes, status: int, version: int, *,
               acknowledged: bool = False) -> None:
    """The reply; its version byte went ahead already when the request was ``acknowledged``."""
    frames = [] if acknowledged else [bytes([version])]
    for kind, data in ((STDOUT, stdout), (STDERR, stderr)):
        frames += [frame(kind, data[i:i + MAX_FRAME]) for i in range(0, len(data), MAX_FRAME)]
    frames.append(frame(EXIT, bytes([status & 0xFF])))
    for piece in frames:
        connection.sendall(piece)


def linger(connection, timeout: float) -> None:
    """Read what the client still sends until it hangs up (briefly): closing a Unix socket
    with unread data resets the connection, and the client would lose the reply."""
    import socket

    connection.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        connection.settimeout(left)
        if not connection.recv(1 << 16):
            return


def peer_credentials(connection) -> tuple[int, int, int]:
    """(pid, uid, gid) of the client, from the kernel (SO_PEERCRED), not from the client."""
    import socket
    import struct

    raw = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


# =========================================================================================
# a worker
# =========================================================================================

class Heartbeat:
    """A word of shared memory: the worker writes the time, the master reads its age."""

    def __init__(self) -> None:
        import mmap

        self.memory = mmap.mmap(-1, 8)          # anonymous and shared across fork
        self.beat()

    def beat(self) -> None:
        self.memory[:8] = int(time.monotonic() * 1000).to_bytes(8, "big")

    def age(self) -> float:
        return time.monotonic() - int.from_bytes(self.memory[:8], "big") / 1000


@dataclass
class Worker:
    """One forked worker: accepts a connection at a time, until stopped or recycled."""
    listener: Any
    config: Config
    settings: ServeSettings
    identity: Identity | None
    heartbeat: Heartbeat
    max_requests: int
    generation: int = 0
    master: int = 0
    alive: bool = True
    pid: int = 0
    home: int = -1                      # the worker's own directory, to come back to
    stop_by: float | None = None        # set in the master when asked to stop

    def run(self) -> int:
        """In the child: returns the exit status; never returns into the master's code."""
        self.master, self.pid = os.getppid(), os.getpid()
        try:
            self._init_process()
        except Exception as error:
            log.error("worker %d cannot start: %s", self.pid, error)
            return WORKER_BOOT_ERROR
        handled, doorway = 0, Doorway(self.listener, self.settings.head_timeout)
        while self.alive and (not self.max_requests or handled < self.max_requests):
            self.heartbeat.beat()
            arrived = doorway.next(1.0)
            if os.getppid() != self.master:     # the master died: do not linger
                self.alive = False
            elif arrived is not None:
                with arrived[0]:
                    self.handle(*arrived)
                handled += 1
        doorway.close()         # what waits was never taken: a client of protocol 3 falls back
        log.info("worker %d exits after %d messages", self.pid, handled)
        return EX_OK

    def _init_process(self) -> None:
        for name in ("TERM", "INT", "HUP"):
            signal.signal(getattr(signal, "SIG" + name), self._stop)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)       # subprocess.run must reap its own
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        self.home = os.open(".", os.O_PATH)     # before privileges go: whoever we become
        if self.identity is not None:
            self.identity.assume()

    def _stop(self, signum, frame) -> None:
        self.alive = False          # finish the message in hand, then exit

    def handle(self, connection, head: bytes = b"") -> None:
        started = time.monotonic()
        pid, uid, gid = peer_credentials(connection)
        log.info("worker %d: connection from pid=%d uid=%d gid=%d", self.pid, pid, uid, gid)
        request = Request(Prefixed(connection, head), self.settings)
        acknowledged = False
        try:
            argv = request.arguments()
            acknowledged = acknowledge(connection, request.version, self.settings.read_timeout)
            status, stdout, stderr = self.run_request(argv, request)
        except RequestError as error:
            log.warning("worker %d: bad request from pid=%d uid=%d: %s", self.pid, pid, uid, error)
            status, stdout, stderr = EX_TEMPFAIL, b"", f"4.3.0 ispmailgate serve: bad request: {error}\n".encode()
        except Exception as error:      # nothing a client sends may end the worker
            log.error("worker %d: internal error: %r", self.pid, error, exc_info=True)
            status, stdout, stderr = EX_TEMPFAIL, b"", f"4.3.0 ispmailgate serve: internal error: {error!r}\n".encode()
        try:
            connection.settimeout(self.settings.read_timeout)
            send_reply(connection, stdout, stderr, status, request.version, acknowledged=acknowledged)
            linger(connection, self.settings.read_timeout)
        except OSError as error:
            log.error("worker %d: could not answer pid=%d (exit %d was due): %s", self.pid, pid, status, error)
        log.info("worker %d: pid=%d uid=%d exit=%d ms=%.0f", self.pid, pid, uid, status,
                 (time.monotonic() - started) * 1000)

    def run_request(self, argv: list[str], request: Request) -> tuple[int, bytes, bytes]:
        """One command line through the one-shot code, with typer's own output captured."""
        if argv[:1] == ["serve"]:
            return EX_TEMPFAIL, b"", b"4.3.5 usage: 'serve' cannot run inside a server\n"
        stdout, stderr = io.BytesIO(), io.StringIO()
        text_stdout = io.TextIOWrapper(stdout, encoding="utf-8", errors="backslashreplace",
                                       write_through=True)
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = text_stdout, stderr
        try:
            with self.client_context(request.context) as refused:
                status = ispmailgate.run(argv, Streams(request, stdout, stderr), preloaded=self.config)
        finally:
            sys.stdout, sys.stderr = saved
            text_stdout.detach()
        if refused and status != EX_OK:         # after the status line: for the MTA's log
            stderr.write(f"ispmailgate serve: {refused}: relative paths did not resolve\n")
        return status, stdout.getvalue(), stderr.getvalue().encode("utf-8", "backslashreplace")

    @contextlib.contextmanager
    def client_context(self, context: ClientContext | None) -> Iterator[str]:
        """The client's working directory and $ISPMAILGATE_CONFIG for one request, as a
        one-shot run would have them; yields why the directory could not be entered, or "".
        Protocol 1 sends no context: such a request runs in the worker's own directory."""
        if context is None:
            yield ""
            return
        saved = os.environ.get(CONFIG_VARIABLE)
        refused = enter(context.cwd, context.dev_ino)
        if refused:
            refused = (f"cannot enter the client's working directory {context.cwd}: {refused}"
                       if context.cwd else "the client cannot tell its working directory")
            log.info("worker %d: %s: relative paths will not resolve", self.pid, refused)
        if context.config is not None:
            os.environ[CONFIG_VARIABLE] = context.config
        try:
            yield refused
        finally:
            os.environ.pop(CONFIG_VARIABLE, None)
            if saved is not None:
                os.environ[CONFIG_VARIABLE] = saved
            try:
                enter(self.home)
            except OSError as error:    # never the next client in this one's directory
                log.error("worker %d: cannot leave the client's directory (%s); exits after this "
                          "message", self.pid, error)
                self.alive = False


def enter(directory: str | int, dev_ino: tuple[int, int] | None = None) -> str:
    """chdir (or fchdir, given a descriptor), to the very directory ``dev_ino`` names if
    given: "" or why not.  Where it cannot, it goes to a directory that no longer exists, so
    that a relative path fails (as in a one-shot run that dropped root where mail_user
    cannot enter) instead of resolving where nobody meant it to; an OSError if even that
    fails."""
    import tempfile

    try:
        os.chdir(directory)
        here = os.stat(".")
        if dev_ino is None or (here.st_dev, here.st_ino) == dev_ino:
            return ""
        reason = "the server sees another directory there (a private /tmp? another mount namespace?)"
    except OSError as error:
        reason = error.strerror or str(error)
    gone = tempfile.mkdtemp(prefix="ispmailgate-gone-")
    os.chdir(gone)
    os.rmdir(gone)
    return reason


# =========================================================================================
# the master
# =========================================================================================

class HaltServer(Exception):
    def __init__(self, reason: str, status: int = EX_CONFIG) -> None:
        super().__init__(reason)
        self.reason, self.status = reason, status


class Arbiter:
    """Keeps the right number of workers alive; signals only queue work for the loop."""

    SIGNALS = ("HUP", "TERM", "INT", "QUIT", "CHLD")

    def __init__(self, config: Config, config_path: Path | None, settings: ServeSettings,
                 listener, overrides: dict[str, Any]) -> None:
        self.config, self.config_path, self.settings = config, config_path, settings
        self.listener, self.overrides = listener, overrides
        self.identity = Identity.for_workers(config)
        self.workers: dict[int, Worker] = {}
        self.generation = 0
        self.queue: list[str] = []
        self.wake_read, self.wake_write = os.pipe()
        for fd in (self.wake_read, self.wake_write):
            os.set_blocking(fd, False)

    def run(self, ready) -> int:
        for name in self.SIGNALS:
            signal.signal(getattr(signal, "SIG" + name), self._queue_signal)
        self.spawn_missing()
        ready()
        log.info("serving on %s with %d workers (pid %d)", self.settings.socket,
                 self.settings.workers, os.getpid())
        try:
            while True:
                name = self.queue.pop(0) if self.queue else None
                if name is None:
                    self.sleep()
                    self.murder_stale()
                    self.spawn_missing()
                elif name in ("TERM", "INT", "QUIT"):
                    return self.stop(graceful=name != "QUIT")
                else:
                    getattr(self, "handle_" + name.lower())()
        except HaltServer as halt:
            log.error("stopping: %s", halt.reason)
            self.stop(graceful=False)
            return halt.status

    def _queue_signal(self, signum, frame) -> None:
        if len(self.queue) < 10:
            self.queue.append(signal.Signals(signum).name[3:])
        try:
            os.write(self.wake_write, b".")
        except OSError:
            pass

    def sleep(self) -> None:
        import select

        ready, _, _ = select.select([self.wake_read], [], [], 1.0)
        if ready:
            while True:
                try:
                    if not os.read(self.wake_read, 512):
                        return
                except OSError:      # drained (EAGAIN)
                    return

    # -- signals ---------------------------------------------------------------------------

    def handle_chld(self) -> None:
        """Reap; a worker that died is replaced by the loop, one that cannot boot stops all."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == WORKER_BOOT_ERROR:
                raise HaltServer(f"worker {pid} failed to boot")
            if os.WIFSIGNALED(status) and worker.stop_by is None:
                log.error("worker %d was killed by signal %d; replacing it", pid, os.WTERMSIG(status))
            elif os.WIFEXITED(status) and os.WEXITSTATUS(status) != EX_OK:
                log.error("worker %d exited with status %d; replacing it", pid, os.WEXITSTATUS(status))

    def handle_hup(self) -> None:
        """Re-read the rule file; workers with the new one replace the old gracefully."""
        notify("RELOADING=1")
        try:
            config = ispmailgate.load_config(self.config_path)
            settings = settings_of(config).with_overrides(**self.overrides)
            identity = Identity.for_workers(config)
            ispmailgate.preload(config)
        except (Exception, SystemExit) as error:    # a plugin may fail in its own way, even by
            # calling sys.exit() at import: refuse the new rule file, never die
            log.error("reload refused, still serving the previous rule file: %s", error,
                      exc_info=not isinstance(error, ConfigError))
            notify("READY=1")
            return
        if settings.socket != self.settings.socket:
            log.warning("serve.socket changed: takes effect at the next start, not on reload")
            settings = settings.with_overrides(socket=self.settings.socket)
        self.config, self.settings, self.identity = config, settings, identity
        self.generation += 1
        self.spawn_missing()
        for pid, worker in list(self.workers.items()):
            if worker.generation < self.generation:
                self.ask_to_stop(pid, worker)
        log.info("reloaded %s: %d new workers", self.config.path, settings.workers)
        notify("READY=1")

    # -- workers ---------------------------------------------------------------------------

    def spawn_missing(self) -> None:
        current = [w for w in self.workers.values() if w.generation == self.generation]
        for _ in range(self.settings.workers - len(current)):
            self.spawn()

    def spawn(self) -> None:
        import random

        worker = Worker(self.listener.sock, self.config, self.settings, self.identity, Heartbeat(),
                        self.settings.max_requests + random.randint(0, self.settings.max_requests_jitter)
                        if self.settings.max_requests else 0, self.generation)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            worker.pid = pid
            self.workers[pid] = worker
            return
        status = 1
        try:
            os.close(self.wake_read)
            os.close(self.wake_write)
            status = worker.run()
        except BaseException as error:      # never fall back into the master's code
            log.error("worker %d crashed: %r", os.getpid(), error, exc_info=True)
        finally:
            logging.shutdown()
            os._exit(status)

    def ask_to_stop(self, pid: int, worker: Worker) -> None:
        if worker.stop_by is None:
            worker.stop_by = time.monotonic() + self.settings.graceful_timeout
            self.kill(pid, signal.SIGTERM)

    def murder_stale(self) -> None:
        """Kill workers stuck past worker_timeout, or past graceful_timeout once asked to stop."""
        now = time.monotonic()
        for pid, worker in list(self.workers.items()):
            if worker.stop_by is not None and now > worker.stop_by:
                log.error("worker %d did not finish within graceful_timeout; killing it", pid)
                self.kill(pid, signal.SIGKILL)
            elif worker.heartbeat.age() > self.settings.worker_timeout:
                log.error("worker %d silent for %.0f s (worker_timeout); killing it", pid,
                          worker.heartbeat.age())
                self.kill(pid, signal.SIGKILL)

    def kill(self, pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            self.workers.pop(pid, None)

    def stop(self, graceful: bool) -> int:
        """Stop accepting, let the workers finish their messages (or kill them), then exit."""
        self.listener.close()
        notify("STOPPING=1")
        log.info("stopping (%s)", "draining the workers" if graceful else "at once")
        for pid, worker in list(self.workers.items()):
            if graceful:
                self.ask_to_stop(pid, worker)
            else:
                self.kill(pid, signal.SIGKILL)
        while self.workers:
            if "QUIT" in self.queue:
                self.queue.clear()
                for pid in list(self.workers):
                    self.kill(pid, signal.SIGKILL)
            self.handle_chld_quietly()
            self.murder_stale()
            time.sleep(0.05)
        log.info("stopped")
        return EX_OK

    def handle_chld_quietly(self) -> None:
        try:
            self.handle_chld()
        except HaltServer:
            pass


# =========================================================================================
# boot: config, socket, pid file, daemon, systemd
# =========================================================================================

def serve(config_path: Path | None, *, socket: str | None = None, workers: int | None = None,
          pidfile: Path | None = None, foreground: bool = True) -> int:
    """``ispmailgate serve``: returns the exit status (78 on a boot error)."""
    overrides = {"socket": socket, "workers": workers, "pid_file": str(pidfile) if pidfile else None}
    try:
        config_path, config = _load(config_path)
        settings = settings_of(config).with_overrides(**overrides)
        _configure_logging(config, foreground)
        listener = Listener.open(settings, Identity.for_workers(config))
    except (ConfigError, HaltServer, OSError) as error:
        sys.stderr.write(f"ispmailgate serve: cannot start: {error}\n")
        return EX_CONFIG
    except Exception as error:      # a plugin whose preload fails: the rule file names it, 78 too
        sys.stderr.write(f"ispmailgate serve: cannot start: {error!r}\n")
        return EX_CONFIG
    role, ready_pipe = ("foreground", None) if foreground else daemonize()
    if role == "parent":
        return _parent_of_daemon(listener, ready_pipe)
    pid_file = None
    try:
        pid_file = PidFile(settings.pid_file) if settings.pid_file else None
        arbiter = Arbiter(config, config_path, settings, listener, overrides)
        return arbiter.run(lambda: _ready(ready_pipe))
    except (ConfigError, HaltServer, OSError) as error:
        log.error("cannot start: %s", error)
        return EX_CONFIG
    finally:
        listener.close()
        if pid_file is not None:
            pid_file.remove()


def _load(path: Path | None) -> tuple[Path | None, Config]:
    """The rule file, once; requests without -c (or with the same -c) use it as loaded."""
    _pin_search_paths()
    path = ispmailgate.find_config(path)
    if path is not None:
        path = Path(os.path.abspath(path))
        os.environ["ISPMAILGATE_CONFIG"] = str(path)     # what a request without -c means
    else:
        os.environ.pop("ISPMAILGATE_CONFIG", None)
    config = ispmailgate.load_config(path)
    ispmailgate.preload(config)     # what runs import lazily: once, and before privileges go
    import typer.rich_utils  # noqa: F401  (typer's help output, for served --help)
    for cli in (ispmailgate.gate_cli, ispmailgate.admin_cli):
        ispmailgate.click_command(cli)          # built once here, not in every worker
    return path, config


def _pin_search_paths() -> None:
    """Workers enter each client's directory: a relative entry of sys.path ("" under
    ``python -c``) or $PATH ("" or ".") would let that directory supply the modules a
    worker imports or the commands it runs.  Each is made absolute, as it means now."""
    sys.path[:] = [os.path.abspath(entry) for entry in sys.path]
    if "PATH" in os.environ:
        os.environ["PATH"] = os.pathsep.join(os.path.abspath(entry)
                                             for entry in os.environ["PATH"].split(os.pathsep))


def _configure_logging(config: Config, foreground: bool) -> None:
    for handler in list(log.handlers):
        log.removeHandler(handler)
    log.setLevel(logging.INFO)
    log.addHandler(ispmailgate.SyslogHandler(config.facility))
    formatter = logging.Formatter("%(asctime)s ispmailgate-serve[%(process)d]: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)] if foreground else []
    if config.log_file and config.log_file != "-":
        from ispmailgate_filters.files import open_log_file

        handlers.append(logging.StreamHandler(open_log_file(config.log_file)))     # as root: checked
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)


class Listener:
    """The listening socket: bound here, or handed over by systemd (then it is not ours)."""

    def __init__(self, sock, path: str, owned: bool) -> None:
        self.sock, self.path, self.owned = sock, path, owned

    @classmethod
    def open(cls, settings: ServeSettings, identity: Identity | None) -> Listener:
        import socket

        if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS") == "1":
            sock = socket.socket(fileno=3)          # sd_listen_fds(3): the first passed socket
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(name, None)
            sock.setblocking(False)
            return cls(sock, settings.socket, owned=False)
        from ispmailgate_filters.files import refuse_untrusted_directories

        path = settings.socket
        Path(path).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        refuse_untrusted_directories(path)      # as root: nobody else may swap what is bound
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound with its final mode (never wider, not even for a moment), and owned with
        # lchown: neither chmod nor chown of a path, which would follow a planted link.
        old_umask = os.umask(0o777 & ~settings.socket_mode | 0o111)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        _set_owner(path, settings, identity)
        sock.listen(128)
        sock.setblocking(False)
        return cls(sock, path, owned=True)

    def close(self) -> None:
        """Unlink first: from now on clients cannot connect and fall back or defer."""
        if self.owned:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.owned = False
        self.sock.close()


def _remove_stale_socket(path: str) -> None:
    import socket
    import stat

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise HaltServer(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)         # left behind by a server that died
            return
    raise HaltServer(f"another server is listening on {path}")


def _set_owner(path: str, settings: ServeSettings, identity: Identity | None) -> None:
    import grp
    import pwd

    uid = gid = -1
    try:
        if settings.socket_user:
            uid = pwd.getpwnam(settings.socket_user).pw_uid
    except KeyError:
        raise ConfigError("serve.socket_user", f"no such user: {settings.socket_user!r}") from None
    try:
        if settings.socket_group:
            gid = grp.getgrnam(settings.socket_group).gr_gid
        elif identity is not None:
            gid = identity.gid
    except KeyError:
        raise ConfigError("serve.socket_group", f"no such group: {settings.socket_group!r}") from None
    os.chown(path, uid, gid, follow_symlinks=False)


class PidFile:
    """The master's pid, written atomically; removed at exit only if it is still ours.

    Written as root: under a random name, created exclusively, then renamed over the pid
    file (a rename never follows a symlink), in a directory only root can change; read
    never through a symlink, FIFO or device."""

    def __init__(self, path: str) -> None:
        from ispmailgate_filters.files import replace_file

        self.path = Path(path)
        other = self._running_pid()
        if other is not None and other != os.getpid():
            raise HaltServer(f"already running: pid {other} in {self.path}")
        replace_file(str(self.path), f"{os.getpid()}\n".encode())

    def _pid(self) -> int | None:
        from ispmailgate_filters.files import read_small

        try:
            text = read_small(str(self.path)).strip()
        except OSError:
            return None
        return int(text) if text.isdigit() and len(text) < 12 else None

    def _running_pid(self) -> int | None:
        pid = self._pid()
        try:
            if pid is not None and pid > 0:
                os.kill(pid, 0)
                return pid
        except OSError:
            pass
        return None

    def remove(self) -> None:
        if self._pid() == os.getpid():
            try:
                self.path.unlink()
            except OSError:
                pass


def daemonize() -> tuple[str, int]:
    """The classic double fork: ("parent", fd to read the daemon's report) in the process
    that was started, ("daemon", fd to report on) in the daemon."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    first = os.fork()
    if first:
        os.close(write_fd)
        os.waitpid(first, 0)
        return "parent", read_fd
    os.close(read_fd)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return "daemon", write_fd


def _parent_of_daemon(listener: Listener, report_fd: int) -> int:
    """Exit 0 once the daemon is serving, 78 if it died on the way."""
    listener.owned = False          # the daemon owns the socket now
    listener.sock.close()
    with os.fdopen(report_fd, "rb") as report:
        answer = report.read(len(READY))       # not to EOF: the workers hold the pipe too
    if answer == READY:
        return EX_OK
    sys.stderr.write("ispmailgate serve: the daemon failed to start (see the log)\n")
    return EX_CONFIG


READY = b"ready"


def _ready(ready_pipe: int | None) -> None:
    notify(f"READY=1\nMAINPID={os.getpid()}")
    if ready_pipe is not None:
        os.write(ready_pipe, READY)
        os.close(ready_pipe)


def notify(state: str) -> None:
    """sd_notify(3) for Type=notify; nothing without $NOTIFY_SOCKET."""
    import socket

    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as error:
        log.warning("cannot notify systemd at %s: %s", address, error)
