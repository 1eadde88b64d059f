"""The doorkeeper: one process that holds every listening socket and every connection that
waits, so that no connection ever waits on a busy worker while another is idle.

It accepts on all listeners, waits for what makes a connection worth a worker -- a client's
complete request head, or an LMTP or SMTP session's DATA (the command phase is spoken here,
:mod:`.session`) -- and only then puts it on the queue (:mod:`.handoff`), from which an idle
worker, and only an idle one, takes it.  Workers give LMTP and SMTP sessions back after each
transaction, so a session idle between messages holds no worker either.  It holds at most
``connections_per_worker`` times ``workers`` connections (the rest are refused at once),
each for at most ``head_timeout`` (a client's head) or ``command_timeout`` (an LMTP or SMTP
session between commands), and no more than ``workers`` wait on the queue at a time: a
worker that becomes free takes the one that waited longest.  It runs as mail_user, like
the workers, and reads nothing but heads and commands.

Stopped (TERM), it tells the sessions it holds goodbye (421) and closes the clients it
holds (they fall back); replaced on reload (USR1), it hands all of them to its successor.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from ispmailgate_client import EX_TEMPFAIL, LOCAL_TROUBLE, PROTOCOL_VERSIONS

from .children import BOOT_ERROR, Heartbeat, Identity, start_child
from .handoff import Channel, Parcel
from .protocol import head_complete, peer_credentials, send_reply
from .section import ServeSettings
from .session import Limits, Session

log = logging.getLogger("ispmailgate.serve")

READ = select.POLLIN | select.POLLHUP | select.POLLERR


@dataclass(eq=False)
class Door:
    """A connection the doorkeeper holds."""
    sock: socket.socket
    kind: str
    peer: str
    deadline: float
    session: Session | None = None          # lmtp, smtp
    head: bytearray = field(default_factory=bytearray)      # client
    ready: bool = False                     # waits for room on the queue

    def parcel(self) -> Parcel:
        if self.session is None:
            return Parcel("client", self.sock, {"peer": self.peer}, bytes(self.head))
        state = self.session.state()
        state["reply"] = self.session.output.decode("latin-1")     # replies not yet sent
        return Parcel(self.kind, self.sock, state, bytes(self.session.buffer))


@dataclass(eq=False)
class Doorkeeper:
    listeners: list
    queue: Channel                  # its writing end
    returns: Channel                # its reading end
    handback: Channel               # the returns' writing end: to a successor
    settings: ServeSettings
    limits: Limits
    identity: Identity | None
    heartbeat: Heartbeat
    generation: int = 0
    role: str = "doorkeeper"
    pid: int = 0
    stop_by: float | None = None    # set in the master when asked to stop
    ending: str = ""                # "stop" or "handover", set by a signal

    # -- in the child ------------------------------------------------------------------------

    def run(self) -> int:
        self.master = os.getppid()
        try:
            start_child(self.identity, self._stop, self._hand_over)
        except Exception as error:
            log.error("doorkeeper %d cannot start: %s", os.getpid(), error)
            return BOOT_ERROR
        self.doors: dict[int, Door] = {}
        self.ready: list[Door] = []         # waiting for room on the queue, oldest first
        self.queued = 0                     # on the queue, not yet taken by a worker
        self.holding: dict[int, int] = {}   # LMTP and SMTP sessions a worker holds, by its pid
        self.poll = select.poll()
        self.listening = {listener.sock.fileno(): listener for listener in self.listeners}
        for fd in [*self.listening, self.returns.fileno()]:
            self.poll.register(fd, select.POLLIN)
        log.info("doorkeeper %d takes connections on %s", os.getpid(),
                 ", ".join(f"{listener.kind} {listener.address}" for listener in self.listeners))
        while not self.ending and os.getppid() == self.master:
            self.heartbeat.beat()
            self.turn()
        self.leave()
        return 0

    def _stop(self, signum, frame) -> None:
        self.ending = self.ending or "stop"

    def _hand_over(self, signum, frame) -> None:
        self.ending = self.ending or "handover"

    def turn(self) -> None:
        now = time.monotonic()
        soonest = min((door.deadline for door in self.doors.values() if not door.ready), default=now + 1.0)
        for fd, events in self.poll.poll(max(0.0, min(1.0, soonest - now)) * 1000):
            if fd in self.listening:
                self.accept(self.listening[fd])
            elif fd == self.returns.fileno():
                self.take_returns()
            elif fd in self.doors:
                self.serve(self.doors[fd], events)
        self.expire(time.monotonic())
        self.forget_the_dead()
        self.dispatch()

    # -- connections in ------------------------------------------------------------------------

    def accept(self, listener) -> None:
        for _ in range(64):
            try:
                sock, address = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:        # out of descriptors: the rest wait in the backlog
                log.error("doorkeeper: cannot accept on %s: %s", listener.address, error)
                return
            sock.setblocking(False)
            peer = self.admit(sock, listener, address)
            if peer:
                self.open(sock, listener.kind, peer)

    def admit(self, sock: socket.socket, listener, address: Any) -> str:
        """The peer as the log names it, or "" when it is not let in (closed)."""
        if listener.inet:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not _allowed(address[0], self.settings.inet_clients):
                log.warning("doorkeeper: %s from %s refused: not in serve.inet_clients", listener.kind, address[0])
                sock.close()
                return ""
            return f"[{address[0]}]:{address[1]}"
        pid, uid, _ = peer_credentials(sock)
        return f"pid={pid} uid={uid}"

    def open(self, sock: socket.socket, kind: str, peer: str) -> None:
        now = time.monotonic()
        full = len(self.doors) + self.queued + sum(self.holding.values()) >= self.capacity
        if kind == "client":
            door = Door(sock, kind, peer, now + self.settings.head_timeout)
            if full:        # closed unanswered: the client falls back, as if nobody were here
                log.warning("doorkeeper: client %s closed: %d connections held", peer, self.capacity)
                return sock.close()
        else:
            door = Door(sock, kind, peer, now + self.settings.command_timeout,
                        Session(kind, self.limits, peer))
            if full:
                log.warning("doorkeeper: %s %s refused: %d connections held", kind, peer, self.capacity)
                door.session.refuse("4.3.2", "too many connections, try again later")
            else:
                door.session.greet()
        self.hold(door)

    @property
    def capacity(self) -> int:
        return self.settings.workers * self.settings.connections_per_worker

    def hold(self, door: Door) -> None:
        self.doors[door.sock.fileno()] = door
        self.poll.register(door.sock, READ)
        if door.session is not None:
            self.flush(door)

    # -- what a connection says ----------------------------------------------------------------

    def serve(self, door: Door, events: int) -> None:
        if events & select.POLLOUT and door.session is not None:
            self.flush(door)
        if events & READ and door.sock.fileno() in self.doors:
            self.read(door)

    def read(self, door: Door) -> None:
        try:
            chunk = door.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if door.session is not None:
            return self.command(door, chunk)
        if not chunk:
            return self.drop(door, "the request head ended before it was complete" if door.head else "")
        door.head += chunk
        if head_complete(door.head):
            self.make_ready(door)

    def command(self, door: Door, chunk: bytes) -> None:
        session = door.session
        if not chunk:
            return self.forget(door).close()
        session.feed(chunk)
        door.deadline = time.monotonic() + self.settings.command_timeout
        if session.ready:
            self.make_ready(door)
        else:
            self.flush(door)

    def flush(self, door: Door) -> None:
        """Sends what the session has to say; stops reading while the client does not read."""
        session = door.session
        try:
            sent = door.sock.send(session.output) if session.output else 0
            del session.output[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            return self.forget(door).close()
        if session.closing and not session.output:
            return self.forget(door).close()
        wanted = (READ if session.wants_input else 0) | (select.POLLOUT if session.output else 0)
        self.poll.modify(door.sock, wanted or select.POLLHUP)

    def make_ready(self, door: Door) -> None:
        self.poll.unregister(door.sock)
        door.ready = True
        self.ready.append(door)

    # -- out to the workers, and back -----------------------------------------------------------

    def dispatch(self) -> None:
        """Ready connections onto the queue, as long as fewer than ``workers`` wait there."""
        while self.ready and self.queued < self.settings.workers:
            door = self.ready[0]
            try:
                if not self.queue.send(door.parcel()):
                    return          # full: try again on the next turn
            except OSError as error:
                log.error("doorkeeper: cannot queue %s %s: %s", door.kind, door.peer, error)
            self.ready.pop(0)
            del self.doors[door.sock.fileno()]
            door.sock.close()       # the worker has its own descriptor now
            self.queued += 1

    def take_returns(self) -> None:
        for _ in range(64):
            try:
                parcel = self.returns.receive()
            except OSError as error:
                log.error("doorkeeper: %s", error)
                continue
            if parcel is None:
                return
            self.returned(parcel)

    def returned(self, parcel: Parcel) -> None:
        worker = parcel.state.get("pid", 0)
        if parcel.kind == "taken":
            self.queued = max(0, self.queued - 1)
            if parcel.state.get("session"):
                self.holding[worker] = self.holding.get(worker, 0) + 1
        elif parcel.kind == "gone":
            self._released(worker)
        elif parcel.connection is not None:
            if not parcel.state.get("handed"):         # from a worker, not from a predecessor
                self._released(worker)
            self.adopt(parcel)

    def _released(self, worker: int) -> None:
        if self.holding.get(worker, 0) > 1:
            self.holding[worker] -= 1
        else:
            self.holding.pop(worker, None)

    def forget_the_dead(self) -> None:
        """A worker killed while it held sessions gives none back: they count no more."""
        for worker in list(self.holding):
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                del self.holding[worker]
            except PermissionError:
                pass

    def adopt(self, parcel: Parcel) -> None:
        """A connection from a worker (its session, after a transaction) or a predecessor."""
        state, sock = parcel.state, parcel.connection
        sock.setblocking(False)
        now = time.monotonic()
        if parcel.kind == "client":
            door = Door(sock, "client", state.get("peer", "?"), now + state.get("left", self.settings.head_timeout),
                        head=bytearray(parcel.data))
        else:
            door = Door(sock, parcel.kind, state.get("peer", "?"), now + self.settings.command_timeout,
                        Session(parcel.kind, self.limits, state.get("peer", "?"), state))
            door.session.output += state.get("reply", "").encode("latin-1")
        self.hold(door)
        if door.session is not None and parcel.data:
            self.command(door, parcel.data)
        elif door.session is None and head_complete(door.head):
            self.make_ready(door)

    # -- time, and the end -----------------------------------------------------------------------

    def expire(self, now: float) -> None:
        for door in [door for door in self.doors.values() if door.deadline <= now and not door.ready]:
            if door.session is None:
                self.drop(door, f"the client sent no complete request head within {self.settings.head_timeout:g} s")
            elif door.session.closing:      # said goodbye, but the client does not read it
                self.forget(door).close()
            else:
                door.session.refuse("4.4.2", "timeout: no command")
                door.deadline = now + 5
                self.flush(door)

    def drop(self, door: Door, reason: str) -> None:
        """A client's connection no worker takes: answered (if the socket takes it), closed."""
        self.forget(door)
        if reason:
            log.warning("doorkeeper: client %s closed: %s", door.peer, reason)
            version = door.head[0] if door.head and door.head[0] in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[0]
            try:
                send_reply(door.sock, b"", f"{LOCAL_TROUBLE} ispmailgate serve: bad request: {reason}\n".encode(),
                           EX_TEMPFAIL, version)
            except OSError:
                pass
        door.sock.close()

    def forget(self, door: Door) -> socket.socket:
        self.doors.pop(door.sock.fileno(), None)
        try:
            self.poll.unregister(door.sock)
        except (KeyError, ValueError):
            pass
        return door.sock

    def leave(self) -> None:
        """Stopped: goodbye to every session, clients closed.  Replaced: all to the successor."""
        handing = self.ending == "handover"
        now = time.monotonic()
        for door in list(self.doors.values()):
            parcel = door.parcel()
            parcel.state.update(handed=True, left=max(0.1, door.deadline - now))
            if handing and self.handback.send(parcel, timeout=1.0):
                door.sock.close()
                continue
            if door.session is not None:
                door.session.refuse("4.3.2", "shutting down")
                try:
                    door.sock.send(door.session.output)
                except OSError:
                    pass
            door.sock.close()
        log.info("doorkeeper %d %s", os.getpid(), "handed its connections over" if handing else "stopped")


def _allowed(address: str, networks) -> bool:
    import ipaddress

    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in ipaddress.ip_network(network, strict=False) for network in networks)
