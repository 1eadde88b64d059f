"""Mail the MIME parser could once not handle, and what the chain does when it gives up
(attack review 1, finding 1: one small part made every filter skipped, fail open)."""

from __future__ import annotations

import json

import pytest

from conftest import run_inline
from ispmailgate_filters.mime import Message

# RFC 2231 values that decode, in a codec of Python's, to a lone surrogate: the parser
# raised on ``boundary.encode("utf-8")`` and on_parse_error = "deliver" skipped every step.
HOSTILE = [
    b"From: a@x.example\nSubject: s\nMIME-Version: 1.0\n"
    b"Content-Type: multipart/mixed; boundary*=utf-7''%2B2AA-\n\n--+2AA-\n\nhello\n--+2AA---\n",
    b"From: a@x.example\nSubject: s\nMIME-Version: 1.0\n"
    b"Content-Type: multipart/mixed; boundary*=unicode-escape''%5Cud800\n\n--x\n\nhello\n--x--\n",
    b"From: a@x.example\nSubject: =?utf-7?q?+2AA-?=\nMIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=utf-7; name*=utf-7''%2B2AA-\n\n+2AA- hello\n",
]


@pytest.mark.parametrize("data", HOSTILE)
def test_what_a_codec_makes_of_sender_bytes_never_stops_the_parser(data):
    message = Message(data)
    assert message.unparsed is None
    for part in message.walk():
        for text in (part.param("boundary"), part.filename, part.text() if part.is_leaf else ""):
            (text or "").encode("utf-8")        # no lone surrogate left in it
    assert message.headers.decoded("Subject").encode("utf-8")


@pytest.mark.parametrize("data", HOSTILE)
def test_every_step_runs_on_such_mail(config_file, data):
    config = config_file('default_filter = ["gate_test_filters:Stamp"]\n')
    run = run_inline(["-c", str(config), "--stdout", "-f", "s@x.example", "a@x.example"], data)
    assert run.code == 0, run.stderr
    assert run.stdout == b"X-Stamp: yes\n" + data


SIMPLE = b"From: a@x.example\nSubject: hello\nX-ispMailGate-PGP-Result: good signature (forged)\n\nbody\n"


def test_a_step_that_cannot_keep_its_promise_on_unparsed_mail_is_a_filter_error(
        config_file, smtp_sink, parser_gives_up):
    """Stamp declares nothing: it must not be skipped in silence (the message goes to the
    postmaster as a filter error, the recipient gets nothing)."""
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\npostmaster = "pm@gw"\n'
                         'default_filter = ["gate_test_filters:Stamp"]\n')
    run = run_inline(["-c", str(config), "-f", "s@x.example", "a@x"], SIMPLE)
    assert run.code == 0, run.stderr
    assert [m.rcpt_tos for m in smtp_sink.messages] == [["pm@gw"]]
    assert b"cannot be parsed" in smtp_sink.messages[0].content


def test_a_step_that_processes_unparsed_mail_runs_and_the_postmaster_is_told(
        config_file, smtp_sink, tmp_path, parser_gives_up):
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\npostmaster = "pm@gw"\n'
                         'default_filter = ["gate_test_filters:StampAny"]\n')
    run = run_inline(["-c", str(config), "-f", "s@x.example", "a@x"], SIMPLE)
    assert run.code == 0, run.stderr
    delivered = [m for m in smtp_sink.messages if m.rcpt_tos == ["a@x"]]
    notices = [m for m in smtp_sink.messages if m.rcpt_tos == ["pm@gw"]]
    assert delivered[0].content == b"X-Stamp: yes\r\n" + SIMPLE.replace(b"\n", b"\r\n")
    assert b"parse error" in notices[0].content
    [kept] = (tmp_path / "spool" / "keep").glob("*.eml")      # its envelope beside it (.json)
    assert kept.read_bytes() == SIMPLE


def test_an_unparsed_message_is_kept_once_and_told_once_however_many_chains(
        config_file, smtp_sink, tmp_path, parser_gives_up):
    """Attack review 2, finding 5: a copy and a notice per delivery group (20 recipients with
    20 chains: 20 copies of a 5 MB message, 20 notices, 20 transactions)."""
    rules = "".join(f'[filter.s{n}]\ntype = "gate_test_filters:StampAny"\nvalue = "v{n}"\n'
                    f'[[recipients]]\nrecipient = "^r{n}@"\nfilters = ["s{n}"]\n' for n in range(6))
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\npostmaster = "pm@gw"\n{rules}')
    recipients = [f"r{n}@x" for n in range(6)]
    run = run_inline(["-c", str(config), "-f", "s@x.example", *recipients], SIMPLE)
    assert run.code == 0, run.stderr
    assert sorted(m.rcpt_tos for m in smtp_sink.messages) == sorted([[r] for r in recipients] + [["pm@gw"]])
    [kept] = (tmp_path / "spool" / "keep").glob("*.json")
    assert sorted(json.loads(kept.read_text())["recipients"]) == recipients


def test_pgp_neg_on_unparsed_mail_removes_forged_verdicts(parser_gives_up, tmp_path):
    """The sender's X-ispMailGate-PGP-Result is never delivered beside (or instead of) ours."""
    import logging

    from ispmailgate_filters.base import Context, Envelope
    from ispmailgate_filters.pgp import Pgp

    message = Message(SIMPLE)
    ctx = Context(Envelope("s@x.example", ("a@x",)), message_id="T1", log=logging.getLogger("test"),
                  workdir=lambda: tmp_path, postmaster="postmaster")
    Pgp(direction="neg", gnupghome=str(tmp_path)).process(message, ctx)
    assert message.unparsed is not None
    assert b"(forged)" not in bytes(message.to_bytes())


def test_the_messages_own_content_is_parsed_again_within_its_configured_limits():
    """banner's wrap and the signing helpers re-parsed with the built-in limits (leftover)."""
    parts = b"".join(b"--z\nContent-Type: text/plain\n\npart %d\n" % i for i in range(50))
    entity = b'Content-Type: multipart/mixed; boundary="z"\n\n' + parts + b"--z--\n"
    message = Message(b"From: a@x.example\n\nhi\n", max_parts=10)
    again = message.parse_again(entity)
    assert sum(1 for _ in again.walk()) <= 11          # 51 with the built-in limits
    assert sum(1 for _ in Message(entity).root.walk()) == 51
