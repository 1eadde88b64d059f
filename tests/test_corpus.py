"""The test corpus (tests/corpus/) through the dummy chain: byte for byte, on every next hop, no crash."""

from __future__ import annotations

import re

import pytest

from conftest import corpus_messages, crlf, recorded_calls, run_gate, run_inline, without_from_line

MESSAGES = corpus_messages()


@pytest.mark.parametrize("path", MESSAGES, ids=lambda p: p.name)
def test_stdout_is_byte_identical(path, config_file):
    config = config_file('default_filter = ["dummy"]\n')
    data = path.read_bytes()
    run = run_gate(["--config", str(config), "--stdout", "-f", "a@example.org", "b@example.com"], data)
    assert run.code == 0, run.stderr
    assert run.stdout == data           # the From_ line included: procmail expects it back
    assert run.stderr == ""


@pytest.mark.parametrize("path", MESSAGES, ids=lambda p: p.name)
def test_smtp_wire_carries_the_input(path, config_file, smtp_sink):
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\n')
    data = path.read_bytes()
    run = run_inline(["-c", str(config), "-f", "a@example.org", "b@example.com"], data)
    assert run.code == 0, run.stderr
    [received] = smtp_sink.messages
    assert received.content == crlf(without_from_line(data))
    assert received.rcpt_tos == ["b@example.com"]


@pytest.mark.parametrize("path", MESSAGES, ids=lambda p: p.name)
def test_sendmail_gets_native_line_ends(path, config_file, recorder):
    script, calls = recorder(0)
    config = config_file(f'sendmail_command = ["{script}", "-oi"]\n')
    data = path.read_bytes()
    run = run_inline(["-c", str(config), "-f", "a@example.org", "b@example.com"], data)
    assert run.code == 0, run.stderr
    [call] = recorded_calls(calls)
    assert call["argv"] == ["-oi", "-f", "a@example.org", "--", "b@example.com"]
    expected = without_from_line(data).replace(b"\r\n", b"\n")
    assert call["data"].encode("latin-1") == expected + (b"" if expected.endswith(b"\n") else b"\n")


@pytest.mark.parametrize("path", MESSAGES, ids=lambda p: p.name)
def test_every_part_survives_a_full_parse_and_rebuild(path):
    from ispmailgate_filters.mime import Message

    data = without_from_line(path.read_bytes())
    message = Message(data)
    for part in message.walk():       # force every part to be reassembled from its pieces
        part._dirty = True
    assert message.to_bytes() == data


def test_corpus_messages_with_a_changing_filter_keep_other_parts(config_file):
    """One changed part: every other leaf stays byte-identical (multipart corpus messages)."""
    from ispmailgate_filters.mime import Message

    config = config_file('default_filter = ["gate_test_filters:Upcase"]\n')
    checked = 0
    for path in MESSAGES:
        data = without_from_line(path.read_bytes())
        before = [p.to_bytes() for p in Message(data).leaves()]
        run = run_inline(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], data)
        assert run.code == 0, (path.name, run.stderr)
        after = [p.to_bytes() for p in Message(run.stdout).leaves()]
        assert len(before) == len(after), path.name
        changed = [i for i, (x, y) in enumerate(zip(before, after)) if x != y]
        assert len(changed) <= 1, (path.name, changed)
        checked += len(before) > 1
    assert checked >= 20


def test_the_corpus_readme_describes_every_message_and_no_other():
    from conftest import CORPUS

    listed = set(re.findall(r"^\| `([^`]+\.eml)` \|", (CORPUS / "README.md").read_text(), re.M))
    assert listed == {path.name for path in MESSAGES}


def test_a_damaged_uuencoded_line_decodes_to_what_its_length_promises():
    """Found by the fuzz target from uuencoded-part.eml: one bad character made the whole
    part a filter error (binascii.Error) instead of a decoded body."""
    from conftest import CORPUS
    from ispmailgate_filters.mime import Message

    data = (CORPUS / "uuencoded-part.eml").read_bytes()
    [part] = [p for p in Message(data).leaves() if p.transfer_encoding == "x-uuencode"]
    good = part.decoded()
    first = part.body.split(b"\n")[1]                 # the line after "begin 644 table.csv"
    damaged = Message(data.replace(first, first[:5] + b"\xff\x7f" + first[7:], 1))
    [part] = [p for p in damaged.leaves() if p.transfer_encoding == "x-uuencode"]
    decoded = part.decoded()
    assert len(decoded) == len(good) and decoded[45:] == good[45:]
