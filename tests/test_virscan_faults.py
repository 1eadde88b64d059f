"""virscan when things go wrong: scanner down, hanging, talking nonsense, stopped mid-run;
the command back end with a real clamscan; unparseable mail; nothing written outside the
work directory; options checked when the rule file is read."""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from support.attacks import encrypted_zip, hostile_tar, message, nested_zip_bomb, seven_zip, zip_of
from support.clamav import EICAR, EICAR_NAME, ClamdProcess
from conftest import corpus_messages, crlf, without_from_line
from support.hostile import message as hostile_message
from ispmailgate_filters.base import ConfigError, Context, Envelope, Reject
from ispmailgate_filters.mime import Message, ParseError
from ispmailgate_filters.virscan import VirScan
from test_virscan import RECIPIENT, SENDER, gate  # noqa: F401  (fixture)

CLEAN = message(("a.txt", "text/plain", b"one"), ("b.txt", "text/plain", b"two"),
                ("c.txt", "text/plain", b"three"), ("d.txt", "text/plain", b"four"))


def assert_deferred(outcome, *words: str) -> None:
    assert outcome.code == 75, outcome.stderr
    first = outcome.stderr.splitlines()[0]
    assert first.startswith("4.7.0 av: virus scanner unavailable: "), first
    assert all(word in first for word in words), first
    assert outcome.delivered == [] and outcome.notices == []


# -- the scanner down, hanging, answering nonsense, stopped mid-run -------------------------------

def test_clamd_absent(gate, tmp_path):
    outcome = gate(CLEAN, socket=str(tmp_path / "no-such-socket"))
    assert_deferred(outcome, "cannot connect", "No such file or directory")


@pytest.fixture
def hanging_socket():
    """A Unix socket that accepts connections (the backlog does) and never answers."""
    path = Path(os.path.join("/tmp", f"hang-{os.getpid()}-{os.urandom(3).hex()}"))
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(16)
    yield str(path)
    server.close()
    path.unlink()


def test_clamd_hanging_on_a_unix_socket(gate, hanging_socket):
    outcome = gate(CLEAN, socket=hanging_socket, timeout=1)
    assert_deferred(outcome, "timed out")
    assert outcome.seconds < 30


def test_clamd_hanging_over_tcp(gate, silent_port):
    outcome = gate(CLEAN, host=f"127.0.0.1:{silent_port}", timeout=1)
    assert_deferred(outcome, "timed out", f"clamd at 127.0.0.1:{silent_port}")


@pytest.fixture
def babbler():
    """A Unix socket server answering every request with one fixed reply."""
    path = f"/tmp/babble-{os.getpid()}-{os.urandom(3).hex()}"
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(16)
    replies = {"text": b"stream: OK"}

    def serve():
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            with client:
                client.settimeout(5)
                try:
                    client.recv(65536)
                    client.sendall(replies["text"])
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, replies
    server.shutdown(socket.SHUT_RDWR)
    server.close()
    thread.join(timeout=10)
    os.unlink(path)


@pytest.mark.parametrize("reply", [b"HELLO\0", b"stream: OK", b"stream: Can't allocate memory ERROR\0",
                                   b"stream: OK FOUND FOUND\r\nX: y\0", b""])
def test_clamd_answering_nonsense(gate, babbler, reply):
    path, replies = babbler
    replies["text"] = reply
    outcome = gate(CLEAN, socket=path, timeout=5)
    assert_deferred(outcome)


class StoppingRelay:
    """Passes connections to a real clamd; with the ``after``-th it stops clamd for good.

    clamd is stopped after it answered that request and before the answer is passed on,
    and the relay's socket disappears with it: the gate's next object finds nobody.
    """

    def __init__(self, daemon: ClamdProcess, after: int) -> None:
        self.daemon, self.after = daemon, after
        self.path = str(daemon.home / "relay")
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(16)
        self.served = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.served < self.after:
            client, _ = self.listener.accept()
            with client:
                reply = self._forward(client)
                self.served += 1
                if self.served == self.after:
                    self.daemon.stop()
                    self.listener.close()
                    os.unlink(self.path)
                client.sendall(reply)

    def _forward(self, client: socket.socket) -> bytes:
        reply = b""
        with socket.socket(socket.AF_UNIX) as upstream:
            upstream.connect(self.daemon.socket)
            while True:
                ready, _, _ = select.select([client, upstream], [], [], 30)
                if not ready:
                    return reply
                if client in ready:
                    upstream.sendall(client.recv(65536))
                if upstream in ready:
                    chunk = upstream.recv(65536)
                    if not chunk:
                        return reply
                    reply += chunk


def test_clamd_stopped_mid_run(gate, own_clamd):
    own_clamd.start()
    relay = StoppingRelay(own_clamd, after=2)
    outcome = gate(CLEAN, socket=relay.path)
    relay.thread.join(timeout=30)
    assert relay.served == 2
    assert own_clamd.process.poll() is not None        # really stopped
    assert not Path(own_clamd.socket).exists()
    assert_deferred(outcome, "cannot connect", "No such file or directory")


def test_scanner_error_can_be_passed_but_is_never_clean(gate, tmp_path):
    outcome = gate(CLEAN, socket=str(tmp_path / "gone"), on_scanner_error="pass")
    assert outcome.code == 0
    assert outcome.header == "not scanned (scanner unavailable)"


# -- clamd's own limits -------------------------------------------------------------------------

def test_clamd_limits_are_unscannable_never_clean(gate):
    own_clamd_limits = ClamdProcess(MaxFileSize="1M", StreamMaxLength="2M")
    try:
        own_clamd_limits.start()
        data = message(("big.bin", "application/octet-stream", os.urandom(1536 * 1024)),
                       ("bigger.bin", "application/octet-stream", os.urandom(3 * 1024 * 1024)))
        outcome = gate(data, socket=own_clamd_limits.socket, max_stream="10M")
        notice = outcome.notices[0]
        assert 'part 2 "big.bin": unscannable: scanner limit reached (Heuristics.Limits.Exceeded' in notice
        assert "part 3 \"bigger.bin\": unscannable: larger than clamd's StreamMaxLength" in notice
        outcome = gate(data, socket=own_clamd_limits.socket, max_stream="1M")
        assert "larger than max_stream (1048576 bytes)" in outcome.notices[0]
        assert outcome.header.startswith("unscannable")
    finally:
        own_clamd_limits.remove()


@pytest.mark.parametrize("name, detail", [
    ("Heuristics.Encrypted.7Zip", "encrypted, the scanner cannot look inside (Heuristics.Encrypted.7Zip)"),
    ("Heuristics.Limits.Exceeded.MaxFileSize", "scanner limit reached (Heuristics.Limits.Exceeded.MaxFileSize)"),
])
def test_scanner_heuristics_for_what_it_could_not_read_are_unscannable(gate, babbler, name, detail):
    path, replies = babbler
    replies["text"] = f"stream: {name} FOUND\0".encode()
    outcome = gate(CLEAN, socket=path)
    assert outcome.header == f"unscannable ({detail})"


# -- the command back end with a real clamscan ---------------------------------------------------

def clamscan(database: Path, placeholder: str = "{paths}") -> list[str]:
    return ["clamscan", "--no-summary", "--stdout", "-d", str(database), placeholder]


@pytest.mark.parametrize("placeholder", ["{paths}", "{path}"])
def test_clamscan_finds_eicar_inside_archives(gate, clamscan_database, placeholder):
    data = message(("a.txt", "text/plain", b"hello"), ("a.zip", "application/zip",
                                                       zip_of({"x/eicar.com": EICAR})))
    outcome = gate(data, scanner="command", command=clamscan(clamscan_database, placeholder),
                   on_infected="tag")
    assert outcome.header == f"infected ({EICAR_NAME})"
    assert 'part 3 "a.zip" > "x/eicar.com": infected: Test.Eicar.UNOFFICIAL' in outcome.notices[0]


@pytest.mark.parametrize("path", corpus_messages()[:6], ids=lambda p: p.name)
def test_clamscan_passes_clean_corpus_messages(gate, clamscan_database, path):
    data = path.read_bytes()
    outcome = gate(data, scanner="command", command=clamscan(clamscan_database))
    assert outcome.delivered == [b"X-ispMailGate-VirScan: scanned\r\n" + crlf(without_from_line(data))]


def test_clamscan_error_exit_defers(gate, tmp_path):
    outcome = gate(CLEAN, scanner="command", command=clamscan(tmp_path / "no-database"))
    assert_deferred(outcome, "exited 2")


def test_command_scanner_timeout_defers(gate):
    outcome = gate(CLEAN, scanner="command", timeout=1,
                   command=[sys.executable, "-c", "import time; time.sleep(60)", "{paths}"])
    assert_deferred(outcome, "took longer than 1 s")
    assert outcome.seconds < 30


def test_command_scanner_that_floods_its_output_defers(gate):
    outcome = gate(CLEAN, scanner="command", timeout=30,
                   command=[sys.executable, "-c", "import sys\nwhile True: sys.stdout.write('x' * 65536)",
                            "{paths}"])
    assert_deferred(outcome, f"said more than {1 << 20} bytes")
    assert outcome.seconds < 30


def test_full_work_directory_defers(config_file, smtp_sink, clamscan_database):
    """A file-size limit stands in for a full disk: the objects cannot be written for clamscan."""
    import resource

    from conftest import GATE

    config = config_file(f'mail_host = "{smtp_sink.address}"\ndefault_filter = ["av"]\n[filter.av]\n'
                         f'type = "virscan"\nscanner = "command"\ncommand = {json.dumps(clamscan(clamscan_database))}\n')
    limit = 1024 * 1024

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    data = message(("big.bin", "application/octet-stream", os.urandom(2 * limit)))
    process = subprocess.run([str(GATE), "-c", str(config), "-f", SENDER, RECIPIENT], input=data,
                             capture_output=True, preexec_fn=small_disk, timeout=60)
    assert process.returncode == 75, process.stderr
    assert b"4.7.0 av: virus scanner unavailable: cannot write" in process.stderr
    assert b"File too large" in process.stderr
    assert smtp_sink.messages == []


def test_antivir_style_output_with_hostile_names(gate, tmp_path):
    scanner = tmp_path / "antivir"
    scanner.write_text(f"#!{sys.executable}\nimport sys\n"
                       "print('!Virus! ' + sys.argv[1] + ' Evil\\x1b[31mName\\rX-Injected: yes')\n"
                       "sys.exit(3)\n")
    scanner.chmod(0o755)
    outcome = gate(CLEAN, scanner="command", command=[str(scanner), "{path}"], infected_exit_codes=[3],
                   virus_pattern=r"^!Virus! (?P<path>\S+) (?P<name>.*)$", on_infected="tag")
    assert outcome.header.startswith("infected (Evil?[31mName?X-Injected: yes")
    assert b"\r\nX-Injected" not in outcome.delivered[0]
    assert "\nX-Injected" not in outcome.notices[0]


# -- mail the parser cannot split is still scanned -------------------------------------------------

class Unparseable(Message):
    """A message on which the MIME parser gives up (as it would on a bug of its own)."""

    def __init__(self, raw: bytes) -> None:
        super().__init__(raw)

        def give_up(*_):
            raise ParseError("the test parser gives up")
        self._parser.parse_all = give_up


def context(tmp_path: Path) -> Context:
    return Context(Envelope(SENDER, (RECIPIENT,)), message_id="T1", log=logging.getLogger("test"),
                   workdir=lambda: tmp_path, postmaster="postmaster")


def test_unparseable_message_is_scanned_raw(clamd, tmp_path):
    scan = VirScan(socket=clamd.socket)
    with pytest.raises(Reject, match=EICAR_NAME):
        scan.process(Unparseable(message(("e.com", "application/octet-stream", EICAR))), context(tmp_path))
    clean = Unparseable(CLEAN)
    scan.process(clean, context(tmp_path))
    tagged = clean.to_bytes()
    assert tagged.startswith(b"X-ispMailGate-VirScan: ")     # tagged as any unscannable mail:
    assert Message(tagged).headers.get("Subject").startswith("[")
    assert tagged.endswith(CLEAN[CLEAN.index(b"\nMessage-ID:"):])   # the body untouched
    assert Message(tagged).headers.get("X-ispMailGate-VirScan") == (
        "unscannable (cannot be parsed (the test parser gives up))")


def test_unparseable_message_loses_a_forged_verdict(clamd, tmp_path):
    """The sender's own verdict field is replaced, not left below the gate's."""
    forged = Unparseable(b"X-ispMailGate-VirScan: scanned\n" + CLEAN)
    VirScan(socket=clamd.socket).process(forged, context(tmp_path))
    assert Message(forged.to_bytes()).headers.get_all("X-ispMailGate-VirScan") == [
        "unscannable (cannot be parsed (the test parser gives up))"]


def deep_message(content: bytes, depth: int = 70) -> bytes:
    head = b"".join(b'Content-Type: multipart/mixed; boundary="n%d"\n\n--n%d\n' % (i, i) for i in range(depth))
    tail = b"".join(b"\n--n%d--\n" % i for i in reversed(range(depth)))
    return b"From: a@example.org\nSubject: deep\nMIME-Version: 1.0\n" + head + content + tail


def test_mime_nested_past_the_parser_limit_is_unscannable(gate):
    outcome = gate(deep_message(b"Content-Type: text/plain\n\nhi"))
    assert outcome.header.startswith("unscannable (MIME nesting beyond the parser's limits")
    assert "- the message: unscannable: MIME nesting beyond the parser's limits" in outcome.notices[0]


def test_virus_below_the_parser_limit_is_still_found(gate):
    outcome = gate(deep_message(b"Content-Type: application/octet-stream\n\n" + EICAR), on_infected="tag")
    assert outcome.header == f"infected ({EICAR_NAME})"


# -- nothing written outside the work directory ------------------------------------------------------

AUDITED_GATE = r'''
import os, sys
record = open(sys.argv[1], "w", buffering=1)
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
CREATING = {"os.mkdir", "os.symlink", "os.link", "os.rename", "os.replace", "os.chmod", "os.chown",
            "os.truncate", "os.utime"}

def audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and args[2] & WRITING:
        record.write(f"open {os.fsdecode(args[0])}\n")
    elif event in CREATING:
        paths = [os.fsdecode(a) for a in args if isinstance(a, (str, bytes, os.PathLike))]
        record.write(f"{event} {' '.join(paths)}\n")

sys.addaudithook(audit)
sys.argv = ["ispmailgate", *sys.argv[2:]]
import ispmailgate
sys.exit(ispmailgate.main())
'''


@pytest.mark.parametrize("back_end", ["clamd", "clamscan"])
def test_nothing_is_written_outside_the_work_directory(back_end, config_file, smtp_sink, clamd,
                                                       clamscan_database, tmp_path):
    escape = tmp_path / "escape"
    scanner = (f'socket = "{clamd.socket}"' if back_end == "clamd" else
               f'scanner = "command"\ncommand = {clamscan(clamscan_database)!r}'.replace("'", '"'))
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\ndefault_filter = ["av"]\n'
                         f'[filter.av]\ntype = "virscan"\non_infected = "tag"\n{scanner}\n')
    script, record = tmp_path / "audited.py", tmp_path / "audit.log"
    script.write_text(AUDITED_GATE)
    data = message(("evil.tgz", "application/gzip", hostile_tar(escape)),
                   ("bomb.zip", "application/zip", nested_zip_bomb()),
                   ("secret.zip", "application/zip", encrypted_zip()),
                   ("a.7z", "application/x-7z-compressed", seven_zip({"a.txt": b"listed by 7-Zip"})))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(Path(__file__).parent)}
    process = subprocess.run([sys.executable, str(script), str(record), "-c", str(config), "-f", SENDER,
                              RECIPIENT], input=data, capture_output=True, env=env, timeout=120)
    assert process.returncode == 0, process.stderr
    [received] = [m for m in smtp_sink.messages if RECIPIENT in m.rcpt_tos]
    assert f"infected ({EICAR_NAME})".encode() in received.content

    workdir = str(tmp_path / "spool") + "/ispmailgate-"
    allowed = (workdir, str(tmp_path / "gate.log"), os.devnull)
    events = record.read_text().splitlines()
    outside = [event for event in events if not event.split(" ", 1)[1].startswith(allowed)]
    assert outside == []
    assert not [event for event in events if event.startswith(("os.symlink", "os.link"))]
    written = [event.split(" ", 1)[1] for event in events if event.startswith("open ")]
    assert any(path.endswith("/7z/000001.7z") for path in written)     # the copy 7-Zip lists
    if back_end == "clamscan":      # the members were written, under generated names
        assert any(path.endswith("/scan/000001.bin") for path in written)
    assert not escape.exists()
    for path in tmp_path.rglob("*"):
        mode = path.lstat().st_mode
        assert not (stat.S_ISLNK(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)), path


# -- options are checked when the rule file is read ---------------------------------------------

@pytest.mark.parametrize("options, key, words", [
    ({"scanner": "command"}, "command", "{path} (once per object) or {paths}"),
    ({"scanner": "command", "command": ["clamscan", "{path}", "{paths}"]}, "command", "either"),
    ({"on_infected": "discard", "quarantine_dir": ""}, "quarantine_dir", "quarantine directory"),
    ({"host": "localhost"}, "host", "HOST:PORT"),
    ({"max_unpacked": "lots"}, "max_unpacked", "size like 200M"),
    ({"max_ratio": 0}, "max_ratio", "expected an integer from 1 to"),
    ({"virus_pattern": "("}, "virus_pattern", "bad regex"),
    ({"notify": ["everyone"]}, "notify", "postmaster, sender, recipients"),
    ({"infected_exit_codes": ["1"]}, "infected_exit_codes", "exit codes"),
    ({"scanner_unpacks": ["zip"]}, "scanner_unpacks", "7z, rar"),
    ({"on_infected": "delete"}, "on_infected", "reject, discard, tag, pass"),
])
def test_bad_options_are_refused_by_key(options, key, words):
    from ispmailgate_core import rules

    with pytest.raises(ConfigError) as caught:
        rules.build_config({"filter": {"av": {"type": "virscan", **options}}}, "rules.toml")
    assert caught.value.path == f"filter.av.{key}"
    assert words in caught.value.message


def test_check_reports_clamd_state(clamd, tmp_path):
    assert VirScan(socket=clamd.socket, clamd_config=str(clamd.config)).problems() == []
    silent = tmp_path / "clamd.conf"
    silent.write_text("LocalSocket /x\nStreamMaxLength 10M\n")
    problems = VirScan(socket=clamd.socket, clamd_config=str(silent)).problems()
    assert any("AlertExceedsMax is off" in p for p in problems)
    assert any("above clamd's StreamMaxLength (10M)" in p for p in problems)
    assert f"{silent}: AlertEncryptedArchive is off: clamd reports an encrypted archive inside a 7z as " \
           "clean; set 'AlertEncryptedArchive yes'" in problems
    whole_to_none = VirScan(socket=clamd.socket, clamd_config=str(silent), scanner_unpacks=()).problems()
    assert not any("AlertEncryptedArchive" in p for p in whole_to_none)
    assert "cannot connect" in VirScan(socket=str(tmp_path / "none"), clamd_config="").problems()[0]
    assert VirScan(scanner="command", command=("no-such-scanner", "{path}")).problems() == [
        "scanner command not found or not executable: no-such-scanner"]


def test_check_reports_a_missing_7zip_when_7z_is_left_to_the_scanner(clamd, tmp_path):
    missing = str(tmp_path / "7z")
    options = {"socket": clamd.socket, "clamd_config": str(clamd.config), "sevenzip": missing}
    assert VirScan(**options).problems() == [
        f"sevenzip {missing} is not an executable (install p7zip-full): every 7z left to the scanner "
        "is unscannable"]
    assert VirScan(**options, scanner_unpacks=("rar",)).problems() == []


def test_the_example_rule_files_scanner_is_valid_as_written():
    from ispmailgate_core import rules
    from conftest import PROJECT

    config = rules.load_config(PROJECT / "examples" / "ispmailgate.toml")
    scan = config.filters["av"]
    assert (scan.on_infected, scan.max_unpacked, scan.max_ratio) == ("reject", 200 * 1024 ** 2, 100)


# -- hostile MIME: every message ends in a defined verdict ------------------------------------------


@settings(max_examples=150, deadline=10_000, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=hostile_message())
def test_any_message_gets_a_verdict_and_only_our_header_changes(clamd, tmp_path_factory, data):
    scan = VirScan(socket=clamd.socket)
    parsed = Message(data)
    scan.process(parsed, context(tmp_path_factory.getbasetemp()))   # no virus: never a Verdict
    result = parsed.to_bytes()
    value = Message(result).headers.get("X-ispMailGate-VirScan")
    assert value == "scanned" or value.startswith("unscannable (")
    if value == "scanned" and b"X-ispMailGate-VirScan" not in data:
        assert result.endswith(data) and result.startswith(b"X-ispMailGate-VirScan: scanned")


def test_preload_imports_what_scanning_needs():
    VirScan().preload()
    assert {"tarfile", "zipfile", "lzma", "bz2", "unicodedata"} <= set(sys.modules)


# -- attack review 1, findings 5 and 13 ------------------------------------------------------------

def uuencoded(name: str, data: bytes) -> bytes:
    import binascii

    lines = [binascii.b2a_uu(data[i:i + 45]) for i in range(0, len(data), 45)]
    return b"begin 644 " + name.encode() + b"\n" + b"".join(lines) + b"`\nend\n"


def test_a_uuencoded_file_inside_a_text_part_is_scanned(clamd, tmp_path):
    """A reader shows it as an attachment; part by part it was text, and OK."""
    data = message(("note.txt", "text/plain", b"See attached.\n\n" + uuencoded("e.com", zip_of({"e.com": EICAR}))))
    with pytest.raises(Reject, match=EICAR_NAME):
        VirScan(socket=clamd.socket).process(Message(data), context(tmp_path))


def test_the_whole_message_goes_to_the_scanner_as_well(clamd, tmp_path, monkeypatch):
    """What the parts miss, clamd's own MIME decoding may find: the whole is scanned too."""
    from ispmailgate_filters.virscan import inline

    monkeypatch.setattr(inline, "uuencoded", lambda data: iter(()))     # the parts see nothing
    data = (b"From: a@evil.example\nTo: b@example.com\nSubject: invoice\nMIME-Version: 1.0\n"
            b"Content-Type: text/plain\n\nSee the attached invoice.\n\n" + uuencoded("e.zip", zip_of({"e.com": EICAR})))
    with pytest.raises(Reject, match=EICAR_NAME):
        VirScan(socket=clamd.socket).process(Message(data), context(tmp_path))


def test_each_recipient_is_told_only_of_itself(clamd, tmp_path):
    """notify = ["recipients"] wrote one notice To: every envelope recipient, Bcc ones too."""
    recipients = ("to@b.example", "bcc1@c.example", "bcc2@d.example")
    ctx = Context(Envelope(SENDER, recipients), message_id="T1", log=logging.getLogger("test"),
                  workdir=lambda: tmp_path, postmaster="postmaster", notices=[])
    scan = VirScan(socket=clamd.socket, notify=("recipients", "postmaster"))
    with pytest.raises(Reject):
        scan.process(Message(message(("e.com", "application/octet-stream", EICAR))), ctx)
    by_recipients = {notice.recipients: notice.text for notice in ctx.notices}
    assert sorted(by_recipients) == sorted([("postmaster",), *((r,) for r in recipients)])
    for recipient in recipients:
        others = [r for r in recipients if r != recipient]
        assert recipient in by_recipients[(recipient,)]
        assert not any(other in by_recipients[(recipient,)] for other in others)
    assert all(r in by_recipients[("postmaster",)] for r in recipients)
