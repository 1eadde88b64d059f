"""The SMTP client against a next hop that misbehaves at every step.

Whatever the next hop says, the run ends in one of two safe states: 0 with the message
accepted exactly once, or 75 (69 for a 5xx) with no message body handed over.  A reply of
any length is read whole; a reply that does not belong to the command just sent (an
unexpected code, a line sent unasked) means client and server are out of step, and the
client defers rather than pairing later replies with the wrong commands.
"""

from __future__ import annotations

import pytest

from conftest import run_inline
from support.smtp_peer import ScriptedPeer

MESSAGE = (b"From: a@example.org\nTo: b@example.net\nSubject: out of step\n"
           b"Message-ID: <1@example.org>\n\nline one\n.leading dot\nlast line\n")
WIRE = MESSAGE.replace(b"\n", b"\r\n")


@pytest.fixture
def peer():
    peers = []

    def start(script=None, rcpt=None, max_recipients=0) -> ScriptedPeer:
        peers.append(ScriptedPeer(script, rcpt, max_recipients))
        return peers[-1]

    yield start
    for one in peers:
        one.close()


def deliver(config_file, peer: ScriptedPeer, *recipients: str, extra: str = ""):
    config = config_file(f'mail_host = "{peer.address}"\nloop_suffix = ""\ndelivery_timeout = 2\n{extra}')
    return run_inline(["-c", str(config), "-f", "s@example.org", "--", *(recipients or ["r@example.net"])],
                      MESSAGE)


def body_lines_sent(peer: ScriptedPeer) -> bool:
    """Did any line of the message reach the peer, as data or read as a command?"""
    sent = b"".join(peer.messages) + b"".join(c for conn in peer.connections for c in conn.commands)
    return b"out of step" in sent or b"line one" in sent


# -- replies of any length ------------------------------------------------------------------

@pytest.mark.parametrize("lines", [121, 5000])
def test_a_long_ehlo_reply_is_read_whole(config_file, peer, lines):
    ehlo = b"".join(b"250-X-FILLER-%d\r\n" % n for n in range(lines - 2)) + b"250-SIZE 1000\r\n250 8BITMIME\r\n"
    hop = peer({"EHLO": b"250-peer.test\r\n" + ehlo})
    run = deliver(config_file, hop)
    assert run.code == 0, run.stderr
    assert hop.messages == [WIRE]
    [mail] = [c for c in hop.connections[0].commands if c.startswith(b"MAIL")]
    assert b" SIZE=" in mail        # the keyword on the last line counted


def test_a_reply_without_end_fails_safe(config_file, peer):
    endless = b"250-filler filler filler filler filler filler filler\r\n" * 40000     # 2 MB
    hop = peer({"EHLO": endless})
    run = deliver(config_file, hop)
    assert run.code == 75
    assert "a reply of more than" in run.first_line
    assert not body_lines_sent(hop)


def test_an_overlong_reply_line_fails_safe(config_file, peer):
    hop = peer({"MAIL": b"250 " + b"x" * 10000 + b"\r\n"})
    run = deliver(config_file, hop)
    assert run.code == 75 and "longer than" in run.first_line
    assert not body_lines_sent(hop)


def test_reply_lines_with_different_codes_are_out_of_step(config_file, peer):
    hop = peer({"EHLO": b"250-peer.test\r\n354 go ahead\r\n"})
    run = deliver(config_file, hop)
    assert run.code == 75 and run.first_line.startswith("4.5.0 ")
    assert not body_lines_sent(hop)


def test_a_reply_sent_unasked_is_noticed_before_the_next_command(config_file, peer):
    hop = peer({"EHLO": b"250 peer.test\r\n250 2.0.0 and one more\r\n"})
    run = deliver(config_file, hop)
    assert run.code == 75 and run.first_line.startswith("4.5.0 ")
    assert "out of step" in run.first_line
    assert not body_lines_sent(hop)


# -- every unexpected code at every step ------------------------------------------------------

UNEXPECTED = [
    ("greeting", b"250 hello\r\n"), ("greeting", b"354 hello\r\n"), ("greeting", b"hello\r\n"),
    ("greeting", b"554 5.3.2 not now\r\n"), ("greeting", b"421 4.3.2 busy\r\n"),
    ("greeting", b"120 wait a moment\r\n"), ("greeting", b"\r\n"),
    ("EHLO", b"220 peer.test again\r\n"), ("EHLO", b"354 go\r\n"), ("EHLO", b"421 4.3.2 bye\r\n"),
    ("EHLO", b"250x\r\n"), ("EHLO", b"\xff\xfe\r\n"),
    ("MAIL", b"251 2.1.0 fine\r\n"), ("MAIL", b"220 hello\r\n"), ("MAIL", b"354 go\r\n"),
    ("MAIL", b"452 4.3.1 full\r\n"), ("MAIL", b"600 what\r\n"),
    ("RCPT", b"220 hello\r\n"), ("RCPT", b"354 go\r\n"), ("RCPT", b"252 2.1.5 maybe\r\n"),
    ("RCPT", b"451 4.3.0 later\r\n"),
    ("DATA", b"250 2.0.0 ok\r\n"), ("DATA", b"220 hello\r\n"), ("DATA", b"251 ok\r\n"),
    ("DATA", b"451 4.3.0 later\r\n"), ("DATA", b"199 ok\r\n"),
    (".", b"354 more please\r\n"), (".", b"251 2.0.0 queued\r\n"), (".", b"220 hello\r\n"),
    (".", b"451 4.3.0 later\r\n"), (".", b""),
]


@pytest.mark.parametrize("step, reply", UNEXPECTED)
def test_an_unexpected_reply_defers_and_sends_no_body(config_file, peer, step, reply):
    hop = peer({step: reply})
    run = deliver(config_file, hop)
    assert run.code == 75, run.stderr
    assert run.first_line[:2] == "4." and "Traceback" not in run.stderr
    if step != ".":
        assert not body_lines_sent(hop)
    assert "status=deferred" in (config_file().parent / "gate.log").read_text()


@pytest.mark.parametrize("step, reply, status", [
    ("MAIL", b"550 5.1.8 bad sender\r\n", "5.1.8"), ("RCPT", b"550 5.1.1 no such user\r\n", "5.1.1"),
    ("DATA", b"554 5.5.1 no valid recipients\r\n", "5.5.1"), (".", b"554 5.7.1 content refused\r\n", "5.7.1"),
])
def test_a_refusal_at_any_step_is_a_bounce(config_file, peer, step, reply, status):
    hop = peer({step: reply})
    run = deliver(config_file, hop)
    assert run.code == 69 and run.first_line.startswith(status)
    if step != ".":
        assert not body_lines_sent(hop)


def test_an_enhanced_status_of_another_class_is_not_believed(config_file, peer):
    hop = peer({".": b"451 5.7.1 looks permanent, is not\r\n"})
    run = deliver(config_file, hop)
    assert run.code == 75 and run.first_line.startswith("4.0.0 ")


@pytest.mark.parametrize("quit_reply", [b"", b"500 what\r\n", b"garbage\r\n", b"250-x\r\n" * 100000])
def test_whatever_quit_gets_the_message_is_delivered_once(config_file, peer, quit_reply):
    hop = peer({"QUIT": quit_reply})
    run = deliver(config_file, hop)
    assert run.code == 0, run.stderr
    assert hop.messages == [WIRE]


def test_ehlo_refused_for_good_falls_back_to_helo(config_file, peer):
    hop = peer({"EHLO": b"502 5.5.1 no\r\n"})
    run = deliver(config_file, hop)
    assert run.code == 0, run.stderr
    assert hop.messages == [WIRE]
    assert any(c.startswith(b"HELO ") for c in hop.connections[0].commands)


@pytest.mark.parametrize("reply", [b"220 again\r\n", b"354 go\r\n", b"251 ok\r\n", b"421 4.3.2 bye\r\n"])
def test_an_unexpected_reply_to_helo_defers(config_file, peer, reply):
    hop = peer({"EHLO": b"502 5.5.1 no\r\n", "HELO": reply})
    run = deliver(config_file, hop)
    assert run.code == 75 and run.first_line[:2] == "4."
    assert not body_lines_sent(hop)


def test_helo_refused_too_defers(config_file, peer):
    hop = peer({"EHLO": b"502 5.5.1 no\r\n", "HELO": b"554 5.7.1 go away\r\n"})
    run = deliver(config_file, hop)
    assert run.code == 75 and "refused" in run.first_line
    assert not body_lines_sent(hop)


# -- recipients -------------------------------------------------------------------------------

def test_one_deferred_recipient_holds_back_the_whole_transaction(config_file, peer):
    hop = peer(rcpt={"b@example.net": b"450 4.2.1 try later\r\n"})
    run = deliver(config_file, hop, "a@example.net", "b@example.net", "c@example.net")
    assert run.code == 75 and run.first_line.startswith("4.2.1")
    assert hop.messages == []       # the retry delivers to all three once, not to a and c twice
    assert not any(c.startswith(b"DATA") for c in hop.connections[0].commands)


def test_past_the_hops_recipient_limit_the_rest_get_a_transaction_of_their_own(config_file, peer):
    hop = peer(max_recipients=2)
    run = deliver(config_file, hop, "a@example.net", "b@example.net", "c@example.net")
    assert run.code == 0, run.stderr
    assert hop.messages == [WIRE, WIRE]
    rcpts = [[c for c in conn.commands if c.startswith(b"RCPT")] for conn in hop.connections[:2]]
    assert rcpts == [[b"RCPT TO:<a@example.net>\r\n", b"RCPT TO:<b@example.net>\r\n",
                      b"RCPT TO:<c@example.net>\r\n"], [b"RCPT TO:<c@example.net>\r\n"]]


def test_a_452_for_the_first_recipient_is_a_deferral(config_file, peer):
    hop = peer({"RCPT": b"452 4.3.1 insufficient storage\r\n"})
    run = deliver(config_file, hop, "a@example.net", "b@example.net")
    assert run.code == 75 and run.first_line.startswith("4.3.1")
    assert hop.messages == [] and len(hop.connections) == 1


def test_a_deferral_in_the_transaction_past_the_limit_sends_nothing(config_file, peer):
    """Attack review finding 16: a 452 (the hop's limit), then a 451 for the rest in the
    second transaction: the first waits before DATA, so nothing is sent (it used to be, and
    the retry sent it again)."""
    hop = peer(rcpt={"c@example.net": b"451 4.3.0 try later\r\n"}, max_recipients=2)
    run = deliver(config_file, hop, "a@example.net", "b@example.net", "c@example.net")
    assert run.code == 75 and run.first_line.startswith("4.3.0")
    assert hop.messages == [] and len(hop.connections) == 2
    assert not any(c.startswith(b"DATA") for conn in hop.connections for c in conn.commands)


def test_transactions_past_the_limit_wait_open_together_then_all_are_sent(config_file, peer):
    hop = peer(max_recipients=1)
    recipients = [f"r{i}@example.net" for i in range(12)]      # more than OPEN_TRANSACTIONS
    run = deliver(config_file, hop, *recipients)
    assert run.code == 0, run.stderr
    assert hop.messages == [WIRE] * 12
    sent = [c.split(b"<")[1].split(b">")[0].decode() for conn in hop.connections for c in conn.commands
            if c.startswith(b"RCPT") and b"452" not in c]
    assert sorted(set(sent)) == sorted(recipients)
