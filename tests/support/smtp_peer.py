"""A next hop that says exactly what a test scripts: a misbehaving SMTP server.

aiosmtpd is a correct server and cannot answer DATA with 250, send 121-line replies to
EHLO or talk out of turn; this one answers each step with the bytes a test gives it
(several lines, garbage, nothing) and records what the client sent, so a test can tell
whether a message body went out.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

NORMAL = {
    "greeting": b"220 peer.test ESMTP\r\n",
    "EHLO": b"250-peer.test\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n",
    "HELO": b"250 peer.test\r\n",
    "MAIL": b"250 2.1.0 ok\r\n",
    "RCPT": b"250 2.1.5 ok\r\n",
    "DATA": b"354 go ahead\r\n",
    ".": b"250 2.0.0 queued\r\n",
    "RSET": b"250 2.0.0 ok\r\n",
    "QUIT": b"221 2.0.0 bye\r\n",
}


@dataclass
class Connection:
    """What the client sent on one connection: its command lines, and each message body."""
    commands: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)


class ScriptedPeer:
    """``ScriptedPeer({"DATA": b"250 ok\\r\\n"})``: normal replies except where scripted.

    A scripted reply is sent as given.  ``rcpt`` maps an address (as sent) to its reply;
    past ``max_recipients`` in one transaction, RCPT gets 452 as from Postfix.
    The peer enters the data phase only after a reply to DATA that starts with "3", as a
    real server would; if it did not, whatever the client sends next is read as commands.
    """

    def __init__(self, script: dict[str, bytes] | None = None,
                 rcpt: dict[str, bytes] | None = None, max_recipients: int = 0) -> None:
        self.script = {**NORMAL, **(script or {})}
        self.rcpt = rcpt or {}
        self.max_recipients = max_recipients
        self.connections: list[Connection] = []
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def messages(self) -> list[bytes]:
        return [message for connection in self.connections for message in connection.messages]

    def close(self) -> None:
        try:
            self.server.shutdown(socket.SHUT_RDWR)      # wakes the accept() of the thread
        except OSError:
            pass
        self.server.close()
        self.thread.join(5)

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            record = Connection()
            self.connections.append(record)        # in the order they came
            threading.Thread(target=self._serve_one, args=(client, record), daemon=True).start()

    def _serve_one(self, client: socket.socket, record: Connection) -> None:
        """One connection, beside the others (a client may hold one open while it opens the next)."""
        with client:
            client.settimeout(10)
            try:
                self._converse(client, record)
            except OSError:
                pass

    def _converse(self, client: socket.socket, record: Connection) -> None:
        reader = client.makefile("rb")
        client.sendall(self.script["greeting"])
        taken = 0
        while line := reader.readline():
            record.commands.append(line)
            verb = line.split(b":")[0].split(b" ")[0].strip().upper().decode("ascii", "replace")
            if verb == "RCPT":
                address = line.split(b"<", 1)[-1].split(b">", 1)[0].decode()
                reply = self.rcpt.get(address, self.script["RCPT"])
                if self.max_recipients and taken >= self.max_recipients:
                    reply = b"452 4.5.3 Error: too many recipients\r\n"
                taken += reply.startswith(b"2")
            else:
                reply = self.script.get(verb, b"500 5.5.2 unknown command\r\n")
            client.sendall(reply)
            if verb == "DATA" and reply.startswith(b"3"):
                record.messages.append(self._data(reader))
                client.sendall(self.script["."])
            if verb == "QUIT":
                return

    @staticmethod
    def _data(reader) -> bytes:
        lines = []
        while (line := reader.readline()) not in (b".\r\n", b""):
            lines.append(line[1:] if line.startswith(b"..") else line)
        return b"".join(lines)
