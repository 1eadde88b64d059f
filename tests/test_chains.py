"""Chains: shared work (IsEq), verdicts, and what each outcome means for the MTA."""

from __future__ import annotations

import email
import email.policy
import json

import pytest

from conftest import CORPUS, run_gate, run_inline

SIMPLE = (CORPUS / "plain.eml").read_bytes()
MULTI = (CORPUS / "two-images.eml").read_bytes()


def counter(path, tag: str) -> str:
    return f'[filter.{tag}]\ntype = "gate_test_filters:Counter"\npath = "{path}"\ntag = "{tag}"\n'


def test_hundred_recipients_with_one_chain_cost_one_run(config_file, smtp_sink, tmp_path):
    runs = tmp_path / "runs"
    config = config_file(f'mail_host = "{smtp_sink.address}"\ndefault_filter = ["count"]\n'
                         + counter(runs, "count"))
    recipients = [f"user{i}@example.com" for i in range(100)]
    run = run_inline(["-c", str(config), "-f", "a@b.example", *recipients], SIMPLE)
    assert run.code == 0, run.stderr
    assert len(runs.read_text().splitlines()) == 1
    [received] = smtp_sink.messages            # one transaction for all of them
    assert len(received.rcpt_tos) == 100


def test_shared_prefix_runs_once_and_branches_split(config_file, smtp_sink, tmp_path):
    runs = tmp_path / "runs"
    config = config_file(f'''
        mail_host = "{smtp_sink.address}"
        loop_suffix = ""
        default_filter = ["first", "stamp_a"]
        [[recipients]]
        recipient = '^b'
        filters = ["first", "stamp_b"]
        [[recipients]]
        recipient = '^c'
        filters = ["first"]
        [filter.stamp_a]
        type = "gate_test_filters:Stamp"
        value = "a"
        [filter.stamp_b]
        type = "gate_test_filters:Stamp"
        value = "b"
    ''' + counter(runs, "first"))
    run = run_inline(["-c", str(config), "-f", "s@x.example", "a1@x", "b1@x", "c1@x", "a2@x"], SIMPLE)
    assert run.code == 0, run.stderr
    assert runs.read_text().splitlines() == ["first a1@x,b1@x,c1@x,a2@x"]
    by_recipients = {tuple(m.rcpt_tos): m.content for m in smtp_sink.messages}
    assert set(by_recipients) == {("a1@x", "a2@x"), ("b1@x",), ("c1@x",)}
    assert by_recipients[("a1@x", "a2@x")].startswith(b"X-Stamp: a\r\n")
    assert by_recipients[("b1@x",)].startswith(b"X-Stamp: b\r\n")
    assert by_recipients[("c1@x",)] == SIMPLE.replace(b"\n", b"\r\n")


def test_identical_results_from_different_chains_are_delivered_once(config_file, smtp_sink):
    config = config_file(f'''
        mail_host = "{smtp_sink.address}"
        [[recipients]]
        recipient = '^a'
        filters = ["dummy"]
        [[recipients]]
        recipient = '^b'
        filters = ["dummy", "dummy"]
    ''')
    run = run_inline(["-c", str(config), "-f", "s@x.example", "a@x", "b@x"], SIMPLE)
    assert run.code == 0, run.stderr
    assert len(smtp_sink.messages) == 1


def test_per_recipient_variants_split_a_step(config_file, smtp_sink):
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\ndefault_filter = ["j"]\n'
                         '[filter.j]\ntype = "gate_test_filters:Judge"\nverdict = "reject"\nonly = "bad@x"\n')
    run = run_inline(["-c", str(config), "-f", "s@x.example", "good@x", "bad@x"], SIMPLE)
    # good@x delivered, bad@x rejected by the filter: the sender gets our bounce, exit 0
    assert run.code == 0, run.stderr
    delivered = [m for m in smtp_sink.messages if m.rcpt_tos == ["good@x"]]
    bounces = [m for m in smtp_sink.messages if m.mail_from == "<>"]
    assert len(delivered) == 1 and len(bounces) == 1
    assert bounces[0].rcpt_tos == ["s@x.example"]
    dsn = email.message_from_bytes(bounces[0].content, policy=email.policy.default)
    assert dsn.get_content_type() == "multipart/report"
    status = dsn.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    assert "bad@x" in status.as_string() and "5.7.1" in status.as_string()


def test_reject_for_everybody_exits_69_with_the_status(config_file, smtp_sink):
    config = config_file(f'mail_host = "{smtp_sink.address}"\n'
                         'default_filter = ["gate_test_filters:Judge"]\n')
    run = run_gate(["-c", str(config), "-f", "s@x.example", "a@x", "b@x"], SIMPLE)
    assert run.code == 69
    assert run.first_line.startswith("5.7.1 judge: judged unacceptable")
    assert smtp_sink.messages == []


def test_discard_is_success_and_logged(config_file, smtp_sink, tmp_path):
    config = config_file(f'mail_host = "{smtp_sink.address}"\n'
                         '[filter.j]\ntype = "gate_test_filters:Judge"\nverdict = "discard"\n'
                         '[[recipients]]\nfilters = ["j"]\n')
    run = run_gate(["-c", str(config), "-f", "s@x.example", "a@x"], SIMPLE)
    assert run.code == 0 and run.stderr == ""
    assert smtp_sink.messages == []
    lines = [line for line in (tmp_path / "gate.log").read_text().splitlines()
             if "mail_user is root" not in line]      # the fixture's explicit root, warned about
    assert len(lines) == 1, lines            # one line per message, whatever the verdict
    assert "outcome=discarded by j: judged unwanted" in lines[0]


def test_a_tempfail_anywhere_delivers_nothing(config_file, smtp_sink):
    config = config_file(f'''
        mail_host = "{smtp_sink.address}"
        [filter.busy]
        type = "gate_test_filters:Judge"
        verdict = "tempfail"
        [[recipients]]
        recipient = '^slow'
        filters = ["busy"]
    ''')
    run = run_gate(["-c", str(config), "-f", "s@x.example", "fast@x", "slow@x"], SIMPLE)
    assert run.code == 75
    assert run.first_line.startswith("4.7.1 busy: judge is busy")
    assert smtp_sink.messages == []        # the retry delivers to both, exactly once


def test_filter_error_reports_to_the_postmaster_with_the_original(config_file, smtp_sink):
    config = config_file(f'mail_host = "{smtp_sink.address}"\npostmaster = "pm@gw.example"\n'
                         'loop_suffix = ""\ndefault_filter = ["gate_test_filters:Judge"]\n'
                         '[filter.crashy]\ntype = "gate_test_filters:Judge"\nverdict = "crash"\n'
                         '[[recipients]]\nfilters = ["crashy"]\n')
    run = run_gate(["-c", str(config), "-f", "s@x.example", "a@x"], MULTI)
    assert run.code == 0, run.stderr
    [report] = smtp_sink.messages
    assert (report.mail_from, report.rcpt_tos) == ("<>", ["pm@gw.example"])
    parsed = email.message_from_bytes(report.content, policy=email.policy.default)
    assert "crashy" in parsed["Subject"]
    text, attached = parsed.get_payload()
    assert "ZeroDivisionError" in text.get_content()
    assert attached.get_content_type() == "message/rfc822"
    body = report.content.split(b"Content-Disposition: attachment\r\n\r\n", 1)[1]
    assert body.startswith(MULTI.replace(b"\n", b"\r\n"))


def test_filter_error_report_carries_an_original_with_overlong_lines_in_base64(config_file, smtp_sink):
    """A line over SMTP's 998 octets would make the next hop refuse the whole report."""
    import base64

    config = config_file(f'mail_host = "{smtp_sink.address}"\npostmaster = "pm@gw.example"\n'
                         'loop_suffix = ""\n[filter.crashy]\ntype = "gate_test_filters:Judge"\n'
                         'verdict = "crash"\n[[recipients]]\nfilters = ["crashy"]\n')
    original = b"From: a@x.example\nX-Long: " + b"y" * 3000 + b"\n\n" + b"z" * 5000 + b"\n"
    run = run_gate(["-c", str(config), "-f", "s@x.example", "a@x"], original)
    assert run.code == 0, run.stderr
    [report] = smtp_sink.messages
    assert report.rcpt_tos == ["pm@gw.example"]
    parsed = email.message_from_bytes(report.content, policy=email.policy.default)
    text, attached = parsed.get_payload()
    assert attached.get_content_type() == "application/octet-stream"
    assert attached.get_filename() == "original.eml"
    assert base64.b64decode(attached.get_payload()) == original


@pytest.mark.parametrize("shape", ["bare CRs", "many recipients"])
def test_a_report_has_no_line_an_smtp_server_refuses(config_file, smtp_sink, shape):
    """A bare CR does not end an SMTP line; a long list of recipients is one line of text."""
    config = config_file(f'mail_host = "{smtp_sink.address}"\npostmaster = "pm@gw.example"\n'
                         'loop_suffix = ""\n[filter.crashy]\ntype = "gate_test_filters:Judge"\n'
                         'verdict = "crash"\n[[recipients]]\nfilters = ["crashy"]\n')
    if shape == "bare CRs":
        original, recipients = b"From: a@x.example\n\n" + b"word\r" * 600 + b"\n", ["a@x"]
    else:
        original, recipients = SIMPLE, [f"recipient-number-{n:04d}@x.example" for n in range(60)]
    run = run_gate(["-c", str(config), "-f", "s@x.example", *recipients], original)
    assert run.code == 0, run.stderr
    [report] = smtp_sink.messages
    assert report.rcpt_tos == ["pm@gw.example"]
    parsed = email.message_from_bytes(report.content, policy=email.policy.default)
    text = parsed.get_payload()[0].get_content()
    assert "crashy" in text and all(rcpt in text for rcpt in recipients)


def _one_fails(config_file, smtp_sink):
    """b@x's chain shares a@x's first step: a@x's result is ready first (as the review found)."""
    return config_file(f'mail_host = "{smtp_sink.address}"\npostmaster = "pm@gw.example"\n'
                       'loop_suffix = ""\n[filter.crashy]\ntype = "gate_test_filters:Judge"\n'
                       'verdict = "crash"\n[[recipients]]\nrecipient = "^b@"\nfilters = ["dummy", "crashy"]\n')


def test_a_report_refused_for_its_size_keeps_the_original_and_says_where(config_file, smtp_sink):
    """a@x has the message; a 75 now would give it a second copy on the retry."""
    from ispmailgate_filters.kept import Record

    config = _one_fails(config_file, smtp_sink)
    original = SIMPLE + b"\n" + b"filler line\n" * 300
    smtp_sink.handler.max_size = len(original) + original.count(b"\n") + 200    # CRLF on the wire
    keep = config.parent / "spool" / "keep"
    for order in (["a@x", "b@x"], ["b@x", "a@x"]):
        smtp_sink.handler.messages.clear()
        before = set(keep.glob("*.eml"))
        run = run_gate(["-c", str(config), "-f", "s@x.example", *order], original)
        assert run.code == 0, run.stderr
        report, delivered = smtp_sink.messages      # the report first: see the next test
        assert delivered.rcpt_tos == ["a@x"] and delivered.content == original.replace(b"\n", b"\r\n")
        assert report.rcpt_tos == ["pm@gw.example"] and b"Content-Type: message/rfc822" not in report.content
        [kept] = set(keep.glob("*.eml")) - before
        assert kept.read_bytes() == original
        assert f"quarantine release {kept.stem} delivers".encode() in report.content
        record = Record.from_json(kept.with_suffix(".json").read_bytes(), kept.stem, 0.0)
        assert (record.recipients, record.verdict, record.action) == (("b@x",), "failed", "discarded")


def test_a_report_that_must_be_retried_holds_back_every_result(config_file, smtp_sink):
    """The report goes first: deferred, it leaves nothing handed over for the retry to repeat."""
    original = SIMPLE + b"\n" + b"filler line\n" * 300
    smtp_sink.handler.max_size = len(original) + original.count(b"\n") + 200    # the report is larger
    smtp_sink.handler.too_big = "452 4.3.1 insufficient system storage"
    for order in (["a@x", "b@x"], ["b@x", "a@x"]):
        run = run_gate(["-c", str(_one_fails(config_file, smtp_sink)), "-f", "s@x.example", *order], original)
        assert run.code == 75, run.stderr
        assert smtp_sink.messages == []


def test_filter_error_can_be_a_tempfail_instead(config_file, smtp_sink):
    config = config_file(f'mail_host = "{smtp_sink.address}"\non_filter_error = "tempfail"\n'
                         '[filter.e]\ntype = "gate_test_filters:Judge"\nverdict = "error"\n'
                         '[[recipients]]\nfilters = ["e"]\n')
    run = run_gate(["-c", str(config), "-f", "s@x.example", "a@x"], SIMPLE)
    assert run.code == 75 and "judge could not decide" in run.first_line
    assert smtp_sink.messages == []


def test_filter_error_with_a_dead_next_hop_is_a_tempfail(config_file):
    config = config_file('mail_host = "127.0.0.1:9"\n[filter.e]\ntype = "gate_test_filters:Judge"\n'
                         'verdict = "error"\n[[recipients]]\nfilters = ["e"]\n')
    run = run_gate(["-c", str(config), "-f", "s@x.example", "a@x"], SIMPLE)
    assert run.code == 75


def test_verdicts_cannot_be_swallowed_by_a_filters_broad_except():
    from ispmailgate_filters.base import Reject, Verdict

    assert issubclass(Verdict, BaseException) and not issubclass(Verdict, Exception)
    try:
        try:
            raise Reject("no")
        except Exception:                 # what a careless filter writes
            raise AssertionError("swallowed") from None
    except Reject:
        pass


def test_a_step_that_cannot_parse_content_inside_the_message_is_a_filter_error(config_file, smtp_sink):
    """Never delivered as if every step had run (attack review 1, finding 1): the postmaster
    gets the report, the recipient nothing (on_filter_error = "report")."""
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\npostmaster = "pm@gw"\n'
                         '[filter.p]\ntype = "gate_test_filters:Judge"\nverdict = "parse"\n'
                         '[[recipients]]\nfilters = ["gate_test_filters:Stamp", "p"]\n')
    run = run_gate(["-c", str(config), "-f", "s@x.example", "a@x"], SIMPLE)
    assert run.code == 0, run.stderr
    assert [m.rcpt_tos for m in smtp_sink.messages] == [["pm@gw"]]
    assert b"cannot parse part of the message" in smtp_sink.messages[0].content


def test_a_kept_copy_is_private(config_file, smtp_sink, tmp_path, parser_gives_up):
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\npostmaster = "pm@gw"\n'
                         'default_filter = ["gate_test_filters:StampAny"]\n')
    run = run_inline(["-c", str(config), "-f", "s@x.example", "a@x"], SIMPLE)
    assert run.code == 0, run.stderr
    [kept] = (tmp_path / "spool" / "keep").glob("*.eml")
    assert kept.read_bytes() == SIMPLE
    record = json.loads(kept.with_suffix(".json").read_text())         # the envelope beside it
    assert (record["sender"], record["recipients"], record["action"]) == ("s@x.example", ["a@x"], "delivered")
    assert {oct(path.stat().st_mode & 0o777) for path in (kept, kept.with_suffix(".json"))} == {"0o600"}


def test_unparseable_message_can_be_a_tempfail_instead(config_file, smtp_sink, tmp_path):
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\npostmaster = "pm@gw"\n'
                         'on_parse_error = "tempfail"\n'
                         '[filter.p]\ntype = "gate_test_filters:Judge"\nverdict = "parse"\n'
                         '[[recipients]]\nfilters = ["p"]\n')
    run = run_gate(["-c", str(config), "-f", "s@x.example", "a@x"], SIMPLE)
    assert run.code == 75, run.stderr
    assert smtp_sink.messages == []          # neither the message nor a report: the MTA keeps it


def test_notices_from_filters_are_sent_after_delivery(config_file, smtp_sink):
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\npostmaster = "pm@gw"\n'
                         'default_filter = ["gate_test_filters:Notifier"]\n')
    run = run_inline(["-c", str(config), "-f", "s@x.example", "a@x"], SIMPLE)
    assert run.code == 0, run.stderr
    assert [m.rcpt_tos for m in smtp_sink.messages] == [["a@x"], ["pm@gw"]]
    assert b"test notice" in smtp_sink.messages[1].content


def test_header_only_change_leaves_the_body_byte_identical(config_file):
    config = config_file('default_filter = ["gate_test_filters:Stamp"]\n')
    run = run_inline(["-c", str(config), "--stdout", "-f", "s@x.example", "a@x"], MULTI)
    assert run.stdout == b"X-Stamp: yes\n" + MULTI


def test_a_field_added_on_top_never_takes_a_first_line_that_starts_with_white_space(config_file):
    from ispmailgate_filters.mime import Message

    config = config_file('default_filter = ["gate_test_filters:Stamp"]\n')
    run = run_inline(["-c", str(config), "--stdout", "-f", "s@x.example", "a@x"], b"\tinfected\nmore\n")
    assert run.stdout == b"X-Stamp: yes\n\n\tinfected\nmore\n"
    assert Message(run.stdout).headers.items() == [("X-Stamp", "yes")]


def test_one_changed_part_leaves_the_others_byte_identical(config_file):
    from ispmailgate_filters.mime import Message

    config = config_file('default_filter = ["gate_test_filters:Upcase"]\n')
    run = run_inline(["-c", str(config), "--stdout", "-f", "s@x.example", "a@x"], MULTI)
    before, after = Message(MULTI).root, Message(run.stdout).root
    assert before.headers.to_bytes() == after.headers.to_bytes()
    assert after.children[0].text() == before.children[0].text().upper()
    assert [p.to_bytes() for p in before.children[1:]] == [p.to_bytes() for p in after.children[1:]]
    assert before.preamble == after.preamble and before.epilogue == after.epilogue


def test_different_results_on_stdout_come_as_an_mbox(config_file):
    config = config_file('[[recipients]]\nrecipient = "^a"\nfilters = ["gate_test_filters:Stamp"]\n')
    run = run_inline(["-c", str(config), "--stdout", "-f", "s@x.example", "a@x", "b@x"], SIMPLE)
    assert run.code == 0
    assert run.stdout.count(b"\nFrom s@x.example ") + run.stdout.startswith(b"From s@x.example ") == 2
