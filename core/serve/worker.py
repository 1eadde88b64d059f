"""A worker: forked by the master, it drops to the mail user and runs one request at a time
through the very code of a one-shot run."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Iterator, NamedTuple

from ispmailgate_client import CONFIG_VARIABLE
from ispmailgate_filters.base import ConfigError

from ..rules import Config
from ..run import Streams
from ..status import EX_OK, EX_TEMPFAIL, LOCAL_TROUBLE, MISCONFIGURED
from .doorway import Doorway
from .protocol import ClientContext, Prefixed, Request, RequestError, acknowledge, linger, peer_credentials, send_reply
from .section import ServeSettings

log = logging.getLogger("ispmailgate.serve")


WORKER_BOOT_ERROR = 3


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


class Service(NamedTuple):
    """What the server serves, handed in by the command line that starts it (the server
    never imports the command line): ``run`` one command line (argv, its streams, the rule
    file the server loaded -> exit status), and ``prepare``, called once before the first
    fork, to build what every run would otherwise build anew."""
    run: Callable[[list[str], Streams, Config | None], int]
    prepare: Callable[[], None]


@dataclass
class Worker:
    """One forked worker: accepts a connection at a time, until stopped or recycled."""
    listener: Any
    service: Service
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
            status, stdout, stderr = EX_TEMPFAIL, b"", f"{LOCAL_TROUBLE} ispmailgate serve: bad request: {error}\n".encode()
        except Exception as error:      # nothing a client sends may end the worker
            log.error("worker %d: internal error: %r", self.pid, error, exc_info=True)
            status, stdout, stderr = EX_TEMPFAIL, b"", f"{LOCAL_TROUBLE} ispmailgate serve: internal error: {error!r}\n".encode()
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
            return EX_TEMPFAIL, b"", f"{MISCONFIGURED} usage: 'serve' cannot run inside a server\n".encode()
        stdout, stderr = io.BytesIO(), io.StringIO()
        text_stdout = io.TextIOWrapper(stdout, encoding="utf-8", errors="backslashreplace",
                                       write_through=True)
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = text_stdout, stderr
        try:
            with self.client_context(request.context) as refused:
                status = self.service.run(argv, Streams(request, stdout, stderr), self.config)
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
