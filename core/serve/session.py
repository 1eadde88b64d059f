"""The command phase of an LMTP (RFC 2033) or SMTP (RFC 5321) session, without any I/O.

Bytes go in (:meth:`Session.feed`), replies come out (``output``), command by command and
in order, however many commands a client pipelines (RFC 2920), until the client's DATA is
accepted (``ready``: the session, its envelope and whatever followed DATA go to a worker,
which reads the message) or the session ends (``closing``: send ``output``, then close).
The doorkeeper runs this for every connection at once; none of it ever holds a worker.

Every byte is the client's: a command line is at most ``MAX_LINE`` bytes (a longer one is
refused once it ends, and never held in memory), a client that makes ``MAX_ERRORS`` errors
is told goodbye, and the replies a client does not read stop its input (``MAX_OUTPUT``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

MAX_LINE = 2048             # Postfix's line_length_limit: RFC 5321's 512 with room for extensions
MAX_ERRORS = 20             # Postfix's smtpd_hard_error_limit
MAX_OUTPUT = 64 * 1024      # replies not yet read: past this, no more input is taken
MAX_ADDRESS = 1000


class Limits(NamedTuple):
    """What a session may carry, from the rule file and its ``[serve]`` table."""
    hostname: str
    max_message_size: int
    max_recipients: int
    oversize_is_final: bool         # on_oversize = "reject": a too large SIZE is 552, else 452


class Session:
    """One LMTP or SMTP session in its command phase (see the module)."""

    def __init__(self, protocol: str, limits: Limits, peer: str, state: dict[str, Any] | None = None) -> None:
        self.protocol, self.limits, self.peer = protocol, limits, peer
        self.lmtp = protocol == "lmtp"
        self.helo: str | None = (state or {}).get("helo")
        self.output = bytearray()
        self.buffer = bytearray()
        self.errors = 0
        self.overlong = False       # in the middle of a line longer than MAX_LINE
        self.ready = self.closing = False
        self.reset()

    def reset(self) -> None:
        self.sender: str | None = None
        self.recipients: list[str] = []
        self.body = ""

    def state(self) -> dict[str, Any]:
        """What a worker needs to go on with the session, and what comes back from it."""
        return {"protocol": self.protocol, "helo": self.helo, "peer": self.peer,
                "sender": self.sender, "recipients": self.recipients, "body": self.body}

    # -- what the doorkeeper calls -------------------------------------------------------------

    def greet(self) -> None:
        self.reply(220, f"{self.limits.hostname} {'LMTP' if self.lmtp else 'ESMTP'} ispmailgate")

    def refuse(self, status: str, text: str) -> None:
        """421: the session ends now (too many connections, a timeout, shutting down)."""
        self.reply(421, f"{status} {self.limits.hostname} {text}")
        self.closing = True

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while not (self.ready or self.closing) and len(self.output) < MAX_OUTPUT:
            end = self.buffer.find(b"\n", 0, MAX_LINE + 1)
            if end < 0 and len(self.buffer) > MAX_LINE:     # never kept: only its end is waited for
                self.overlong = True
                end = self.buffer.find(b"\n", MAX_LINE + 1)
                if end < 0:
                    del self.buffer[:]
                    return
            elif end < 0:
                return
            line = bytes(self.buffer[:end])
            del self.buffer[:end + 1]
            if self.overlong:
                self.overlong = False
                self.error(500, "5.5.0 line too long")
            else:
                self.command(line[:-1] if line.endswith(b"\r") else line)

    @property
    def wants_input(self) -> bool:
        return not (self.ready or self.closing) and len(self.output) < MAX_OUTPUT

    # -- replies -------------------------------------------------------------------------------

    def reply(self, code: int, text: str, *more: str) -> None:
        lines = [text, *more]
        for number, line in enumerate(lines):
            separator = " " if number == len(lines) - 1 else "-"
            self.output += f"{code}{separator}{line}\r\n".encode("utf-8", "surrogateescape")

    def error(self, code: int, text: str) -> None:
        self.reply(code, text)
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            self.refuse("4.7.0", "too many errors")

    # -- commands ------------------------------------------------------------------------------

    def command(self, line: bytes) -> None:
        verb, _, argument = line.partition(b" ")
        handler = getattr(self, "do_" + verb.decode("ascii", "replace").upper(), None) \
            if verb.isalpha() and len(verb) <= 8 else None
        if handler is None:
            self.error(500, "5.5.2 command not recognized")
        elif any(byte < 32 and byte != 9 or byte == 127 for byte in argument):
            self.error(501, "5.5.2 control characters in the command")
        else:
            try:
                text = argument.decode("utf-8")
            except UnicodeDecodeError:
                self.error(501, "5.5.2 the command is not valid UTF-8")
                return
            handler(text.strip(" \t"))

    def do_LHLO(self, argument: str) -> None:
        if not self.lmtp:
            return self.error(500, "5.5.1 this is an SMTP service: use EHLO")
        self.hello(argument, extended=True)

    def do_EHLO(self, argument: str) -> None:
        if self.lmtp:
            return self.error(500, "5.5.1 this is an LMTP service: use LHLO")
        self.hello(argument, extended=True)

    def do_HELO(self, argument: str) -> None:
        if self.lmtp:
            return self.error(500, "5.5.1 this is an LMTP service: use LHLO")
        self.hello(argument, extended=False)

    def hello(self, name: str, extended: bool) -> None:
        if not name or " " in name:
            return self.error(501, "5.5.4 a hostname, please")
        self.helo = name[:255]
        self.reset()
        if not extended:
            return self.reply(250, self.limits.hostname)
        self.reply(250, self.limits.hostname, "PIPELINING", f"SIZE {self.limits.max_message_size}",
                   "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES")

    def do_MAIL(self, argument: str) -> None:
        if self.helo is None:
            return self.error(503, f"5.5.1 send {'LHLO' if self.lmtp else 'EHLO'} first")
        if self.sender is not None:
            return self.error(503, "5.5.1 nested MAIL command")
        parsed = _path(argument, "FROM:")
        if parsed is None:
            return self.error(501, "5.5.4 syntax: MAIL FROM:<address>")
        address, parameters = parsed
        problem = self._mail_parameters(parameters)
        if problem:
            return self.error(*problem)
        self.sender = address
        self.reply(250, "2.1.0 ok")

    def _mail_parameters(self, parameters: list[str]) -> tuple[int, str] | None:
        for parameter in parameters:
            key, has_value, value = parameter.partition("=")
            key = key.upper()
            if key == "SIZE" and value.isdigit() and len(value) < 20:
                if int(value) > self.limits.max_message_size:
                    return (552, "5.3.4 message size exceeds the fixed limit") if self.limits.oversize_is_final \
                        else (452, "4.3.4 message size exceeds the fixed limit")
            elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
                self.body = value.upper()
            elif key == "SMTPUTF8" and not has_value:
                pass
            else:
                return 555, f"5.5.4 unsupported parameter {parameter[:60]}"
        return None

    def do_RCPT(self, argument: str) -> None:
        if self.sender is None:
            return self.error(503, "5.5.1 need MAIL first")
        parsed = _path(argument, "TO:")
        if parsed is None or not parsed[0]:
            return self.error(501, "5.5.4 syntax: RCPT TO:<address>")
        address, parameters = parsed
        if parameters:
            return self.error(555, f"5.5.4 unsupported parameter {parameters[0][:60]}")
        if len(self.recipients) >= self.limits.max_recipients:
            return self.reply(452, "4.5.3 too many recipients")
        self.recipients.append(address)
        self.reply(250, "2.1.5 ok")

    def do_DATA(self, argument: str) -> None:
        if argument:
            return self.error(501, "5.5.4 syntax: DATA")
        if not self.recipients:
            return self.error(503, "5.5.1 no valid recipients")
        self.ready = True           # the worker that takes the session says 354

    def do_RSET(self, argument: str) -> None:
        self.reset()
        self.reply(250, "2.0.0 ok")

    def do_NOOP(self, argument: str) -> None:
        self.reply(250, "2.0.0 ok")

    def do_QUIT(self, argument: str) -> None:
        self.reply(221, f"2.0.0 {self.limits.hostname} closing connection")
        self.closing = True

    def do_VRFY(self, argument: str) -> None:
        self.reply(252, "2.5.2 cannot VRFY, but will take the message")

    def do_HELP(self, argument: str) -> None:
        self.reply(214, f"2.0.0 commands: {'LHLO' if self.lmtp else 'EHLO HELO'} MAIL RCPT DATA RSET NOOP QUIT")

    def do_STARTTLS(self, argument: str) -> None:
        self.error(502, "5.5.1 not implemented")

    do_AUTH = do_BDAT = do_ETRN = do_EXPN = do_TURN = do_STARTTLS


def _path(argument: str, keyword: str) -> tuple[str, list[str]] | None:
    """(address, parameters) of ``FROM:<address> PARAM...`` (or TO:); None if malformed.

    The address as the client wrote it between the angle brackets (a quoted local part may
    hold any of them), without a source route (RFC 5321 4.1.1.3: ignored); "" for <>."""
    if argument[:len(keyword)].upper() != keyword:
        return None
    rest = argument[len(keyword):].lstrip(" ")
    if not rest.startswith("<"):            # no brackets: Postfix takes the word, and so do we
        address, _, parameters = rest.partition(" ")
        return (address, parameters.split()) if address and len(address) <= MAX_ADDRESS else None
    end = _closing_bracket(rest)
    if end is None or end > MAX_ADDRESS:
        return None
    address, parameters = rest[1:end], rest[end + 1:]
    if parameters and not parameters.startswith(" "):
        return None
    if address.startswith("@") and ":" in address:
        address = address.split(":", 1)[1]
    return address, parameters.split()


def _closing_bracket(text: str) -> int | None:
    quoted = escaped = False
    for index, character in enumerate(text[1:], 1):
        if escaped:
            escaped = False
        elif character == "\\":
            escaped = True
        elif character == '"':
            quoted = not quoted
        elif character == ">" and not quoted:
            return index
        elif character == "<" and not quoted:
            return None
    return None
