"""End to end: a real Postfix hands mail to ``ispmailgate serve`` by LMTP
(examples/postfix/master-lmtp.cf) and takes it back by SMTP; LMTP's statuses per recipient
reach Postfix.

    test --SMTP--> smtpd  content_filter=ispmailgate-lmtp:unix:<serve's lmtp socket>
                     --> lmtp(8) --> ispmailgate serve (workers as nobody)
                     --SMTP--> smtpd 127.0.0.1:reinject --> virtual(8) --> Maildir
"""

from __future__ import annotations

import re

import pytest

from conftest import PROJECT
from support.postfix_instance import DOMAIN, PostfixInstance
from support.serving import Server
from support.serving import python  # noqa: F401  (fixture)

MESSAGE = b"Subject: lmtp\nFrom: sender@e2e.test\nTo: carol@e2e.test\n\nHello through LMTP.\n"

# alice is refused for good, bob must wait, carol passes (stamped): in one transaction.
RULES = f'''
loop_suffix = ""
postmaster = "postmaster@{DOMAIN}"
default_filter = ["refuse", "hold", "stamp"]
[filter.refuse]
type = "gate_test_filters:Judge"
only = "alice@{DOMAIN}"
[filter.hold]
type = "gate_test_filters:Judge"
verdict = "tempfail"
only = "bob@{DOMAIN}"
[filter.stamp]
type = "gate_test_filters:Stamp"
value = "lmtp"
[serve]
workers = 2
socket_group = "postfix"
'''


class LmtpPostfix(PostfixInstance):
    """The private Postfix with examples/postfix/master-lmtp.cf instead of the pipe set-up."""

    def __init__(self, lmtp_socket) -> None:
        super().__init__(gate=PROJECT / "unused")
        self.lmtp_socket = lmtp_socket

    def _wait_for_greeting(self, port: int, timeout: float = 60) -> None:
        if port != self.ports["originate"]:        # the pipe set-up's users' service: not here
            super()._wait_for_greeting(port, timeout)

    def _example_services(self) -> str:
        text = (PROJECT / "examples" / "postfix" / "master-lmtp.cf").read_text()
        for shipped, here in (
                ("smtp      inet  n       -       y       -       -       smtpd",     # loopback, no chroot
                 f"127.0.0.1:{self.ports['submit']} inet  n - n - - smtpd"),
                ("content_filter=ispmailgate-lmtp:unix:/run/ispmailgate/lmtp.sock",
                 f"content_filter=ispmailgate-lmtp:unix:{self.lmtp_socket}"),
                ("127.0.0.1:10026 ", f"127.0.0.1:{self.ports['reinject']} ")):
            assert text.count(shipped) == 1, f"examples/postfix/master-lmtp.cf no longer has {shipped!r}"
            text = text.replace(shipped, here)
        return text


@pytest.fixture(scope="module")
def setup(python):
    server = Server(python, "")
    server.lmtp = server.folder / "lmtp.sock"
    postfix = LmtpPostfix(server.lmtp)
    server.write_config(f'mail_host = "127.0.0.1:{postfix.ports["reinject"]}"\n' + RULES
                        + f'lmtp = "unix:{server.lmtp}"\n')
    try:
        postfix.start()
        with server:
            yield postfix, server
    finally:
        postfix.stop()


@pytest.fixture
def postfix(setup):
    postfix, _ = setup
    postfix.reset()
    return postfix


def test_postfix_delivers_through_lmtp_into_serve(postfix, setup):
    postfix.submit("sender@e2e.test", ["carol@e2e.test"], MESSAGE)
    [delivered] = postfix.wait_for_mail("carol")
    assert delivered.startswith(b"Return-Path: <sender@e2e.test>\n")
    assert b"\nX-Stamp: lmtp\n" in delivered and b"\nSubject: lmtp\n" in delivered
    assert b"\n\nHello through LMTP.\n" in delivered
    assert re.search(r"lmtp\[\d+\]: \w+: to=<carol@e2e.test>, relay=\S+\[/tmp/.*/lmtp\.sock\].*status=sent \(250 2\.0\.0 "
                     r"<carol@e2e.test> sent", postfix.maillog.read_text()), postfix.log_tail()
    assert "LMTP from pid=" in setup[1].log()


def test_one_transaction_one_recipient_deferred_one_refused_one_delivered(postfix):
    queue_id = postfix.submit("sender@e2e.test", ["alice@e2e.test", "bob@e2e.test", "carol@e2e.test"], MESSAGE)
    [delivered] = postfix.wait_for_mail("carol")
    assert b"\nX-Stamp: lmtp\n" in delivered
    [bounce] = postfix.wait_for_mail("sender")          # Postfix's own bounce, for alice alone
    assert b"Subject: Undelivered Mail Returned to Sender" in bounce
    assert b"Final-Recipient: rfc822; alice@e2e.test" in bounce and b"Status: 5.7.1" in bounce
    assert b"Final-Recipient: rfc822; bob@e2e.test" not in bounce
    [queued] = postfix.wait_for_queue(lambda queue: any(m["queue_name"] == "deferred" for m in queue))
    assert queued["queue_id"] == queue_id
    [waiting] = queued["recipients"]
    assert waiting["address"] == "bob@e2e.test"
    assert "4.7.1" in waiting["delay_reason"] and "judge is busy" in waiting["delay_reason"], waiting
    assert postfix.mailbox("alice") == [] and postfix.mailbox("bob") == []


def test_the_null_sender_passes_through_lmtp(postfix, setup):
    bounce = b"From: MAILER-DAEMON@elsewhere.example\nSubject: Undelivered Mail\n\nreport\n"
    postfix.submit("", ["carol@e2e.test"], bounce)
    [delivered] = postfix.wait_for_mail("carol")
    assert delivered.startswith(b"Return-Path: <>\n")
    assert b"\nX-Stamp: lmtp\n" in delivered and b"\n\nreport\n" in delivered
    assert "from=<> " in setup[1].gate_log.read_text()
