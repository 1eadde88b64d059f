"""End to end: a private sendmail (examples/sendmail/sendmail.mc and ispmailgate.m4, built and
run for real, see sendmail_instance.py) hands mail to ispmailgate as its prog mailer, and
ispmailgate re-injects it by SMTP into a sink standing in for the second instance.

Needs root (sendmail runs its mailer as nobody) and Debian's archive (sendmail-bin is
fetched with apt-get download, not installed).
"""

from __future__ import annotations

import re

import pytest

from conftest import free_port
from support.postfix_instance import e2e_gate, run_failing_test
from support.sendmail_instance import SendmailInstance, sendmail_binary

MESSAGE = (b"Date: Thu, 01 Jan 2026 12:00:00 +0000\r\n"
           b"From: Sender <sender@e2e.test>\r\n"
           b"To: alice@e2e.test, bob@e2e.test\r\n"
           b"Message-ID: <sendmail-e2e@e2e.test>\r\n"
           b"Subject: through sendmail\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: 8bit\r\n"
           b"\r\n"
           b"Gr\xc3\xbc\xc3\x9fe through sendmail.\r\n")
STAMP = '''
    default_filter = ["stamp"]
    [filter.stamp]
    type = "gate_test_filters:Stamp"
    value = "sendmail"
'''
# sendmail's own Received field, the only thing it adds to a complete message
RECEIVED = re.compile(rb"Received: from client\.e2e\.test \(localhost \[\[UNIX: localhost\]\]\)\r\n"
                      rb"\tby mx\.e2e\.test \(8\.[\d.]+/8\.[\d.]+\) with ESMTP id (\w+)(?:;|\r\n)[^\r]*\r\n"
                      rb"(?:\t[^\r]*\r\n)*")


@pytest.fixture(scope="module")
def sendmail_parts():
    return sendmail_binary(), e2e_gate()


@pytest.fixture
def sendmail(sendmail_parts):
    instance = SendmailInstance(*sendmail_parts)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


def filtered(content: bytes, queue_id: str) -> bytes:
    """What the sink got, with sendmail's Received field (for this queue id) taken out."""
    match = RECEIVED.search(content)
    assert match and match.group(1).decode() == queue_id, content[:400]
    return content[:match.start()] + content[match.end():]


def test_submitted_mail_reaches_the_next_hop_filtered_and_suffixed(sendmail, smtp_sink):
    sendmail.rules(smtp_sink.address, STAMP)
    queue_id = sendmail.submit("sender@e2e.test", ["alice@e2e.test", "bob@e2e.test"], MESSAGE,
                               mail_options=["BODY=8BITMIME"])
    [received] = smtp_sink.messages                         # flag m: one run for both
    assert received.mail_from == "sender@e2e.test"
    assert received.rcpt_tos == ["alice@e2e.test.ispmailgate", "bob@e2e.test.ispmailgate"]
    assert filtered(received.content, queue_id) == b"X-Stamp: sendmail\r\n" + MESSAGE   # 8-bit as sent
    [line] = sendmail.gate_log().splitlines()
    assert "to=<alice@e2e.test>,<bob@e2e.test> rule=default chain=stamp outcome=sent" in line
    assert sendmail.queue() == {}


def test_exit_75_keeps_the_mail_queued_until_a_queue_run_delivers_it_once(sendmail, smtp_sink):
    sendmail.rules(f"127.0.0.1:{free_port()}", STAMP)      # the next hop is down
    queue_id = sendmail.submit("sender@e2e.test", ["alice@e2e.test"], MESSAGE)
    assert list(sendmail.queue()) == [queue_id]
    assert "MDeferred: ispmailgate mailer" in sendmail.queue()[queue_id]
    assert "exited with EX_TEMPFAIL" in sendmail.queue()[queue_id]
    mailq = sendmail.mailq()
    assert queue_id in mailq and "(Deferred: ispmailgate mailer" in mailq and "<alice@e2e.test>" in mailq
    assert "outcome=deferred (4.4.1 " in sendmail.gate_log() and "connection refused" in sendmail.gate_log()
    assert smtp_sink.messages == []

    sendmail.rules(smtp_sink.address, STAMP)                # the next hop is back
    transcript = sendmail.run_queue()
    assert "<alice@e2e.test>... Sent" in transcript, transcript
    assert sendmail.queue() == {} and "is empty" in sendmail.mailq()
    sendmail.run_queue()                                    # nothing left to send twice
    [received] = smtp_sink.messages
    assert received.rcpt_tos == ["alice@e2e.test.ispmailgate"]
    assert filtered(received.content, queue_id) == b"X-Stamp: sendmail\r\n" + MESSAGE


def test_the_instance_is_removed_even_when_a_test_fails(tmp_path):
    """A failing test in another pytest run, with these very fixtures: nothing survives it."""
    import os

    base = run_failing_test(tmp_path, "from test_e2e_sendmail import sendmail, sendmail_parts\n\n"
                                      "def test_fails(sendmail):\n"
                                      "    print(f'BASE={sendmail.base}')\n"
                                      "    assert sendmail.cf.exists()\n"
                                      "    assert False, 'on purpose'\n")
    assert not os.path.exists(base)
