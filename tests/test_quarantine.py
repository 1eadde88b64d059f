"""ispmailgate quarantine (issue 21): list, show, release, delete and purge what the gateway kept.

A message is discarded by virscan (a real clamd, or the command scanner where the scanner is
not the point), listed, and released through a real SMTP next hop (aiosmtpd) or a real
sendmail-compatible command; ids given on the command line are never paths.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path

import pytest

from conftest import crlf, recorded_calls, run_inline
from support.attacks import message, zip_of
from support.clamav import EICAR, EICAR_NAME

SENDER, ANN, BOB = "alice@example.org", "ann@example.com", "bob@example.com"
PLAIN = b"From: alice@example.org\nTo: ann@example.com\nSubject: invoice\n\nPlease find it attached.\n"


def quarantine(config: Path, *args: str):
    """``ispmailgate quarantine ARGS -c CONFIG``, in this process."""
    return run_inline(["quarantine", *args, "-c", str(config)], b"")


def listed(config: Path) -> list[dict]:
    run = quarantine(config, "list", "--json")
    assert run.code == 0, run.stderr
    return json.loads(run.stdout)


@pytest.fixture
def virscan_gateway(config_file, smtp_sink, clamd, tmp_path):
    """A gateway whose virscan (a real clamd) discards infected mail into tmp_path/quarantine,
    its next hop the SMTP sink."""
    return config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\npostmaster = "pm@gw.example"\n'
                       f'default_filter = ["av"]\n[filter.av]\ntype = "virscan"\nsocket = "{clamd.socket}"\n'
                       f'on_infected = "discard"\nnotify = []\nquarantine_dir = "{tmp_path / "quarantine"}"\n')


@pytest.fixture
def gateway(config_file, smtp_sink, infected_scanner, tmp_path):
    """The same with a scanner that finds a virus in everything: discard(data) -> the id."""
    def make(head: str = "") -> Path:
        suffix = "" if "loop_suffix" in head else 'loop_suffix = ""\n'
        return config_file(f'mail_host = "{smtp_sink.address}"\n{suffix}{head}'
                           'default_filter = ["av"]\n[filter.av]\ntype = "virscan"\nscanner = "command"\n'
                           f'command = ["{infected_scanner}", "{{paths}}"]\nscanner_unpacks = []\n'
                           f'on_infected = "discard"\nnotify = []\nquarantine_dir = "{tmp_path / "quarantine"}"\n')
    return make


def discard(config: Path, data: bytes = PLAIN, *recipients: str) -> str:
    """Run ``data`` through the gateway, which discards it; the id it was kept under."""
    before = {entry["id"] for entry in listed(config)}
    run = run_inline(["-c", str(config), "-f", SENDER, *(recipients or (ANN, BOB))], data)
    assert run.code == 0, run.stderr
    [new] = [entry["id"] for entry in listed(config) if entry["id"] not in before]
    return new


# -- the "done when" ----------------------------------------------------------------------

def test_a_discarded_virus_is_listed_released_byte_for_byte_once_and_again_only_by_force(
        virscan_gateway, smtp_sink, tmp_path):
    data = message(("invoice.zip", "application/zip", zip_of({"eicar.com": EICAR})))
    run = run_inline(["-c", str(virscan_gateway), "-f", SENDER, ANN, BOB], data)
    assert run.code == 0 and smtp_sink.messages == []           # discarded: nobody got it
    [entry] = listed(virscan_gateway)
    assert (entry["sender"], entry["recipients"], entry["verdict"]) == (SENDER, [ANN, BOB], "infected")
    assert entry["findings"][0]["detail"] == EICAR_NAME and entry["size"] == len(data)
    assert entry["state"] == "kept" and abs(entry["epoch"] - time.time()) < 600

    released = quarantine(virscan_gateway, "release", entry["id"])
    assert released.code == 0, released.stderr
    [received] = smtp_sink.messages
    assert (received.mail_from, received.rcpt_tos) == (SENDER, [ANN, BOB])
    assert received.content == crlf(data)                # exactly its bytes, as SMTP carries them
    assert f"<{ANN}>: accepted: 250" in released.stdout.decode()
    [entry] = listed(virscan_gateway)
    assert entry["state"] == "released" and entry["released_to"] == [ANN, BOB]

    again = quarantine(virscan_gateway, "release", entry["id"])
    assert again.code == 69 and "released already" in again.stderr and "--force" in again.stderr
    assert len(smtp_sink.messages) == 1

    forced = quarantine(virscan_gateway, "release", "--force", entry["id"])
    assert forced.code == 0, forced.stderr
    assert [m.content for m in smtp_sink.messages] == [crlf(data)] * 2
    log = (tmp_path / "gate.log").read_text()
    assert f"quarantine release {entry['id']} by root (uid 0): from=<{SENDER}> to=<{ANN}>,<{BOB}>" in log
    assert f"quarantine release {entry['id']} by root (uid 0) (forced)" in log
    releases = listed(virscan_gateway)[0]["releases"]
    assert [(r["by"], r["to"], r["forced"], r["state"]) for r in releases] == [
        ("root (uid 0)", [ANN, BOB], False, "done"), ("root (uid 0)", [ANN, BOB], True, "done")]


def test_a_released_message_carries_no_verdict_field_its_sender_forged(gateway, smtp_sink):
    config = gateway()
    forged = b"X-ispMailGate-VirScan: scanned\n" + PLAIN
    id = discard(config, forged)
    assert quarantine(config, "release", id).code == 0
    assert smtp_sink.messages[0].content == crlf(PLAIN)        # the forged field alone is gone


HOSTILE_IDS = ["../../etc/passwd", "/etc/passwd", "..", ".", "", "20250301-142501-6C1F0A93B2-4e1a7c/../../x",
               "20250301-142501-6C1F0A93B2-4e1a7c.eml/..", "20250301-142501-../../../etc", "x\nSubject: y",
               "20250301-142501-6C1F0A93B2-4e1a7c\0", "~root/.ssh/id_rsa", "*", "20250301-142501-6C1F0A93B2-4E1A7C"]
OPENED: list[str] = []
WATCHING = [False]


def _watch_opens(event: str, args: tuple) -> None:
    if WATCHING[0] and event == "open" and isinstance(args[0], (str, bytes)):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_watch_opens)


@pytest.mark.parametrize("command", ["show", "release", "delete"])
@pytest.mark.parametrize("hostile", HOSTILE_IDS, ids=range(len(HOSTILE_IDS)))
def test_an_id_that_is_not_a_name_the_gateway_makes_is_refused_before_anything_is_opened(
        gateway, command, hostile):
    config = gateway()
    OPENED.clear()
    WATCHING[0] = True
    try:
        run = quarantine(config, command, "--", hostile) if command != "delete" else \
            quarantine(config, command, "20250301-142501-6C1F0A93B2-4e1a7c", "--", hostile)
    finally:
        WATCHING[0] = False
    assert run.code == 75, run.stderr
    assert run.first_line.startswith("4.3.5 usage: Invalid value for 'ID") and "is not a quarantine id" in run.first_line
    # not even the rule file: refused while the command line is parsed (modules may load)
    assert [path for path in OPENED if not path.endswith((".py", ".pyc"))] == []


def test_purge_removes_only_what_is_older_than_asked(gateway, tmp_path):
    config = gateway()
    ages = {"fresh": 0, "29 days": 29, "31 days": 31, "a year": 365}
    ids = {age: _aged(discard(config), tmp_path / "quarantine", days) for age, days in ages.items()}
    folder = tmp_path / "quarantine"
    (folder / "notes.txt").write_text("the administrator's own file\n")
    os.utime(folder / "notes.txt", (0, 0))
    orphan = _aged(discard(config), folder, 90)
    (folder / f"{orphan}.eml").unlink()                  # a record whose message is gone
    dry = quarantine(config, "purge", "--older-than", "30d", "--dry-run")
    assert dry.code == 0 and dry.stdout.decode().count("would remove") == 4, dry.stdout
    assert len(list(folder.glob("*.eml"))) == 4

    run = quarantine(config, "purge", "--older-than", "30d")
    assert run.code == 0, run.stderr
    assert "removed 3 entries" in run.stdout.decode()
    assert sorted(entry["id"] for entry in listed(config)) == sorted([ids["fresh"], ids["29 days"]])
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{ids[age]}{suffix}" for age in ("fresh", "29 days") for suffix in (".eml", ".json")] + ["notes.txt"])
    assert f"quarantine purge {ids['a year']} by root (uid 0)" in (tmp_path / "gate.log").read_text()


def _aged(id: str, folder: Path, days: float) -> str:
    """Make the entry ``id`` look ``days`` old, as its record says when it was kept."""
    record = folder / f"{id}.json"
    data = json.loads(record.read_text())
    data["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - days * 86_400 - 60))
    record.write_text(json.dumps(data))
    return id


# -- release ----------------------------------------------------------------------------------------

def test_an_age_in_m_is_refused_as_months_or_minutes_could_be_meant(gateway, tmp_path):
    config = gateway()
    id = _aged(discard(config), tmp_path / "quarantine", 1)
    run = quarantine(config, "purge", "--older-than", "6m")
    assert run.code != 0 and "m is not a unit" in run.stderr
    assert [entry["id"] for entry in listed(config)] == [id]
    assert quarantine(config, "purge", "--older-than", "90min").code == 0
    assert listed(config) == []


@pytest.mark.parametrize("how", ["a link", "nesting"])
def test_a_record_that_cannot_be_read_is_said_and_the_others_still_listed(gateway, tmp_path, how):
    config = gateway()
    broken, fine = discard(config), discard(config)
    record = tmp_path / "quarantine" / f"{broken}.json"
    record.unlink()
    if how == "a link":
        record.symlink_to(record)            # ELOOP when opened
    else:
        record.write_text("[" * 100_000 + "]" * 100_000)
    for args in (("list", "--json"), ("show", broken), ("purge", "--older-than", "30d")):
        run = quarantine(config, *args)
        assert run.code == 0, (args, run.stderr)
    entries = {entry["id"]: entry for entry in listed(config)}
    assert entries[broken]["verdict"] == "(unreadable record)" and entries[fine]["verdict"] == "infected"


def test_release_goes_through_the_sendmail_command_byte_for_byte_with_the_envelope(gateway, recorder, tmp_path):
    sendmail, calls = recorder()
    config = gateway(f'sendmail_command = ["{sendmail}", "-i"]\n')
    data = (b"From: alice@example.org\nTo: ann@example.com\nSubject: caf\xe9\n\nFrom the start\n.\n"
            b"..two dots\n\xff\xfe bytes that are no UTF-8\n\ttab\n")
    id = discard(config, data)
    run = quarantine(config, "release", id)
    assert run.code == 0, run.stderr
    [call] = recorded_calls(calls)
    assert call["argv"] == ["-i", "-f", SENDER, "--", ANN, BOB]
    assert call["data"].encode("latin-1") == data


def test_release_takes_the_loop_suffix_as_delivery_does(gateway, smtp_sink):
    config = gateway('loop_suffix = ".ispmailgate"\n')
    id = discard(config)
    assert quarantine(config, "release", id).code == 0
    assert smtp_sink.messages[0].rcpt_tos == [ANN + ".ispmailgate", BOB + ".ispmailgate"]


def test_a_deferring_next_hop_makes_75_and_the_next_release_delivers_once(gateway, smtp_sink):
    config = gateway()
    id = discard(config)
    smtp_sink.handler.data_reply = "451 4.3.0 try again later"
    run = quarantine(config, "release", id)
    assert run.code == 75 and smtp_sink.messages == []
    assert f"<{ANN}>: deferred: 451 4.3.0 try again later" in run.stdout.decode()
    assert "release it again later" in run.stderr
    assert listed(config)[0]["state"] == "kept"
    smtp_sink.handler.data_reply = None
    assert quarantine(config, "release", id).code == 0
    assert [m.rcpt_tos for m in smtp_sink.messages] == [[ANN, BOB]]


def test_no_next_hop_at_all_makes_75(gateway, smtp_sink):
    config = gateway()
    id = discard(config)
    config.write_text(config.read_text().replace(smtp_sink.address, "127.0.0.1:9"))
    run = quarantine(config, "release", id)
    assert run.code == 75 and "deferred: 451 4.4.1" in run.stdout.decode()


def test_a_recipient_the_next_hop_refused_is_the_only_one_a_second_release_sends_to(gateway, smtp_sink):
    config = gateway()
    id = discard(config)
    smtp_sink.handler.rcpt_replies[BOB] = "550 5.1.1 no such user"
    run = quarantine(config, "release", id)
    assert run.code == 69 and f"not released to <{BOB}>" in run.stderr
    assert [m.rcpt_tos for m in smtp_sink.messages] == [[ANN]]
    assert listed(config)[0]["state"] == "part-released"
    del smtp_sink.handler.rcpt_replies[BOB]
    assert quarantine(config, "release", id).code == 0
    assert [m.rcpt_tos for m in smtp_sink.messages] == [[ANN], [BOB]]      # ann once, bob once
    assert quarantine(config, "release", id).code == 69


def test_release_to_other_recipients_and_from_another_sender(gateway, smtp_sink):
    config = gateway()
    id = discard(config)
    run = quarantine(config, "release", id, "--to", "helpdesk@example.com", "--to", "cert@example.com",
                     "-f", "quarantine@gw.example")
    assert run.code == 0, run.stderr
    [received] = smtp_sink.messages
    assert (received.mail_from, received.rcpt_tos) == ("quarantine@gw.example", ["helpdesk@example.com",
                                                                                 "cert@example.com"])
    assert quarantine(config, "release", id, "--to", "cert@example.com").code == 69     # has it
    assert quarantine(config, "release", id, "--to", "cert@EXAMPLE.com").code == 69     # the same domain
    assert quarantine(config, "release", id).code == 0          # the original recipients have not
    assert smtp_sink.messages[-1].rcpt_tos == [ANN, BOB] and smtp_sink.messages[-1].mail_from == SENDER


@pytest.mark.parametrize("bad", ["a@b\r\nRCPT TO:<evil@x>", "a@b>", "a b@c", "a\0@b"])
def test_a_recipient_no_next_hop_could_be_given_is_refused_and_nothing_sent(gateway, smtp_sink, bad):
    config = gateway()
    id = discard(config)
    run = quarantine(config, "release", id, "--to", bad)
    assert run.code == 69 and "bad recipient address" in run.stderr
    assert smtp_sink.messages == [] and listed(config)[0]["releases"] == []


def test_an_entry_another_command_holds_is_not_released_nor_deleted(gateway, smtp_sink, tmp_path):
    config = gateway()
    id = discard(config)
    with open(tmp_path / "quarantine" / f"{id}.eml", "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        release, delete = quarantine(config, "release", id), quarantine(config, "delete", id)
    assert (release.code, delete.code) == (75, 75) and "being released or deleted" in release.stderr
    assert smtp_sink.messages == [] and len(listed(config)) == 1


def test_a_release_whose_answer_was_never_written_down_stops_the_next_until_forced(gateway, smtp_sink, tmp_path):
    from ispmailgate_filters.kept import Record

    config = gateway()
    id = discard(config)
    path = tmp_path / "quarantine" / f"{id}.json"
    record = Record.from_json(path.read_bytes(), id, 0)
    started = {"time": "2025-03-01T06:00:00Z", "by": "root (uid 0)", "to": [ANN, BOB], "state": "started"}
    path.write_bytes(record.with_release(started).to_json())
    assert listed(config)[0]["state"] == "release?"
    run = quarantine(config, "release", id)
    assert run.code == 69 and "never wrote down the next hop's answer" in run.stderr
    assert smtp_sink.messages == []
    assert quarantine(config, "release", "--force", id).code == 0 and len(smtp_sink.messages) == 1


def test_a_kept_message_that_changed_since_is_not_released_unless_forced(gateway, smtp_sink, tmp_path):
    config = gateway()
    id = discard(config)
    kept = tmp_path / "quarantine" / f"{id}.eml"
    kept.write_bytes(kept.read_bytes().replace(b"invoice", b"INVOICE"))
    run = quarantine(config, "release", id)
    assert run.code == 69 and "changed since it was kept" in run.stderr and smtp_sink.messages == []
    assert quarantine(config, "release", id, "--force").code == 0
    assert b"INVOICE" in smtp_sink.messages[0].content


def test_an_unknown_id_is_no_such_entry(gateway):
    config = gateway()
    discard(config)
    for command in ("show", "release", "delete"):
        run = quarantine(config, command, "20250301-142501-6C1F0A93B2-4e1a7c")
        assert run.code == 69 and "no such entry" in run.stderr, (command, run.stderr)


# -- keep/ and the older forms ----------------------------------------------------------------------

def test_a_keep_copy_is_listed_with_its_envelope_and_released_only_by_force(config_file, smtp_sink, tmp_path,
                                                                            parser_gives_up):
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\npostmaster = "pm@gw.example"\n'
                         '[[recipients]]\nfilters = ["gate_test_filters:StampAny"]\n')
    assert run_inline(["-c", str(config), "-f", SENDER, ANN], PLAIN).code == 0
    delivered = len(smtp_sink.messages)         # the message itself and the postmaster's notice
    [entry] = listed(config)
    assert (entry["sender"], entry["recipients"], entry["verdict"], entry["state"]) == (
        SENDER, [ANN], "unparsable", "delivered")
    assert entry["quarantine"] == str(tmp_path / "spool" / "keep") and entry["kept_by"] == "ispmailgate"
    run = quarantine(config, "release", entry["id"])
    assert run.code == 69 and "delivered when it was kept" in run.stderr
    assert len(smtp_sink.messages) == delivered
    assert quarantine(config, "release", "--force", entry["id"]).code == 0
    assert smtp_sink.messages[-1].content == crlf(PLAIN)


def test_entries_in_the_older_forms_are_read_and_released(gateway, smtp_sink, tmp_path):
    config = gateway()
    folder, keep = tmp_path / "quarantine", tmp_path / "spool" / "keep"
    for directory in (folder, keep):
        directory.mkdir(mode=0o700, parents=True)
    old = "20250301-142501-6C1F0A93B2-4e1a7c"           # virscan's record before issue 21
    (folder / f"{old}.eml").write_bytes(PLAIN)
    (folder / f"{old}.json").write_text(json.dumps({
        "sender": SENDER, "recipients": [ANN], "verdict": "infected",
        "findings": [{"object": "part 1", "verdict": "infected", "detail": "Old.Virus"}]}, indent=1))
    bare = "20250301-142502-6C1F0A93B3"                 # keep/ before issue 21: no record at all
    (keep / f"{bare}.eml").write_bytes(PLAIN)
    entries = {entry["id"]: entry for entry in listed(config)}
    assert (entries[old]["sender"], entries[old]["recipients"], entries[old]["state"]) == (SENDER, [ANN], "kept")
    assert (entries[bare]["sender"], entries[bare]["recipients"], entries[bare]["state"]) == (None, None, "delivered")

    assert quarantine(config, "release", old).code == 0
    upgraded = json.loads((folder / f"{old}.json").read_text())
    assert upgraded["format"] == 2 and upgraded["findings"][0]["detail"] == "Old.Virus"
    assert upgraded["releases"][0]["results"][ANN]["state"] == "accepted"

    run = quarantine(config, "release", bare, "--force")
    assert run.code == 69 and "no envelope was kept" in run.stderr
    run = quarantine(config, "release", bare, "--force", "-f", SENDER, "--to", BOB)
    assert run.code == 0, run.stderr
    assert [(m.mail_from, m.rcpt_tos, m.content) for m in smtp_sink.messages] == [
        (SENDER, [ANN], crlf(PLAIN)), (SENDER, [BOB], crlf(PLAIN))]


# -- list, show, delete --------------------------------------------------------------------------

def test_list_filters_by_time_and_verdict_and_prints_a_table_and_ids(gateway, tmp_path):
    config = gateway()
    fresh = discard(config)
    old = _aged(discard(config), tmp_path / "quarantine", 3)
    assert [e["id"] for e in listed(config)] == [old, fresh]            # oldest first
    since = quarantine(config, "list", "--json", "--since", "2d")
    assert [e["id"] for e in json.loads(since.stdout)] == [fresh]
    date = time.strftime("%Y-%m-%d", time.localtime(time.time() - 86_400))
    assert [e["id"] for e in json.loads(quarantine(config, "list", "--json", "--since", date).stdout)] == [fresh]
    assert json.loads(quarantine(config, "list", "--json", "--verdict", "unscannable").stdout) == []
    assert quarantine(config, "list", "-q").stdout.decode().split() == [old, fresh]
    table = quarantine(config, "list").stdout.decode().splitlines()
    assert table[0].split() == ["ID", "KEPT", "SIZE", "VERDICT", "STATE", "SENDER", "RECIPIENTS", "FINDINGS"]
    assert table[2].startswith(fresh) and f"<{SENDER}>" in table[2] and "infected" in table[2]
    bad = quarantine(config, "list", "--since", "last tuesday")
    assert bad.code == 75 and "--since" in bad.first_line


def test_list_with_nothing_kept_yet(gateway):
    config = gateway()
    assert listed(config) == []
    assert "(nothing kept)" in quarantine(config, "list").stdout.decode()


def test_show_gives_the_envelope_findings_and_a_header_without_control_characters(gateway, tmp_path):
    config = gateway()
    data = (b"From: alice@example.org\nTo: ann@example.com\nSubject: \x1b[2J\x1b]0;owned\x07 hi \xe2\x80\xae\n"
            b"X-Long: " + b"a" * 70_000 + b"\n\nbody\n")
    id = discard(config, data)
    run = quarantine(config, "show", id + ".eml")           # a file name of list's is an id too
    assert run.code == 0, run.stderr
    text = run.stdout.decode()
    assert f"sender:      <{SENDER}>" in text and f"recipients:  <{ANN}>, <{BOB}>" in text
    assert "verdict:     infected" in text and "Test.Virus" in text
    assert "  Subject: ?[2J?]0;owned? hi ?" in text and "\x1b" not in text and "\u202e" not in text
    assert "only its first 64 KiB are shown" in text and "body" not in text


def test_delete_removes_the_message_and_its_record(gateway, tmp_path):
    config = gateway()
    first, second = discard(config), discard(config)
    run = quarantine(config, "delete", first, "20250301-142501-6C1F0A93B2-4e1a7c")
    assert run.code == 69 and f"deleted {first}" in run.stdout.decode() and "no such entry" in run.stderr
    assert [e["id"] for e in listed(config)] == [second]
    assert not list((tmp_path / "quarantine").glob(f"{first}*"))
    assert f"quarantine delete {first} by root (uid 0)" in (tmp_path / "gate.log").read_text()


def test_quarantine_after_double_dash_is_a_recipient(config_file):
    config = config_file()
    run = run_inline(["-c", str(config), "--stdout", "-f", SENDER, "--", "quarantine"], PLAIN)
    assert run.code == 0 and run.stdout == PLAIN


# -- privileges: dropped as in a one-shot run; a quarantine others can write is refused ------------

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


@pytest.fixture
def nobodys_gateway(infected_scanner):
    """Started as root, a gateway whose mail_user is nobody, with one entry in a quarantine
    of nobody's: (rule file, quarantine, the entry's id, where the sendmail command records).
    In a folder of its own under /tmp: pytest's are closed to other users."""
    import pwd
    import shutil
    import tempfile

    from ispmailgate_filters.kept import keep

    nobody = pwd.getpwnam("nobody")
    home = Path(tempfile.mkdtemp(prefix="qn", dir="/tmp"))
    home.chmod(0o755)
    for name in ("calls", "spool"):         # what the mail user writes: its own
        (home / name).mkdir()
        os.chown(home / name, nobody.pw_uid, nobody.pw_gid)
    sendmail = home / "sendmail"
    sendmail.write_text("#!/usr/bin/python3\nimport json, os, sys\ndata = sys.stdin.buffer.read()\n"
                        f"open({str(home / 'calls' / 'log')!r}, 'a').write(json.dumps({{'uid': os.getuid(), "
                        "'argv': sys.argv[1:], 'data': data.decode('latin-1')}) + '\\n')\n")
    sendmail.chmod(0o755)
    folder = home / "q"
    kept = keep(str(folder), PLAIN, run_id="0123456789", sender=SENDER, recipients=(ANN,), kept_by="av",
                action="discarded", verdict="infected")
    for path in (folder, *folder.iterdir()):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    config = home / "ispmailgate.toml"
    config.write_text(f'mail_user = "nobody"\ntmp_dir = "{home / "spool"}"\nlog_file = "{home / "calls" / "gate.log"}"\n'
                      f'sendmail_command = ["{sendmail}"]\n[filter.av]\ntype = "virscan"\nscanner = "command"\n'
                      f'scanner_unpacks = []\ncommand = ["{infected_scanner}", "{{paths}}"]\n'
                      f'quarantine_dir = "{folder}"\n')
    try:
        yield config, folder, kept.stem, home / "calls" / "log"
    finally:
        shutil.rmtree(home, ignore_errors=True)


def gate_quarantine(config: Path, *args: str):
    from conftest import run_gate

    return run_gate(["quarantine", *args, "-c", str(config)], b"")


@ROOT_ONLY
def test_started_as_root_the_commands_work_as_mail_user_and_release_as_it(nobodys_gateway):
    import pwd

    config, folder, id, calls = nobodys_gateway
    run = gate_quarantine(config, "list", "--json")
    assert run.code == 0, run.stderr                 # as root, nobody's quarantine would be refused
    assert [entry["id"] for entry in json.loads(run.stdout)] == [id]
    run = gate_quarantine(config, "release", id)
    assert run.code == 0, run.stderr
    [call] = recorded_calls(calls)
    assert call["uid"] == pwd.getpwnam("nobody").pw_uid and call["data"].encode("latin-1") == PLAIN
    assert json.loads((folder / f"{id}.json").read_text())["releases"][0]["by"] == "root (uid 0)"
    assert {(p.stat().st_uid, p.stat().st_mode & 0o777) for p in folder.iterdir()} == {
        (pwd.getpwnam("nobody").pw_uid, 0o600)}      # the record rewritten as nobody's, 0600


@ROOT_ONLY
@pytest.mark.parametrize("planted", ["root's own", "writable by others", "a link"])
def test_a_quarantine_that_is_not_mail_users_own_and_closed_is_refused(nobodys_gateway, planted):
    import pwd

    config, folder, id, calls = nobodys_gateway
    if planted == "root's own":
        os.chown(folder, 0, 0)
        reason = f"it is owned by root (uid 0), not by nobody (uid {pwd.getpwnam('nobody').pw_uid}) as whom"
    elif planted == "writable by others":
        folder.chmod(0o733)
        reason = "others can write it (mode 0733"
    else:
        folder.rename(folder.parent / "elsewhere")
        folder.symlink_to(folder.parent / "elsewhere")
        reason = "it is a symbolic link"
    for args in (("list",), ("show", id), ("release", id), ("delete", id), ("purge", "--older-than", "0s")):
        run = gate_quarantine(config, *args)
        assert run.code == 78, (args, run.stderr)
        assert f"refused to read quarantine {folder} (av): {reason}" in run.stderr, args
    assert recorded_calls(calls) == [] and len(list(folder.iterdir())) == 2


@ROOT_ONLY
def test_as_root_a_quarantine_below_a_folder_others_control_is_refused(config_file, tmp_path, infected_scanner):
    import pwd

    nobodys = tmp_path / "nobodys"
    nobodys.mkdir()
    os.chown(nobodys, pwd.getpwnam("nobody").pw_uid, -1)
    (nobodys / "q").mkdir(mode=0o700)            # root's, but nobody could swap it
    config = config_file(f'[filter.av]\ntype = "virscan"\nscanner = "command"\nscanner_unpacks = []\n'
                         f'command = ["{infected_scanner}", "{{paths}}"]\nquarantine_dir = "{nobodys / "q"}"\n')
    run = quarantine(config, "list")
    assert run.code == 78 and "owned by uid" in run.stderr and str(nobodys) in run.stderr
