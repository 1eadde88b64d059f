"""virscan through the whole gate with a real clamd: verdicts, actions, fidelity, attacks."""

from __future__ import annotations

import base64
import json
import stat
import time

import pytest

from support.attacks import (corrupt_seven_zip, encrypted_zip, high_ratio_gzip, hostile_tar, many_member_zip, message,
                     nested_zip, nested_zip_bomb, overlapping_zip, seven_zip, tar_of, zip_of)
from support.clamav import CUSTOM, CUSTOM_NAME, EICAR, EICAR_NAME, ClamdProcess
from conftest import corpus_messages, crlf, free_port, run_inline, without_from_line
from ispmailgate_filters.mime import Message

SENDER, RECIPIENT, POSTMASTER = "alice@example.org", "bob@example.com", "postmaster@example.net"


def toml_value(value) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


@pytest.fixture
def gate(config_file, smtp_sink, clamd, tmp_path):
    """Run one message through a virscan chain: gate(data, **options) -> Outcome."""
    def run(data: bytes, *, args: tuple[str, ...] = (), **options):
        options.setdefault("socket", clamd.socket)
        options.setdefault("quarantine_dir", str(tmp_path / "quarantine"))
        table = "".join(f"{key} = {toml_value(value)}\n" for key, value in options.items())
        config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\n'
                             f'postmaster = "{POSTMASTER}"\ndefault_filter = ["av"]\n'
                             f'[filter.av]\ntype = "virscan"\n{table}')
        started, before = time.monotonic(), len(smtp_sink.messages)
        result = run_inline([*args, "-c", str(config), "-f", SENDER, RECIPIENT], data)
        return Outcome(result, time.monotonic() - started, smtp_sink.messages[before:], tmp_path)
    return run


class Outcome:
    def __init__(self, run, seconds, received, home) -> None:
        self.code, self.stdout, self.stderr, self.seconds = run.code, run.stdout, run.stderr, seconds
        self.delivered = [m.content for m in received if m.mail_from != "<>" and RECIPIENT in m.rcpt_tos]
        self.reports = [m for m in received if m.mail_from == "<>"]     # the gate's own mail
        self.notices = self.notices_to(POSTMASTER)
        self.log = (home / "gate.log").read_text() if (home / "gate.log").exists() else ""

    def notices_to(self, address: str) -> list[str]:
        return [m.content.decode("utf-8", "replace") for m in self.reports if address in m.rcpt_tos]

    @property
    def header(self) -> str:
        [content] = self.delivered
        headers = Message(content).headers
        assert headers.names()[0] == "X-ispMailGate-VirScan", headers.names()
        return headers.get("X-ispMailGate-VirScan")


# -- clean mail: the header, and every other byte as it came -------------------------------

@pytest.mark.parametrize("path", corpus_messages(), ids=lambda p: p.name)
def test_clean_corpus_message_gets_the_header_and_nothing_else(path, gate):
    data = path.read_bytes()
    outcome = gate(data)
    assert outcome.code == 0, outcome.stderr
    [content] = outcome.delivered
    assert content == b"X-ispMailGate-VirScan: scanned\r\n" + crlf(without_from_line(data))
    assert outcome.notices == []


def test_a_forged_verdict_header_is_replaced(gate):
    data = b"X-ispMailGate-VirScan: scanned\n" + message(("x.com", "application/octet-stream", EICAR))
    outcome = gate(data, on_infected="tag")
    [content] = outcome.delivered
    assert content.count(b"X-ispMailGate-VirScan") == 1
    assert outcome.header == f"infected ({EICAR_NAME})"


def test_crlf_message_keeps_its_line_ends(gate):
    data = message(("notes.txt", "text/plain", b"nothing to see\r\n"), eol=b"\r\n")
    outcome = gate(data)
    assert outcome.delivered == [b"X-ispMailGate-VirScan: scanned\r\n" + data]


# -- infected: found wherever it hides ------------------------------------------------------

HIDING_PLACES = {
    "attachment": (EICAR, "eicar.com", 'part 2 "eicar.com"'),
    "zip": (zip_of({"readme.txt": b"hi", "eicar.com": EICAR}), "a.zip", 'part 2 "a.zip" > "eicar.com"'),
    "tar.gz": (tar_of({"dir/eicar.com": EICAR}), "a.tgz", 'part 2 "a.tgz" > "(gunzipped)" > "dir/eicar.com"'),
    "zip-in-zip-in-zip": (nested_zip(EICAR, ["eicar.com", "c.zip", "b.zip"]), "a.zip",
                          'part 2 "a.zip" > "b.zip" > "c.zip" > "eicar.com"'),
    "custom signature in tar.xz": (tar_of({"payload.bin": CUSTOM}, "w:xz"), "p.tar.xz",
                                   'part 2 "p.tar.xz" > "(unxzed)" > "payload.bin"'),
    "7z (unpacked by clamd)": (seven_zip({"readme.txt": b"hi", "eicar.com": EICAR}), "a.7z", 'part 2 "a.7z"'),
    "7z in zip": (zip_of({"inner.7z": seven_zip({"eicar.com": EICAR})}), "a.zip",
                  'part 2 "a.zip" > "inner.7z"'),
}


@pytest.mark.parametrize("case", HIDING_PLACES)
def test_infected_attachment_is_rejected_and_the_postmaster_told(case, gate):
    data, filename, label = HIDING_PLACES[case]
    name = CUSTOM_NAME if "custom" in case else EICAR_NAME
    outcome = gate(message((filename, "application/octet-stream", data)))
    assert outcome.code == 69, outcome.stderr
    assert outcome.stderr.splitlines()[0] == f"5.7.1 av: message infected: {name}"
    assert outcome.delivered == []
    [notice] = outcome.notices
    assert f"- {label}: infected: {name}" in notice
    assert "Action:     rejected" in notice


def attached_message(inner: bytes, encoding: str) -> bytes:
    body = base64.encodebytes(inner) if encoding == "base64" else inner
    return (b"From: carol@example.org\nTo: bob@example.com\nSubject: fwd\nMIME-Version: 1.0\n"
            b'Content-Type: multipart/mixed; boundary="outer"\n\n--outer\nContent-Type: text/plain\n\nsee below\n'
            b"--outer\nContent-Type: message/rfc822\nContent-Transfer-Encoding: " + encoding.encode()
            + b"\n\n" + body + b"\n--outer--\n")


@pytest.mark.parametrize("encoding", ["7bit", "base64"])
def test_base64_part_inside_an_attached_message(encoding, gate):
    inner = message(("invoice.zip", "application/zip", zip_of({"eicar.com": EICAR})))
    outcome = gate(attached_message(inner, encoding), on_infected="tag")
    assert outcome.code == 0, outcome.stderr
    assert outcome.header == f"infected ({EICAR_NAME})"
    [notice] = outcome.notices
    assert '"invoice.zip" > "eicar.com": infected' in notice


# -- actions ----------------------------------------------------------------------------------

def test_discard_keeps_a_private_copy_in_quarantine(gate, tmp_path):
    data = message(("a.zip", "application/zip", zip_of({"eicar.com": EICAR})))
    outcome = gate(data, on_infected="discard")
    assert outcome.code == 0, outcome.stderr
    assert outcome.delivered == []
    quarantine = tmp_path / "quarantine"
    assert stat.S_IMODE(quarantine.stat().st_mode) == 0o700
    [kept] = quarantine.glob("*.eml")
    [record] = quarantine.glob("*.json")
    assert kept.read_bytes() == data
    assert {stat.S_IMODE(p.stat().st_mode) for p in (kept, record)} == {0o600}
    details = json.loads(record.read_text())
    assert details["sender"] == SENDER and details["recipients"] == [RECIPIENT]
    assert details["findings"][0]["detail"] == EICAR_NAME
    [notice] = outcome.notices
    assert str(kept) in notice


def test_dry_run_decides_but_keeps_nothing_in_quarantine(gate, tmp_path):
    data = message(("a.zip", "application/zip", zip_of({"eicar.com": EICAR})))
    outcome = gate(data, args=("--dry-run",), on_infected="discard")
    assert outcome.code == 0, outcome.stderr
    assert outcome.delivered == [] and outcome.reports == []
    assert not (tmp_path / "quarantine").exists()
    report = outcome.stdout.decode()
    assert f"discarded by av: 2.7.0 infected: {EICAR_NAME}; would be kept in {tmp_path / 'quarantine'}/" \
        in report, report


def test_discard_that_cannot_keep_a_copy_defers(gate, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    outcome = gate(message(("e.com", "application/octet-stream", EICAR)), on_infected="discard",
                   quarantine_dir=str(blocker / "q"))
    assert outcome.code == 75
    assert outcome.delivered == [] and outcome.notices == []


def test_tag_delivers_with_the_verdict_and_a_subject_prefix(gate):
    outcome = gate(message(("e.com", "application/octet-stream", EICAR), subject="Quarterly report"),
                   on_infected="tag")
    assert outcome.code == 0
    [content] = outcome.delivered
    assert outcome.header == f"infected ({EICAR_NAME})"
    assert b"\r\nSubject: [VIRUS] Quarterly report\r\n" in content


def test_pass_delivers_unchanged_but_tells_the_postmaster(gate):
    data = message(("e.com", "application/octet-stream", EICAR))
    outcome = gate(data, on_infected="pass", notify=["postmaster", "sender"])
    assert outcome.delivered == [crlf(data)]
    assert len(outcome.notices) == 1
    assert "Action:     delivered unchanged" in outcome.notices[0]


@pytest.mark.parametrize("who, address", [("sender", SENDER), ("recipients", RECIPIENT)])
def test_sender_or_recipients_are_told_the_virus_name(who, address, gate):
    outcome = gate(message(("e.com", "application/octet-stream", EICAR)), notify=[who])
    assert outcome.code == 69 and outcome.delivered == []
    [notice] = outcome.notices_to(address)
    assert [m.rcpt_tos for m in outcome.reports] == [[address]]     # nobody else, not the postmaster
    assert f"\r\nTo: {address}\r\nSubject: ispmailgate: infected message ({EICAR_NAME})\r\n" in notice
    assert f'\r\n- part 2 "e.com": infected: {EICAR_NAME}\r\n' in notice
    assert f"Sender:     <{SENDER}>" in notice and "Action:     rejected" in notice


def test_notify_nobody(gate):
    outcome = gate(message(("e.com", "application/octet-stream", EICAR)), notify=[])
    assert outcome.code == 69 and outcome.notices == []


def test_subject_prefix_is_not_added_twice_and_keeps_encoded_words(gate):
    data = message(("e.com", "application/octet-stream", EICAR), subject="=?utf-8?q?Gr=C3=BC=C3=9Fe?=")
    first = gate(data, on_infected="tag")
    [tagged] = first.delivered
    assert Message(tagged).headers.decoded("Subject") == "[VIRUS] Grüße"
    again = gate(tagged.replace(b"\r\n", b"\n"), on_infected="tag")
    assert Message(again.delivered[0]).headers.decoded("Subject") == "[VIRUS] Grüße"


# -- unscannable: archive attacks, limits, encryption ------------------------------------------

ATTACKS = {
    "encrypted zip": (encrypted_zip, "encrypted member"),
    "nested zip bomb": (nested_zip_bomb, "compression ratio of the whole above max_ratio (100)"),
    "high-ratio gzip": (high_ratio_gzip, "compression ratio above max_ratio (100)"),
    "100,000-member zip": (many_member_zip, "100000 members, more than max_members (1000)"),
    "overlapping zip entries": (overlapping_zip, "overlapping or misplaced members (zip bomb construction)"),
    "encrypted 7z": (lambda: seven_zip({"eicar.com": EICAR}, "-pSecret"), "encrypted member"),
    "encrypted 7z headers": (lambda: seven_zip({"eicar.com": EICAR}, "-pSecret", "-mhe=on"),
                             "encrypted 7z headers (cannot be listed without the password)"),
    "corrupt 7z": (corrupt_seven_zip, "corrupt 7z: "),
    # 7-Zip lists only the outer archive: the inner one is left to clamd's AlertEncryptedArchive.
    "encrypted 7z inside a 7z": (lambda: seven_zip({"inner.7z": seven_zip({"eicar.com": EICAR}, "-pSecret")}),
                                 "encrypted, the scanner cannot look inside (Heuristics.Encrypted.7Zip)"),
}


@pytest.mark.parametrize("case", ATTACKS)
def test_archive_attacks_are_unscannable_and_tagged(case, gate):
    make, reason = ATTACKS[case]
    outcome = gate(message(("archive.bin", "application/octet-stream", make())))
    assert outcome.code == 0, outcome.stderr
    assert outcome.seconds < 60
    assert reason in outcome.header
    assert outcome.header.startswith("unscannable (")
    [content] = outcome.delivered
    assert b"\r\nSubject: [UNSCANNED] test\r\n" in content
    [notice] = outcome.notices
    assert f": unscannable: {reason}" in notice


def test_7z_without_7zip_is_unscannable(gate, tmp_path):
    missing = tmp_path / "no-7z"
    outcome = gate(message(("a.7z", "application/x-7z-compressed", seven_zip({"a.txt": b"harmless"}))),
                   sevenzip=str(missing))
    assert outcome.header == f"unscannable (cannot run 7-Zip ({missing}): No such file or directory)"


def test_unscannable_can_be_rejected(gate):
    outcome = gate(message(("s.zip", "application/zip", encrypted_zip())), on_unscannable="reject")
    assert outcome.code == 69
    assert outcome.stderr.splitlines()[0] == "5.7.1 av: message unscannable: encrypted member"


def test_infected_beats_unscannable(gate):
    outcome = gate(message(("s.zip", "application/zip", encrypted_zip()),
                           ("e.com", "application/octet-stream", EICAR)), on_infected="tag")
    assert outcome.header == f"infected ({EICAR_NAME})"


def test_hostile_tar_member_found_and_nothing_escapes(gate, tmp_path):
    escape = tmp_path / "escape"
    outcome = gate(message(("evil.tgz", "application/gzip", hostile_tar(escape))), on_infected="tag")
    assert outcome.header == f"infected ({EICAR_NAME})"
    assert "dotdot.com\": infected" in outcome.notices[0]
    assert not escape.exists()


def test_hostile_tar_without_a_virus_is_clean_and_its_odd_entries_logged(gate, tmp_path):
    outcome = gate(message(("odd.tgz", "application/gzip", hostile_tar(tmp_path / "escape", b"harmless"))))
    assert outcome.header == "scanned"
    assert outcome.notices == []
    notes = [line for line in outcome.log.splitlines() if "note, not a verdict" in line]
    assert len(notes) == 9
    assert any(line.endswith('note, not a verdict: part 2 "odd.tgz" > "(gunzipped)" > "hard": '
                             'hard link to "/etc/passwd": no content, not scanned') for line in notes)


# -- clamd over TCP ---------------------------------------------------------------------------------

def test_clamd_over_tcp(gate, tmp_path):
    port = free_port()
    daemon = ClamdProcess(TCPSocket=str(port), TCPAddr="127.0.0.1")
    try:
        daemon.start()
        tcp = {"host": f"127.0.0.1:{port}", "socket": str(tmp_path / "no-such-socket")}   # TCP or nothing
        infected = message(("a.zip", "application/zip", zip_of({"eicar.com": EICAR})))
        outcome = gate(infected, on_infected="tag", **tcp)
        assert outcome.header == f"infected ({EICAR_NAME})"
        assert f'- part 2 "a.zip" > "eicar.com": infected: {EICAR_NAME}' in outcome.notices[0]
        assert gate(message(("a.txt", "text/plain", b"fine")), **tcp).header == "scanned"
    finally:
        daemon.remove()


# -- names from the message never inject anything ------------------------------------------------

def test_file_and_member_names_cannot_inject_headers_or_report_lines(gate):
    filename = "=?utf-8?q?x=0D=0AX-Injected=3A_yes=0D=0A.zip?="
    archive = zip_of({"a\r\nX-Member-Injected: yes\r\n.com": EICAR})
    outcome = gate(message((filename, "application/zip", archive)), on_infected="tag")
    [content] = outcome.delivered
    assert b"\r\nX-Injected" not in content and b"\r\nX-Member-Injected" not in content
    [notice] = outcome.notices
    assert "\nX-Injected" not in notice and "\nX-Member-Injected" not in notice
    assert 'part 2 "x??X-Injected: yes??.zip" > "a??X-Member-Injected: yes??.com": infected' in notice
