"""A worker's part of an LMTP or SMTP session: one transaction, from the 354 to the replies.

The doorkeeper hands a worker a session whose DATA it accepted (see :mod:`.session`); the
worker asks for the message, reads it (:mod:`.data`), runs it through the very code of a
one-shot run (:class:`ispmailgate_core.run.Gate`, with the server's rule file), answers,
and gives the session back.  LMTP answers once per recipient, with what that recipient got
(RFC 2033): 250 when its result was accepted by the next hop or discarded on purpose, 4xx
when it must wait for a retry, 5xx when it is refused for good -- so one recipient that
waits no longer holds back the others, and the MTA bounces refused ones itself.  SMTP
answers once for the transaction: the one-shot run's exit status (a partial refusal
becomes the gateway's own bounce, a partial deferral defers the transaction).

The connection is lost, or too slow, before the end of the message: nothing runs, and the
MTA still has the message.  A worker killed before it answers: the MTA retries (once the
next hop accepted the message, that retry is the duplicate SMTP and LMTP allow).
"""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path

from ..envelope import usable_address
from ..outcome import Result
from ..rules import BUILT_IN_CONFIG, Config
from ..run import Gate, Request, Streams
from ..status import DONE, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, LOCAL_TROUBLE, TIMED_OUT
from ..text import one_line
from .data import DataReader
from .handoff import Parcel
from .section import ServeSettings

log = logging.getLogger("ispmailgate.serve")

GO_AHEAD = b"354 2.0.0 send the message, end with <CR><LF>.<CR><LF>\r\n"


class ClientGone(Exception):
    """The client went away or fell silent during the message: nothing was run."""


def serve_transaction(parcel: Parcel, config: Config, settings: ServeSettings) -> Parcel | None:
    """Runs the transaction of ``parcel``; the session to give back, or None when it ended."""
    connection, state = parcel.connection, parcel.state
    started = time.monotonic()
    try:
        reader = read_message(connection, state.get("reply", "").encode("latin-1") + GO_AHEAD,
                              parcel.data, config.max_message_size, settings)
    except ClientGone as gone:
        log.warning("%s from %s: %s; nothing was run", state["protocol"].upper(), state["peer"], gone)
        return None
    gate = run_message(reader.message, state["sender"], state["recipients"], config,
                       per_recipient=state["protocol"] == "lmtp")
    replies = (lmtp_replies(gate, state["recipients"], config) if state["protocol"] == "lmtp"
               else [smtp_reply(gate)])
    try:
        connection.sendall(b"".join(replies))
    except OSError as error:
        log.error("%s from %s: could not give the results (%s): the MTA will retry what it "
                  "did not hear about", state["protocol"].upper(), state["peer"], error)
        return None
    log.info("%s from %s: %d recipients, %d bytes: %s ms=%.0f", state["protocol"].upper(), state["peer"],
             len(state["recipients"]), reader.size, b" ".join(r[:3] for r in replies).decode(),
             (time.monotonic() - started) * 1000)
    after = {"protocol": state["protocol"], "helo": state["helo"], "peer": state["peer"], "pid": os.getpid()}
    return Parcel(state["protocol"], connection, after, reader.rest)


def read_message(connection, first: bytes, leftover: bytes, limit: int, settings: ServeSettings) -> DataReader:
    """Says ``first`` (the replies still due, then 354) and reads the message to its end."""
    import socket

    reader = DataReader(limit)
    deadline = time.monotonic() + settings.request_timeout
    try:
        connection.settimeout(settings.data_timeout)
        connection.sendall(first)
        ended = reader.feed(leftover) if leftover else False
        while not ended:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            connection.settimeout(min(settings.data_timeout, left))
            chunk = connection.recv(1 << 18)
            if not chunk:
                raise ClientGone("connection closed in the middle of the message")
            ended = reader.feed(chunk)
    except (TimeoutError, socket.timeout):
        _say(connection, f"421 {TIMED_OUT} timeout while receiving the message\r\n")
        raise ClientGone("timed out in the middle of the message") from None
    except OSError as error:
        raise ClientGone(f"connection lost in the middle of the message: {error}") from None
    return reader


def _say(connection, line: str) -> None:
    try:
        connection.sendall(line.encode())
    except OSError:
        pass


def run_message(data: bytearray, sender: str, recipients: list[str], config: Config,
                per_recipient: bool) -> Gate:
    """The one-shot run's code for one message, with the server's rule file."""
    path = Path(config.path) if config.path != BUILT_IN_CONFIG else None
    request = Request(recipients=list(recipients), sender=sender, config=path, per_recipient=per_recipient)
    gate = Gate(request, Streams(_Stream(data), io.BytesIO(), io.StringIO()), config)
    try:
        gate.run()
    except BaseException as error:      # noqa: BLE001 -- nothing a message does may end the worker
        log.error("internal error: %r", error, exc_info=True)
        if gate.final[0] != EX_OK:
            gate.final = (EX_OK, DONE, "delivered") if gate.delivered else \
                (EX_TEMPFAIL, LOCAL_TROUBLE, f"internal error: {error!r}")
    return gate


class _Stream:
    """The message as the run reads stdin: the buffer itself, in one piece, not a copy."""

    def __init__(self, data: bytearray) -> None:
        self.data = data

    def read(self, size: int = -1) -> bytes | bytearray:
        data, self.data = self.data, bytearray()
        return data


def lmtp_replies(gate: Gate, recipients: list[str], config: Config) -> list[bytes]:
    """One reply per accepted RCPT, in their order (RFC 2033 4.2)."""
    return [_reply(recipient, _result_of(gate, recipient, config)) for recipient in recipients]


def _result_of(gate: Gate, recipient: str, config: Config) -> Result:
    """What the run did for ``recipient`` (which it knows by its canonical form)."""
    try:
        key = usable_address(recipient, config)
    except ValueError:
        key = recipient
    found = gate.results.get(key) or gate.results.get(recipient)
    if found is not None:
        return found
    code, status, text = gate.final         # ended before delivery: the same for everyone
    state = {EX_OK: "sent", EX_UNAVAILABLE: "rejected"}.get(code, "deferred")
    return Result(state, status, text)


def _reply(recipient: str, result: Result) -> bytes:
    status = result.status
    if result.state in ("sent", "discarded", "reported"):
        code, status = 250, status if status.startswith("2.") else DONE
    elif result.state == "rejected":
        status = status if status.startswith("5.") else "5.0.0"
        code = 552 if status in ("5.2.2", "5.2.3", "5.3.4") else 550 if status.startswith(("5.1.", "5.7.")) else 554
    else:
        status = status if status.startswith("4.") else LOCAL_TROUBLE
        code = 452 if status in ("4.2.2", "4.3.1", "4.5.3") else 451
    text = one_line(f"<{recipient}> {result.state}" + (f": {result.text}" if result.text else ""))[:400]
    return f"{code} {status} {text}\r\n".encode("ascii", "backslashreplace")


def smtp_reply(gate: Gate) -> bytes:
    """The one reply of an SMTP transaction: the one-shot run's exit status."""
    code, status, text = gate.final
    if code == EX_OK:
        return f"250 {DONE} ok, id {gate.id}\r\n".encode()
    reply = 554 if code == EX_UNAVAILABLE else 451
    status = status if status[:1] == str(reply)[0] else f"{str(reply)[0]}.0.0"
    return f"{reply} {status} {one_line(text)[:400]}\r\n".encode("ascii", "backslashreplace")
