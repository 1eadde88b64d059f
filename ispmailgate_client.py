"""ispmailgate-client: hands one message to a running ``ispmailgate serve``.

    ispmailgate-client [--socket PATH] [--fallback oneshot|tempfail] [--deadline SECONDS]
                       [ispmailgate arguments] < message

The MTA runs this where it would run ``ispmailgate``: every argument after the client's
own leading options goes to a server worker unparsed, with the message, our working
directory and $ISPMAILGATE_CONFIG, and the worker answers with what a one-shot run started
here would have written to stdout and stderr and its exit status.  The client starts fast
because it imports almost nothing (no typer, no email package); keep it that way.  When
the server cannot be reached, or no worker takes the request within the deadline, it runs
the one-shot ``ispmailgate`` with the same arguments and the untouched stdin, or exits 75,
as configured: the message is never lost, and never handled twice (once a worker has taken
it, the client waits for its result); either way it logs why (syslog and the rule file's
log_file), as the administrator would otherwise never know that the server is not used.
The wire protocol is described in docs/protocol.md.
"""

import os
import sys

DEFAULT_SOCKET = "/run/ispmailgate/ispmailgate.sock"
# Copies of the core's (ispmailgate_core.rules, .status), which this module must not import
# (tests/test_layout.py holds them equal).
DEFAULT_CONFIG_PATH = "/etc/ispmailgate/ispmailgate.toml"
EX_TEMPFAIL, LOCAL_TROUBLE = 75, "4.3.0"
CONFIG_VARIABLE = "ISPMAILGATE_CONFIG"                       # what -c defaults to
FALLBACKS = ("oneshot", "tempfail")
DEFAULT_DEADLINE = 10.0         # seconds for a worker to take the request, else the fallback

# The wire protocol, shared with the server (ispmailgate_core.serve).
PROTOCOL_VERSION = 4                               # what a client sends
PROTOCOL_VERSIONS = (1, 2, 3, 4)                   # what either side reads
CONTEXT, ARGUMENTS, DATA, END = b"C", b"A", b"D", b"."      # client -> server frames
STDOUT, STDERR, EXIT = b"O", b"E", b"X"            # server -> client frames
DECLINED = 0                # the server's first byte (protocol 4): "run it yourself" (then an E frame)
MAX_FRAME = 2 << 20                                # bytes of payload in one frame
CHUNK = 1 << 16


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    """One frame: kind byte, payload length (4 bytes, big-endian), payload."""
    return kind + len(payload).to_bytes(4, "big") + payload


def encode_arguments(args: list[str]) -> bytes:
    """Each argument NUL-terminated, as the bytes the kernel gave us (like the C wrapper)."""
    return b"".join(os.fsencode(arg) + b"\0" for arg in args)


def encode_context() -> bytes:
    """Where a one-shot run would resolve relative paths: our working directory and its
    device:inode (so the server can tell it sees the same one), then $ISPMAILGATE_CONFIG
    if it is set (nothing else from the environment), each NUL-terminated."""
    try:
        here = os.stat(".")
        context = b"%s\0%d:%d\0" % (os.getcwdb(), here.st_dev, here.st_ino)
    except OSError:         # removed, or we cannot search it: relative paths resolve nowhere
        context = b"\0\0"
    config = os.environ.get(CONFIG_VARIABLE)
    if config:              # empty counts as unset, as for the one-shot command line parser
        context += os.fsencode(f"{CONFIG_VARIABLE}={config}") + b"\0"
    return context


def main() -> int:
    """Entry point: ``ispmailgate-client`` (bin/ispmailgate-client starts it)."""
    import time         # built in: nothing to load

    socket_path, fallback, deadline, args = client_options(sys.argv[1:])
    until = time.monotonic() + deadline
    try:
        connection = connect(socket_path, deadline)
    except OSError as error:
        return fall_back(fallback, args, f"cannot reach the server at {socket_path}: "
                                         f"{error.strerror or error}")
    try:
        taken = hand_over(connection, args, until)
    except OSError as error:    # no worker took the request: it was not run, stdin is untouched
        connection.close()
        why = f"within {deadline:g} s" if isinstance(error, TimeoutError) else f"({error.strerror or error})"
        return fall_back(fallback, args, f"no worker of the server at {socket_path} took the message {why}")
    if taken == DECLINED:       # not run: this user's request is for the one-shot run
        reason = declined_because(connection)
        connection.close()
        return fall_back(fallback, args, f"the server at {socket_path} does not run this request: {reason}")
    try:
        if taken == PROTOCOL_VERSION:
            send_message(connection)
        return relay_reply(connection, taken)
    finally:
        connection.close()


def declined_because(connection) -> str:
    """The reason a server gives when it declines (one E frame); what it can read of it."""
    try:
        reader = Reader(connection)
        kind, length = reader.exactly(1), int.from_bytes(reader.exactly(4), "big")
        if kind == STDERR and length <= 4096:
            return reader.exactly(length).decode("utf-8", "backslashreplace").strip()
    except (OSError, EOFError):
        pass
    return "(no reason given)"


def client_options(argv: list[str]) -> tuple[str, str | None, float, list[str]]:
    """The client's own options, only in front; everything after belongs to ispmailgate."""
    socket_path = os.environ.get("ISPMAILGATE_SOCKET") or DEFAULT_SOCKET
    fallback = os.environ.get("ISPMAILGATE_FALLBACK") or None
    deadline = seconds(os.environ.get("ISPMAILGATE_DEADLINE"))
    while argv:
        name, has_value, value = argv[0].partition("=")
        if name not in ("--socket", "--fallback", "--deadline"):
            break
        if not has_value:
            if len(argv) < 2:
                break
            value, argv = argv[1], argv[1:]
        argv = argv[1:]
        if name == "--socket":
            socket_path = value
        elif name == "--fallback":
            fallback = value
        else:
            deadline = seconds(value)
    return socket_path, fallback, deadline, argv


def seconds(value: str | None) -> float:
    """A deadline in seconds; anything but a positive number gives the default."""
    try:
        number = float(value or DEFAULT_DEADLINE)
    except ValueError:
        return DEFAULT_DEADLINE
    return number if 0 < number < 86400 else DEFAULT_DEADLINE


def connect(path: str, timeout: float):
    import _socket      # the C module: socket.py would pull in enum and selectors

    connection = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        connection.settimeout(timeout)
        connection.connect(path)
    except OSError:
        connection.close()
        raise
    return connection


def hand_over(connection, args: list[str], until: float) -> int:
    """Send the head of the request (context and arguments, no byte of stdin) and wait, until
    ``until``, for the server's first byte: a worker's acknowledgement (our version), or
    the start of a refusal.  An OSError (a timeout, a hang-up) means no worker took it."""
    import time

    connection.settimeout(max(until - time.monotonic(), 0.001))
    connection.sendall(bytes([PROTOCOL_VERSION]) + frame(CONTEXT, encode_context())
                       + frame(ARGUMENTS, encode_arguments(args)))
    connection.settimeout(max(until - time.monotonic(), 0.001))
    first = connection.recv(1)
    if not first:
        raise ConnectionResetError("it closed the connection before a worker took the message")
    connection.settimeout(None)         # taken: the server's own timeouts rule from here
    return first[0]


def send_message(connection) -> None:
    """Stdin in chunks, then the end frame; stops early when the server has answered.

    The server answers before the end of the message when it needs no message (--help,
    a usage error) or refuses it (too large): then the rest is not sent.
    """
    import select

    try:
        while True:
            readable, _, _ = select.select([0, connection], [], [])
            if connection in readable:
                return
            chunk = os.read(0, CHUNK)
            if not chunk:
                connection.sendall(frame(END))
                return
            connection.sendall(frame(DATA, chunk))
    except OSError:
        return          # the server closed early; its answer, if any, is still readable


def relay_reply(connection, version: int) -> int:
    """Copies stdout and stderr frames to ours; the exit frame ends the reply.  ``version``,
    its first byte, came already (an old server's refusal is relayed too)."""
    reader = Reader(connection)
    if version not in PROTOCOL_VERSIONS:
        return tempfail("the server speaks another protocol version")
    try:
        while True:
            kind, length = reader.exactly(1), int.from_bytes(reader.exactly(4), "big")
            if length > MAX_FRAME:
                return tempfail("malformed reply from the server")
            payload = reader.exactly(length)
            if kind == EXIT and length == 1:
                return payload[0]
            if kind not in (STDOUT, STDERR):
                return tempfail("malformed reply from the server")
            write_all(1 if kind == STDOUT else 2, payload)
    except EOFError:
        return tempfail("the server closed the connection before the result; "
                        "the message stays with the MTA")
    except OSError as error:
        return tempfail(f"lost the connection to the server: {error.strerror or error}")


class Reader:
    def __init__(self, connection) -> None:
        self.connection = connection

    def exactly(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self.connection.recv(min(size - len(data), 1 << 20))
            if not chunk:
                raise EOFError
            data += chunk
        return bytes(data)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def tempfail(text: str) -> int:
    """The status line the MTA quotes, like ispmailgate's own."""
    try:
        write_all(2, f"{LOCAL_TROUBLE} ispmailgate-client: {text}\n".encode())
    except OSError:
        pass
    return EX_TEMPFAIL


def fall_back(fallback: str | None, args: list[str], reason: str) -> int:
    """Server unreachable: the one-shot run on the same stdin (nothing was read), or 75."""
    rules = rule_file(args)
    mode = fallback or configured_fallback(rules)
    if mode not in FALLBACKS:
        log_fallback(f"{reason}; unknown fallback {mode!r}: deferring the message", rules)
        return tempfail(f"{reason}; unknown fallback {mode!r} (oneshot or tempfail)")
    if mode == "tempfail":
        log_fallback(f"{reason}; deferring the message (fallback = tempfail)", rules)
        return tempfail(reason)
    log_fallback(f"{reason}; running the one-shot ispmailgate instead (fallback = oneshot)", rules)
    # -P: never import an ispmailgate.py that happens to lie in the current directory.
    # ispmailgate_start, as the console script: a broken installation still exits 75.
    command = [sys.executable, "-P", "-c", "import sys, ispmailgate_start; sys.exit(ispmailgate_start.main())",
               *args]
    try:
        os.execv(sys.executable, command)
    except OSError as error:
        return tempfail(f"{reason}; cannot run the one-shot ispmailgate: {error.strerror}")
    return EX_TEMPFAIL      # not reached


def rule_file(args: list[str]) -> dict:
    """The rule file the run would read, parsed: only on this rare path.  {} if it cannot
    be read: the one-shot run reports a broken rule file itself (and exits 75)."""
    path = config_argument(args) or os.environ.get(CONFIG_VARIABLE) or DEFAULT_CONFIG_PATH
    try:
        import tomllib

        with open(path, "rb") as stream:
            return tomllib.load(stream)
    except (OSError, ValueError):
        return {}


def configured_fallback(rules: dict) -> str:
    """``[serve] fallback`` of the rule file."""
    serve = rules.get("serve")
    value = serve.get("fallback", "oneshot") if isinstance(serve, dict) else "oneshot"
    return value if isinstance(value, str) else "oneshot"


def log_fallback(text: str, rules: dict) -> None:
    """Where the administrator looks: syslog (the rule file's facility) and its log_file.
    Never stderr: the one-shot run's status line must stay the first line the MTA reads."""
    if "Permission denied" in text:
        text += "; the socket's group must be one of this user's groups (serve.socket_group)"
    facility, log_file = rules.get("facility", "mail"), rules.get("log_file", "")
    try:
        import syslog

        code = getattr(syslog, f"LOG_{facility.upper()}", syslog.LOG_MAIL) if isinstance(facility, str) \
            else syslog.LOG_MAIL
        syslog.openlog("ispmailgate-client", syslog.LOG_PID, code)
        syslog.syslog(syslog.LOG_WARNING, text.replace("\0", "\\0"))
        syslog.closelog()
    except (ImportError, OSError, ValueError):
        pass
    if isinstance(log_file, str) and log_file not in ("", "-"):
        import time

        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            with open(log_file, "a", encoding="utf-8", errors="backslashreplace") as stream:
                stream.write(f"{stamp},000 ispmailgate-client[{os.getpid()}]: {text}\n")
        except (OSError, ValueError):
            pass


def config_argument(args: list[str]) -> str | None:
    """The value of ``-c``/``--config`` among ispmailgate's arguments (before ``--``), if any."""
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg in ("-c", "--config"):
            return args[i + 1] if i + 1 < len(args) else None
        if arg.startswith("--config="):
            return arg.removeprefix("--config=")
        if arg.startswith("-c") and not arg.startswith("--"):
            return arg[2:]
    return None


if __name__ == "__main__":
    sys.exit(main())
