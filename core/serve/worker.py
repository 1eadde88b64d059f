"""A worker: forked by the master, it drops to the mail user and takes, only while it is
idle, one connection at a time from the doorkeeper's queue: a client's request, run through
the very code of a one-shot run, or an LMTP or SMTP transaction (:mod:`.transaction`),
whose session it then gives back."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import select
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from ispmailgate_client import CONFIG_VARIABLE

from ..rules import BUILT_IN_CONFIG, Config
from ..run import Streams
from ..status import EX_OK, EX_TEMPFAIL, LOCAL_TROUBLE, MISCONFIGURED
from .admission import decline_reason
from .children import BOOT_ERROR, Heartbeat, Identity, start_child, uid_of
from .handoff import Channel, Parcel
from .protocol import (ClientContext, Prefixed, Request, RequestError, acknowledge, decline, linger,
                       peer_credentials, send_reply)
from .section import ServeSettings
from .transaction import serve_transaction

log = logging.getLogger("ispmailgate.serve")


class Declined(Exception):
    """A request the server does not run for this client (see :mod:`.admission`)."""


class Service(NamedTuple):
    """What the server serves, handed in by the command line that starts it (the server
    never imports the command line): ``run`` one command line (argv, its streams, the rule
    file the server loaded -> exit status), and ``prepare``, called once before the first
    fork, to build what every run would otherwise build anew."""
    run: Callable[[list[str], Streams, Config | None], int]
    prepare: Callable[[], None]


@dataclass(eq=False)
class Worker:
    """One forked worker: takes a connection at a time, until stopped or recycled."""
    queue: Channel                      # its reading end
    returns: Channel                    # its writing end
    service: Service
    config: Config
    settings: ServeSettings
    identity: Identity | None
    heartbeat: Heartbeat
    max_requests: int
    generation: int = 0
    role: str = "worker"
    master: int = 0
    alive: bool = True
    pid: int = 0
    home: int = -1                      # the worker's own directory, to come back to
    stop_by: float | None = None        # set in the master when asked to stop

    def run(self) -> int:
        """In the child: returns the exit status; never returns into the master's code."""
        self.master, self.pid = os.getppid(), os.getpid()
        try:
            self.home = start_child(self.identity, self._stop)
        except Exception as error:
            log.error("worker %d cannot start: %s", self.pid, error)
            return BOOT_ERROR
        from ispmailgate_filters import processes

        processes.on_change = self.heartbeat.record_groups      # the master ends them if we are killed
        handled, idle = 0, select.poll()
        idle.register(self.queue, select.POLLIN)
        while self.alive and (not self.max_requests or handled < self.max_requests):
            self.heartbeat.beat()
            if os.getppid() != self.master:     # the master died: do not linger
                break
            if idle.poll(1000) and (parcel := self._next()) is not None:
                self.take(parcel)
                handled += 1
        log.info("worker %d exits after %d messages", self.pid, handled)
        return EX_OK

    def _next(self) -> Parcel | None:
        """The next connection on the queue (None: another worker was quicker)."""
        try:
            parcel = self.queue.receive()
        except OSError as error:
            log.error("worker %d: %s", self.pid, error)
            return None
        if parcel is not None:
            self.returns.send(Parcel("taken", state={"pid": self.pid, "session": parcel.kind != "client"}),
                              timeout=1.0)
        return parcel

    def _stop(self, signum, frame) -> None:
        self.alive = False          # finish the message in hand, then exit

    def take(self, parcel: Parcel) -> None:
        if parcel.kind == "client":
            with parcel.connection:
                self.handle(parcel.connection, parcel.data)
            return
        back = None
        try:
            back = serve_transaction(parcel, self.config, self.settings)
        except Exception as error:      # noqa: BLE001 -- nothing a session does may end the worker
            log.error("worker %d: internal error: %r", self.pid, error, exc_info=True)
        if back is None or not self.returns.send(back, timeout=5.0):
            self.returns.send(Parcel("gone", state={"pid": self.pid}), timeout=1.0)
        parcel.connection.close()       # ours; the doorkeeper has its own now

    def handle(self, connection, head: bytes = b"") -> None:
        started = time.monotonic()
        pid, uid, gid = peer_credentials(connection)
        log.info("worker %d: connection from pid=%d uid=%d gid=%d", self.pid, pid, uid, gid)
        request = Request(Prefixed(connection, head), self.settings)
        acknowledged = False
        try:
            argv = request.arguments()
            with self.client_context(request.context) as refused:
                declined = self.declined(argv, uid)
                if declined and decline(connection, request.version, declined, self.settings.read_timeout):
                    log.warning("worker %d: declined for pid=%d uid=%d: %s", self.pid, pid, uid, declined)
                    return
                if declined:
                    raise Declined(declined)
                acknowledged = acknowledge(connection, request.version, self.settings.read_timeout)
                status, stdout, stderr = self.run_request(argv, request, refused)
        except Declined as why:
            log.warning("worker %d: declined for pid=%d uid=%d (an old client): %s", self.pid, pid, uid, why)
            status, stdout, stderr = EX_TEMPFAIL, b"", f"{MISCONFIGURED} ispmailgate serve: not run: {why}\n".encode()
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

    def declined(self, argv: list[str], uid: int) -> str:
        """Why this request is not run for ``uid`` ("" when it is): see :mod:`.admission`."""
        if argv[:1] == ["serve"]:
            return ""           # refused as a usage error, to anyone
        server_rules = self.config.path if self.config.path != BUILT_IN_CONFIG else None
        return decline_reason(argv, uid, uid_of(self.identity), server_rules, self.settings)

    def run_request(self, argv: list[str], request: Request, refused: str) -> tuple[int, bytes, bytes]:
        """One command line through the one-shot code, with typer's own output captured;
        ``refused``: why the client's directory could not be entered, or ""."""
        if argv[:1] == ["serve"]:
            return EX_TEMPFAIL, b"", f"{MISCONFIGURED} usage: 'serve' cannot run inside a server\n".encode()
        stdout, stderr = io.BytesIO(), io.StringIO()
        text_stdout = io.TextIOWrapper(stdout, encoding="utf-8", errors="backslashreplace",
                                       write_through=True)
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = text_stdout, stderr
        try:
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
