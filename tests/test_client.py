"""ispmailgate-client and the wire protocol: bad requests, an absent server, start-up cost."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from conftest import CORPUS, PLUGINS, PROJECT, crlf, run_gate
from ispmailgate_client import (ARGUMENTS, CONTEXT, DATA, END, MAX_FRAME, PROTOCOL_VERSION, client_options, encode_arguments,
                                encode_context, frame)
from support.prepared import e2e_gate
from support.serving import CLIENT, Server, client_env, drain, run_client, shared_folder
from support.serving import python, sink  # noqa: F401  (fixtures)

SIMPLE = (CORPUS / "plain.eml").read_bytes()
MBOX = (CORPUS / "mbox-forward.eml").read_bytes()


def test_client_options_come_first_and_everything_else_is_forwarded(monkeypatch):
    monkeypatch.delenv("ISPMAILGATE_SOCKET", raising=False)
    monkeypatch.delenv("ISPMAILGATE_FALLBACK", raising=False)
    monkeypatch.delenv("ISPMAILGATE_DEADLINE", raising=False)
    assert client_options(["--socket", "/s", "--fallback=tempfail", "-f", "a", "--socket", "x"]) == \
        ("/s", "tempfail", 10.0, ["-f", "a", "--socket", "x"])
    assert client_options(["--", "--socket"]) == ("/run/ispmailgate/ispmailgate.sock", None, 10.0,
                                                  ["--", "--socket"])
    assert client_options(["--deadline", "2.5", "--deadline=x", "-f"])[2:] == (10.0, ["-f"])
    assert client_options(["--deadline=0.5", "-f"])[2] == 0.5
    assert client_options(["--socket", "/s", "--originating", "-f", "a", "b"])[3] == \
        ["--originating", "-f", "a", "b"]       # serve's worker gets the flag as one-shot would
    monkeypatch.setenv("ISPMAILGATE_SOCKET", "/env.sock")
    monkeypatch.setenv("ISPMAILGATE_DEADLINE", "3")
    assert client_options(["-f", "a"])[::2] == ("/env.sock", 3.0)


def test_arguments_travel_as_nul_terminated_bytes():
    assert encode_arguments([]) == b""
    assert encode_arguments(["", "-f", "ä"]) == b"\0-f\0\xc3\xa4\0"


def test_the_context_is_the_directory_and_only_ispmailgate_config(monkeypatch, tmp_path):
    here = tmp_path / "wörk"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setenv("ISPMAILGATE_CONFIG", "rules.toml")
    monkeypatch.setenv("PATH", "/elsewhere")
    directory = os.fsencode(here) + b"\0%d:%d\0" % (here.stat().st_dev, here.stat().st_ino)
    assert encode_context() == directory + b"ISPMAILGATE_CONFIG=rules.toml\0"
    monkeypatch.setenv("ISPMAILGATE_CONFIG", "")          # empty is unset, as for the parser
    assert encode_context() == directory
    here.rmdir()                                            # removed under us: no directory
    monkeypatch.delenv("ISPMAILGATE_CONFIG")
    assert encode_context() == b"\0\0"


# -- malformed, oversize and slow requests ------------------------------------------------

@pytest.fixture(scope="module")
def strict_server(python, sink):  # noqa: F811
    config = (f'mail_host = "{sink.address}"\n[serve]\nworkers = 1\nread_timeout = 1\nhead_timeout = 1\n'
              'request_timeout = 4\nmax_request_size = "64K"\n')
    with Server(python, config) as server:
        yield server


def exchange(path, data: bytes, *, close_early: bool = False) -> tuple[int | None, bytes]:
    """Sends raw bytes, reads the whole reply: (exit status or None, stderr frames)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(60)
        connection.connect(str(path))
        try:
            connection.sendall(data)
        except OSError:
            pass
        if close_early:
            return None, b""
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    assert reply[:1] in (b"\x01", b"\x02"), reply
    position, stderr, status = 1, b"", None
    while position < len(reply):
        kind, length = reply[position:position + 1], int.from_bytes(reply[position + 1:position + 5], "big")
        payload = reply[position + 5:position + 5 + length]
        position += 5 + length
        if kind == b"E":
            stderr += payload
        elif kind == b"X":
            status = payload[0]
    return status, stderr


ARGS = encode_arguments(["-f", "a@b.example", "c@d.example"])
HERE = frame(CONTEXT, b"/\0%d:%d\0" % (os.stat("/").st_dev, os.stat("/").st_ino))
BAD_REQUESTS = [                # most in protocol 1, which old clients still speak
    (b"\x05" + HERE + frame(ARGUMENTS, ARGS), "bad request: unsupported protocol version 5 (this server "
                                             "speaks 1 and 2 and 3 and 4)"),
    (b"\x02" + frame(ARGUMENTS, ARGS), "bad request: expected the context frame first"),
    (b"\x02" + frame(CONTEXT, b"/\x001:2") + frame(ARGUMENTS, ARGS), "bad request: malformed context frame"),
    (b"\x02" + frame(CONTEXT, b"/\0") + frame(ARGUMENTS, ARGS), "bad request: malformed context frame"),
    (b"\x02" + frame(CONTEXT, b"tmp\x001:2\0") + frame(ARGUMENTS, ARGS),
     "bad request: the context frame's working directory is not an absolute path and a device:inode: "
     "'tmp' '1:2'"),
    (b"\x02" + frame(CONTEXT, b"/tmp\0\0") + frame(ARGUMENTS, ARGS),
     "bad request: the context frame's working directory is not an absolute path and a device:inode"),
    (b"\x02" + frame(CONTEXT, b"\0\0PATH=/tmp\0") + frame(ARGUMENTS, ARGS),
     "bad request: the context frame carries PATH (only ISPMAILGATE_CONFIG, once)"),
    (b"\x02" + frame(CONTEXT, b"\0\0ISPMAILGATE_CONFIG=a\0ISPMAILGATE_CONFIG=b\0") + frame(ARGUMENTS, ARGS),
     "bad request: the context frame carries ISPMAILGATE_CONFIG, ISPMAILGATE_CONFIG"),
    (b"\x02" + HERE + frame(DATA, b"x"), "bad request: expected the argument frame next"),
    (b"GET / HTTP/1.0\r\n\r\n", "bad request: unsupported protocol version 71"),
    (b"\x01" + frame(DATA, b"x"), "bad request: expected the argument frame first"),
    (b"\x01" + frame(ARGUMENTS, b"-f\0a@b"), "bad request: expected the argument frame first"),
    (b"\x01A" + (MAX_FRAME + 1).to_bytes(4, "big"), f"bad request: frame of {MAX_FRAME + 1} bytes"),
    (b"\x01" + frame(ARGUMENTS, ARGS) + frame(b"Q", b"?"), "cannot read the message: unexpected frame b'Q'"),
    (b"\x01" + frame(ARGUMENTS, ARGS) + frame(DATA, b"x" * 40000) * 2,
     "request larger than serve.max_request_size (65536 bytes)"),
    (b"\x01" + frame(ARGUMENTS, ARGS)[:3], "bad request: the client sent no complete request head within 1 s"),
    (b"\x01" + frame(ARGUMENTS, ARGS) + frame(DATA, b"Subject: slow\n\n"),
     "cannot read the message: the client sent nothing for 1 s"),
    (b"", "bad request: the client sent no complete request head within 1 s"),
    (b"\x02" + HERE, "bad request: the client sent no complete request head within 1 s"),
]


@pytest.mark.parametrize("data, complaint", BAD_REQUESTS)
def test_a_bad_request_gets_an_error_reply_and_the_worker_goes_on(strict_server, sink, data, complaint):  # noqa: F811
    [worker] = strict_server.workers()
    status, stderr = exchange(strict_server.socket, data)
    assert status == 75
    assert stderr.startswith(b"4.3.0 ") and complaint.encode() in stderr, stderr
    run = strict_server.client(["-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 0, run.stderr
    assert [m.content for m in drain(sink)] == [crlf(SIMPLE)]
    assert strict_server.workers() == {worker}


def test_a_protocol_1_client_is_still_served(strict_server, sink):  # noqa: F811
    """What an old client sends: no context, and a reply of its own version."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(60)
        connection.connect(str(strict_server.socket))
        connection.sendall(b"\x01" + frame(ARGUMENTS, ARGS) + frame(DATA, SIMPLE) + frame(END))
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    assert reply == b"\x01" + frame(b"X", b"\0")
    assert [m.content for m in drain(sink)] == [crlf(SIMPLE)]


def test_a_client_that_hangs_up_does_not_hurt_the_worker(strict_server, sink):  # noqa: F811
    [worker] = strict_server.workers()
    for data in (b"", b"\x01", b"\x01" + frame(ARGUMENTS, ARGS) + frame(DATA, SIMPLE[:100])):
        exchange(strict_server.socket, data, close_early=True)
    assert strict_server.client(["--version"], b"").code == 0
    assert drain(sink) == [] and strict_server.workers() == {worker}


def test_an_oversize_message_through_the_client_is_a_tempfail(strict_server, sink):  # noqa: F811
    run = strict_server.client(["-f", "a@b.example", "c@d.example"], SIMPLE * 100)
    assert run.code == 75
    assert run.first_line.startswith("4.3.0 cannot read the message: request larger than "
                                     "serve.max_request_size")
    assert drain(sink) == []


def test_the_server_answers_before_the_message_when_it_needs_none(strict_server):
    """--help on a terminal-like stdin that never ends: the answer comes anyway."""
    process = subprocess.Popen([str(CLIENT), "--socket", str(strict_server.socket), "--help"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=client_env())
    try:
        assert process.wait(timeout=60) == 0        # stdin still open: nothing was waited for
        assert b"Usage: ispmailgate" in process.stdout.read()
    finally:
        process.stdin.close()
        process.kill()


# -- idle connections and the client's deadline --------------------------------------------------

@pytest.fixture(scope="module")
def patient_server(python, sink):  # noqa: F811
    """One worker, and a minute for every wait: only the doorway keeps idle clients off it."""
    config = (f'mail_host = "{sink.address}"\n[serve]\nworkers = 1\nhead_timeout = 60\n'
              'read_timeout = 60\n')
    with Server(python, config) as server:
        yield server


def idle_connections(path, heads: list[bytes]) -> list[socket.socket]:
    """Connections that send ``heads`` (b"": nothing) and then nothing more."""
    connections = []
    for head in heads:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(str(path))
        connection.sendall(head)
        connections.append(connection)
    return connections


def test_idle_connections_never_hold_the_worker(patient_server, sink):  # noqa: F811
    """Four silent connections and two with half a head, one worker: a client is served at once,
    while they still wait (before, each held the worker for read_timeout)."""
    idle = idle_connections(patient_server.socket, [b""] * 4 + [b"\x02", b"\x02" + HERE])
    try:
        for _ in range(2):
            run = patient_server.client(["--deadline", "30", "-f", "a@b.example", "c@d.example"], SIMPLE,
                                        timeout=50)
            assert run.code == 0, run.stderr
        assert [m.content for m in drain(sink)] == [crlf(SIMPLE)] * 2
        for connection in idle:                 # still open, nothing answered: they are waiting
            connection.setblocking(False)
            with pytest.raises(BlockingIOError):
                connection.recv(1)
    finally:
        for connection in idle:
            connection.close()


@pytest.mark.parametrize("fallback, code", [("oneshot", 0), ("tempfail", 75)])
def test_a_client_no_worker_takes_follows_its_fallback_after_its_deadline(config_file, fallback, code):
    """A server that accepts nothing (all workers busy, or stuck): after --deadline the client
    runs the one-shot command on the untouched stdin, or defers."""
    path = shared_folder() / "busy.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as busy:
        busy.bind(str(path))
        busy.listen(8)                  # connections queue, nobody takes them
        args = ["--deadline", "1", "--fallback", fallback, "-c", str(config_file()), "--stdout",
                "-f", "a@b.example", "c@d.example"]
        run = run_client(path, args, SIMPLE, timeout=50)
        taken, _ = busy.accept()        # what it sent: the head, never a byte of the message
        taken.settimeout(5)
        head = b""
        while chunk := taken.recv(65536):
            head += chunk
        taken.close()
    assert run.code == code
    assert run.stdout == (SIMPLE if code == 0 else b"")
    if code == 75:
        assert run.first_line == f"4.3.0 ispmailgate-client: no worker of the server at {path} took the " \
                                 "message within 1 s"
    assert head.startswith(bytes([PROTOCOL_VERSION]) + CONTEXT) and DATA + len(SIMPLE[:1]).to_bytes(4, "big") not in head
    assert frame(END) not in head


def test_a_request_given_up_by_its_client_is_never_run_as_well(patient_server, sink):  # noqa: F811
    """The worker is busy; the client falls back to the one-shot run; when the worker comes to
    the abandoned request it finds nobody to acknowledge and runs nothing: delivered once."""
    stall = idle_connections(patient_server.socket, [b"\x02" + HERE + frame(ARGUMENTS, ARGS)
                                                     + frame(DATA, b"Subject: slow\n")])
    try:
        config = patient_server.config
        run = patient_server.client(["--deadline", "1", "-c", str(config), "-f", "a@b.example",
                                     "c@d.example"], SIMPLE, timeout=50)
        assert run.code == 0, run.stderr            # by the one-shot run
        assert [m.content for m in drain(sink)] == [crlf(SIMPLE)]
    finally:
        stall[0].close()                            # the worker is free again ...
    run = patient_server.client(["--deadline", "30", "-f", "a@b.example", "c@d.example"], SIMPLE, timeout=50)
    assert run.code == 0, run.stderr                # ... and has passed the abandoned request by
    assert [m.content for m in drain(sink)] == [crlf(SIMPLE)]
    assert "the client left before its request was taken" in patient_server.log()


# -- the server is not there ---------------------------------------------------------------------

def absent_socket() -> str:
    return str(shared_folder() / "nobody-listens.sock")


def test_server_absent_falls_back_to_the_one_shot_run(config_file, smtp_sink):
    config = config_file(f'mail_host = "{smtp_sink.address}"\n')
    args = ["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"]
    run = run_client(absent_socket(), args, MBOX)
    assert (run.code, run.stdout, run.stderr) == (0, MBOX, "")
    run = run_client(absent_socket(), ["-c", str(config), "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 0, run.stderr
    assert [m.content for m in smtp_sink.messages] == [crlf(SIMPLE)]


def test_every_fallback_is_logged_with_its_reason_never_on_stderr(config_file, smtp_sink, tmp_path):
    config = config_file(f'mail_host = "{smtp_sink.address}"\n')
    socket_path = absent_socket()
    run = run_client(socket_path, ["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert (run.code, run.stdout, run.stderr) == (0, SIMPLE, "")
    [line] = [line for line in (tmp_path / "gate.log").read_text().splitlines() if "ispmailgate-client[" in line]
    assert line.endswith(f": cannot reach the server at {socket_path}: No such file or directory; "
                         "running the one-shot ispmailgate instead (fallback = oneshot)")
    run = run_client(socket_path, ["--fallback", "tempfail", "-c", str(config), "-f", "a@b.example", "c@d"],
                     SIMPLE)
    assert run.code == 75
    assert (tmp_path / "gate.log").read_text().splitlines()[-1].endswith(
        "No such file or directory; deferring the message (fallback = tempfail)")


def test_a_socket_the_user_may_not_use_is_logged_with_what_to_do():
    import pwd

    folder = shared_folder()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(folder / "root-only.sock"))
        server.listen(1)
        os.chmod(folder / "root-only.sock", 0o600)
        log = folder / "client.log"
        rules = folder / "rules.toml"
        rules.write_text(f'log_file = "{log}"\ntmp_dir = "{folder}"\n')
        rules.chmod(0o644)
        nobody = pwd.getpwnam("nobody")
        client = e2e_gate().parent / "ispmailgate-client"      # a client the user nobody can run
        process = subprocess.run([str(client), "--socket", str(folder / "root-only.sock"), "--fallback",
                                  "tempfail", "-c", str(rules), "-f", "a@b.example", "c@d.example"],
                                 input=SIMPLE, capture_output=True, env=client_env(), timeout=60,
                                 user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
    assert process.returncode == 75
    assert log.read_text().rstrip().endswith(
        "Permission denied; deferring the message (fallback = tempfail); the socket's group must be one "
        "of this user's groups (serve.socket_group)")


def test_a_stale_socket_file_counts_as_absent(config_file):
    path = shared_folder() / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))            # bound, never listening: connection refused
    run = run_client(path, ["-c", str(config_file()), "--stdout", "-f", "a@b.example", "c@d"], SIMPLE)
    assert (run.code, run.stdout) == (0, SIMPLE)


@pytest.mark.parametrize("how", ["option", "environment", "rule file", "rule file given with -c"])
def test_server_absent_with_fallback_tempfail_exits_75(config_file, smtp_sink, how):
    config = config_file(f'mail_host = "{smtp_sink.address}"\n[serve]\nfallback = "tempfail"\n')
    args, env = ["-c", str(config), "-f", "a@b.example", "c@d.example"], {}
    if how == "option":
        args = ["--fallback", "tempfail", *args]
    elif how == "environment":
        env = {"ISPMAILGATE_FALLBACK": "tempfail"}
    elif how == "rule file":
        env = {"ISPMAILGATE_CONFIG": str(config)}
    socket_path = absent_socket()
    run = run_client(socket_path, args, SIMPLE, env=env)
    assert run.code == 75
    assert run.first_line == (f"4.3.0 ispmailgate-client: cannot reach the server at {socket_path}: "
                              "No such file or directory")
    assert smtp_sink.messages == []


@pytest.mark.parametrize("args, expected", [
    (["-c", "a.toml", "-f", "x"], "a.toml"), (["--config", "b.toml"], "b.toml"), (["--config=c.toml"], "c.toml"),
    (["-cd.toml", "r@x"], "d.toml"), (["-f", "s", "--", "-c", "rcpt"], None), (["-c"], None), ([], None),
])
def test_the_client_finds_the_rule_file_among_the_arguments(args, expected):
    from ispmailgate_client import config_argument

    assert config_argument(args) == expected


def test_the_fallback_survives_a_broken_installation(tmp_path):
    """The one-shot fallback starts through ispmailgate_start: 75, not a traceback and 1."""
    (tmp_path / "typer.py").write_text("raise ImportError('typer is broken here')\n")
    run = run_client(absent_socket(), ["-f", "a@b.example", "c@d.example"], SIMPLE,
                     env={"PYTHONPATH": f"{tmp_path}:{PLUGINS}"})
    assert run.code == 75
    assert run.stderr == "4.3.0 ispmailgate cannot start: ImportError('typer is broken here')\n"


def test_the_fallback_gives_the_one_shot_result_for_usage_errors_too():
    for args in (["--no-such-option"], ["--version"]):
        one_shot, fallen_back = run_gate(args, SIMPLE), run_client(absent_socket(), args, SIMPLE)
        assert (fallen_back.code, fallen_back.stdout, fallen_back.stderr) == \
               (one_shot.code, one_shot.stdout, one_shot.stderr)


# -- start-up cost ------------------------------------------------------------------------------

def test_the_client_starts_isolated_without_site_and_imports_almost_nothing(strict_server):
    """Installed, the client is a /bin/sh script that starts the interpreter beside it with
    -I -S and imports ispmailgate_client from the site-packages beside it (compiled once);
    that imports neither typer nor email nor the core, nor re."""
    installed = e2e_gate().parent       # a regular install (this venv's is editable: site finds it)
    text = (installed / "ispmailgate-client").read_text()
    assert text == CLIENT.read_text() == (PROJECT / "bin" / "ispmailgate-client").read_text(), \
        "the installed client is not this checkout's: reinstall (tools/test --install-only)"
    assert text.startswith("#!/bin/sh\n") and 'exec "$python" -I -S -c ' in text
    [code] = re.findall(r"-I -S -c '(.*?)' \"\$here\"", text, re.S)
    process = subprocess.run([str(installed / "python3"), "-I", "-S", "-X", "importtime", "-c", code, str(installed),
                              "--socket", str(strict_server.socket), "--version"], capture_output=True,
                             env=client_env(), timeout=60)
    assert process.returncode == 0 and process.stdout.startswith(b"ispmailgate "), process.stderr
    imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", process.stderr.decode(), re.M))
    assert {"_socket", "ispmailgate_client"} <= imported
    assert not {name for name in imported if name.split(".")[0] in
                ("typer", "click", "rich", "email", "ispmailgate", "ispmailgate_core",
                 "ispmailgate_filters", "socket", "tomllib", "subprocess", "re", "__future__")}, sorted(imported)
