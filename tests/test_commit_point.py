"""The commit point: once a next hop accepted the message, the run cannot end in 75.

Issue 14, finding 1: with the dummy chain the top header was parsed only for the log line
after delivery; the time limit fired there, the handler logged again, and the run exited
75 after the next hop had taken the mail -- the MTA delivered it again on every retry.
Here a failure is injected at every step that follows an acceptance (the log, the bounce,
the notices, the time limit, a signal, an exception, stderr) and the run must still end
in 0 with the message delivered exactly once.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

import ispmailgate
from conftest import recorded_calls, run_gate, run_inline
from ispmailgate_core import process
from ispmailgate_core.delivery import handover, smtp, wire
from ispmailgate_core.run import Streams

MESSAGE = (b"From: a@example.org\nTo: b@example.net\nSubject: once\nMessage-ID: <once@example.org>\n"
           b"\nexactly once\n")


def partly_refused(config_file, sink, extra: str = "") -> str:
    """a@x is accepted, b@x refused for good: delivery, then a bounce, then notices."""
    sink.handler.rcpt_replies["b@x"] = "550 5.1.1 no such user"
    return str(config_file(f'mail_host = "{sink.address}"\nloop_suffix = ""\npostmaster = "pm@gw"\n'
                           f'time_limit = 1\n{extra}'
                           '[filter.note]\ntype = "gate_test_filters:Notifier"\n'
                           '[[recipients]]\nfilters = ["note", "gate_test_filters:NeedsWorkdir"]\n'))


def raising(*args, **kwargs):
    raise RuntimeError("injected after delivery")


def sleeping(*args, **kwargs):
    time.sleep(1.5)         # past time_limit = 1


def delivering_then(after):
    """SmtpHop.deliver as it is, then ``after`` (inside the hand-over, the hop said 250)."""
    original = smtp.SmtpHop.deliver

    def deliver(self, sender, recipients, data):
        replies = original(self, sender, recipients, data)
        after()
        return replies
    return deliver


INJECTIONS = {
    "the delivery groups' log lines raise": ("ispmailgate_core.run.Gate._log_groups", raising),
    "the delivery groups' log lines outlast the time limit": ("ispmailgate_core.run.Gate._log_groups", sleeping),
    "the summary line raises": ("ispmailgate.log.info", raising),
    "the exit status raises": ("ispmailgate_core.run.exit_status", raising),
    "the bounce raises": ("ispmailgate_core.delivery.reports.Reports.bounce", raising),
    "the bounce cannot be written": ("ispmailgate_core.delivery.reports._multipart_report", raising),
    "every report cannot be written": ("ispmailgate_core.delivery.reports._report_message", raising),
    "the notices raise": ("ispmailgate_core.delivery.reports.Reports.send_notices", raising),
    "the time limit fires inside the accepted delivery":
        ("ispmailgate_core.delivery.smtp.SmtpHop.deliver", delivering_then(lambda: time.sleep(1.5))),
    "SIGTERM arrives inside the accepted delivery":
        ("ispmailgate_core.delivery.smtp.SmtpHop.deliver", delivering_then(lambda: os.kill(os.getpid(), signal.SIGTERM))),
    "the work directory cannot be removed": ("shutil.rmtree", raising),
}


@pytest.mark.parametrize("injection", INJECTIONS)
def test_nothing_after_acceptance_turns_it_into_a_retry(config_file, smtp_sink, monkeypatch, injection):
    target, replacement = INJECTIONS[injection]
    config = partly_refused(config_file, smtp_sink)
    monkeypatch.setattr(target, replacement)
    run = run_inline(["-c", config, "-f", "s@x.example", "a@x", "b@x"], MESSAGE)
    assert run.code == 0, run.stderr
    assert [m.rcpt_tos for m in smtp_sink.messages][0] == ["a@x"]
    assert sum(b"exactly once" in m.content and m.rcpt_tos == ["a@x"] for m in smtp_sink.messages) == 1


def test_stderr_that_cannot_be_written_after_delivery_changes_nothing(config_file, smtp_sink):
    import io

    class Broken(io.StringIO):
        def write(self, text):
            raise OSError(5, "Input/output error")

    config = partly_refused(config_file, smtp_sink)
    code = ispmailgate.run(["-c", config, "-d", "-f", "s@x.example", "a@x", "b@x"],
                           Streams(io.BytesIO(MESSAGE), io.BytesIO(), Broken()))
    assert code == 0
    assert [m.rcpt_tos for m in smtp_sink.messages][0] == ["a@x"]


def test_a_next_hop_slower_than_the_time_limit_to_accept_is_not_retried(config_file, smtp_sink):
    """The alarm went off while the client waited for the 250 to the final dot (the old
    client raised there: the next hop had the message, the MTA retried it)."""
    smtp_sink.handler.delay = 2.0
    config = config_file(f'mail_host = "{smtp_sink.address}"\ntime_limit = 1\n')
    run = run_gate(["-c", str(config), "-f", "s@x.example", "a@x"], MESSAGE, timeout=30)
    assert run.code == 0, run.stderr
    assert len(smtp_sink.messages) == 1


def test_folded_header_instance_of_the_review(config_file, smtp_sink, tmp_path):
    """The review's message: a header field folded over 200,000 lines, the dummy chain."""
    message = (b"From: a@example.org\nSubject: folded\nX-Long: a\n" + b" b\n" * 200_000
               + b"Message-ID: <folded@example.org>\n\nbody\n")
    config = config_file(f'mail_host = "{smtp_sink.address}"\ntime_limit = 1\n')
    run = run_gate(["-c", str(config), "-f", "s@x.example", "a@x"], message, timeout=60)
    assert run.code == 0, run.stderr
    assert len(smtp_sink.messages) == 1
    assert "msgid=<folded@example.org>" in (tmp_path / "gate.log").read_text()


def test_the_time_limit_is_checked_before_a_delivery_starts(monkeypatch):
    """Past the limit, nothing is handed over while nothing was accepted; once something
    was, the rest is handed over regardless."""
    calls = []

    class Hop:
        def deliver(self, sender, recipients, data):
            calls.append(recipients)
            return {r: wire.Reply(250, "2.0.0 ok") for r in recipients}

    hand_over = handover.Handover(Hop(), process.time_limit(0))
    hand_over.clock.deadline = time.monotonic() - 1
    with pytest.raises(process.TimeLimitExceeded):
        hand_over("s@x", ["a@x"], b"data")
    assert calls == [] and not hand_over.delivered
    hand_over.delivered = True
    hand_over("s@x", ["a@x"], b"data")
    assert calls == [["a@x"]]


def test_a_second_group_is_not_handed_over_after_the_first_was_deferred(config_file, smtp_sink):
    """Two distinct results; the first is deferred: the second waits for the retry too,
    instead of being delivered now and again then."""
    smtp_sink.handler.rcpt_replies["b@x"] = "451 4.3.0 later"      # b's group goes first
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\n'
                         '[filter.stamp]\ntype = "gate_test_filters:Stamp"\n'
                         '[[recipients]]\nrecipient = "^a@"\nfilters = ["dummy"]\n'
                         '[[recipients]]\nfilters = ["stamp"]\n')
    run = run_inline(["-c", str(config), "-f", "s@x.example", "a@x", "b@x"], MESSAGE)
    assert run.code == 75
    assert smtp_sink.messages == []


# -- addresses no next hop can be given (finding 4) --------------------------------------------

def test_a_recipient_with_bytes_that_are_not_utf8_is_refused_alone(config_file, smtp_sink, tmp_path):
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\n'
                         '[filter.stamp]\ntype = "gate_test_filters:Stamp"\n'
                         '[[recipients]]\nrecipient = "^a@"\nfilters = ["stamp"]\n')
    run = run_gate(["-c", str(config), "-f", "s@x.example", "--", "a@x", "b\udcff@x", "c@x"], MESSAGE)
    assert run.code == 0, run.stderr
    delivered = [m for m in smtp_sink.messages if m.mail_from == "s@x.example"]
    assert sorted(r for m in delivered for r in m.rcpt_tos) == ["a@x", "c@x"]
    [bounce] = [m for m in smtp_sink.messages if m.mail_from == "<>"]
    assert bounce.rcpt_tos == ["s@x.example"]
    assert b"Final-Recipient: rfc822; b\\xff@x" in bounce.content and b"Status: 5.1.3" in bounce.content
    assert "internal error" not in (tmp_path / "gate.log").read_text()


def test_on_the_sendmail_hop_too(config_file, recorder):
    script, calls = recorder(0)
    config = config_file(f'sendmail_command = ["{script}"]\n')
    run = run_gate(["-c", str(config), "-f", "s@x.example", "--", "a@x", "b\udcff@x"], MESSAGE)
    assert run.code == 0, run.stderr
    message, bounce = recorded_calls(calls)
    assert message["argv"] == ["-f", "s@x.example", "--", "a@x"]
    assert bounce["argv"] == ["-f", "", "--", "s@x.example"]
    assert "Status: 5.1.3" in bounce["data"]


def test_with_stdout_an_unusable_recipient_refuses_the_message_for_all(config_file):
    """Attack review finding 16: stdout cannot carry the sender's notification; the unusable
    recipient was dropped silently with exit 0.  Now nothing is written and the run is 69."""
    run = run_gate(["-c", str(config_file()), "--stdout", "-f", "s@x.example", "--", "a@x", "b\r\nDATA@x"],
                   MESSAGE)
    assert run.code == 69 and run.stdout == b""
    assert run.first_line.startswith("5.1.3 <b DATA@x>: bad recipient address") and "--stdout" in run.first_line


@pytest.mark.parametrize("bad", ["b\udcff@x", "b\x85@x", "b\u2028@x", "b" * 600 + "@x"])
def test_every_recipient_unusable_is_a_bounce(config_file, smtp_sink, bad):
    config = config_file(f'mail_host = "{smtp_sink.address}"\n')
    run = run_gate(["-c", str(config), "-f", "s@x.example", "--", bad], MESSAGE)
    assert run.code == 69 and run.first_line.startswith("5.1.3 bad recipient address")
    assert smtp_sink.messages == []


@pytest.mark.parametrize("hop", ["smtp", "sendmail"])
def test_a_sender_with_bytes_that_are_not_utf8_is_refused_before_anything(config_file, smtp_sink,
                                                                          recorder, hop):
    """The review: notify = ["sender"] crashed writing the notice after the delivery."""
    script, calls = recorder(0)
    where = f'sendmail_command = ["{script}"]\n' if hop == "sendmail" else f'mail_host = "{smtp_sink.address}"\n'
    config = config_file(where + '[filter.note]\ntype = "gate_test_filters:Notifier"\nto = "sender"\n'
                                 '[[recipients]]\nfilters = ["note"]\n')
    run = run_gate(["-c", str(config), "-f", "s\udcff@x.example", "a@x", "b@x"], MESSAGE)
    assert run.code == 69 and run.first_line.startswith("5.1.7 bad sender address: bytes that are not UTF-8")
    assert smtp_sink.messages == [] and not calls.exists()


def test_a_notice_a_filter_addresses_badly_is_logged_not_fatal(config_file, smtp_sink, tmp_path):
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\n'
                         '[filter.note]\ntype = "gate_test_filters:Notifier"\nto = "x\\u0000y@x"\n'
                         'text = "bytes \\u00ff and \\u0000 and \\r\\n in the text"\n'
                         '[[recipients]]\nfilters = ["note"]\n')
    run = run_inline(["-c", str(config), "-f", "s@x.example", "a@x"], MESSAGE)
    assert run.code == 0, run.stderr
    assert [m.rcpt_tos for m in smtp_sink.messages] == [["a@x"]]
    assert "report 'test notice' to x\\0y@x failed" in (tmp_path / "gate.log").read_text()


def virscan_config(config_file, hop: str, scanner) -> str:
    return str(config_file(f'{hop}loop_suffix = ""\n[filter.av]\ntype = "virscan"\nscanner = "command"\n'
                           f'command = ["{scanner}", "{{paths}}"]\nscanner_unpacks = []\non_infected = "tag"\n'
                           'notify = ["sender", "recipients", "postmaster"]\n[[recipients]]\nfilters = ["av"]\n'))


def test_virscan_notifies_a_sender_that_is_not_utf8_never(config_file, smtp_sink, infected_scanner):
    """The review: notify = ["sender"] crashed writing the notice after the delivery."""
    config = virscan_config(config_file, f'mail_host = "{smtp_sink.address}"\n', infected_scanner)
    run = run_gate(["-c", config, "-f", "s\udcff@x.example", "a@x"], MESSAGE)
    assert run.code == 69 and run.first_line.startswith("5.1.7 ")
    assert smtp_sink.messages == []


@pytest.mark.parametrize("hop", ["smtp", "sendmail"])
def test_virscan_notices_skip_an_unusable_recipient_and_reach_the_rest(config_file, smtp_sink, recorder,
                                                                       infected_scanner, hop):
    script, calls = recorder(0)
    where = f'sendmail_command = ["{script}"]\n' if hop == "sendmail" else f'mail_host = "{smtp_sink.address}"\n'
    config = virscan_config(config_file, where, infected_scanner)
    run = run_gate(["-c", config, "-f", "s@x.example", "--", "a@x", "b\udcff@x"], MESSAGE)
    assert run.code == 0, run.stderr
    if hop == "smtp":
        envelopes = [(m.mail_from, m.rcpt_tos) for m in smtp_sink.messages]
    else:
        envelopes = [(call["argv"][1] or "<>", call["argv"][3:]) for call in recorded_calls(calls)]
    assert ("s@x.example", ["a@x"]) in envelopes                    # the message, tagged
    assert ("<>", ["postmaster", "s@x.example"]) in envelopes       # the virus notice, and one
    assert ("<>", ["a@x"]) in envelopes                             # per recipient (no Bcc shown)
    assert ("<>", ["s@x.example"]) in envelopes                     # the bounce for b\xff@x
    assert len(envelopes) == 4
