"""Several delivery groups (recipients whose chains give different results) to an SMTP next
hop: every group's transaction has its recipients before any message is sent, so a
recipient deferred in one group delivers nothing, whatever the order of the groups, and the
MTA's retry delivers to each once (attack review 3: the group handed over first was
accepted, the other deferred at RCPT, and every retry delivered the first again)."""

from __future__ import annotations

import pytest

from conftest import CORPUS, run_gate, run_inline
from support.smtp_peer import ScriptedPeer

SIMPLE = (CORPUS / "plain.eml").read_bytes()
BOTH_ORDERS = pytest.mark.parametrize("order", [("u0@x.example", "u1@x.example"),
                                                ("u1@x.example", "u0@x.example")])


def banners(count: int) -> str:
    """u0@ gets the message as it came, u1@, u2@, ... a banner each: a group per recipient."""
    return "".join(f'[[recipients]]\nrecipient = "^u{i}@"\nfilters = ["b{i}"]\n'
                   f'[filter.b{i}]\ntype = "banner"\ntext = "disclaimer {i}"\n' for i in range(1, count))


def gate_config(config_file, address: str, groups: int = 2) -> str:
    return str(config_file(f'mail_host = "{address}"\nloop_suffix = ""\ndelivery_timeout = 5\n'
                           + banners(groups)))


@BOTH_ORDERS
@pytest.mark.parametrize("deferred", ["u0@x.example", "u1@x.example"])
def test_a_recipient_deferred_at_rcpt_delivers_no_group_and_the_retry_delivers_each_once(
        config_file, smtp_sink, order, deferred):
    config = gate_config(config_file, smtp_sink.address)
    smtp_sink.handler.rcpt_replies[deferred] = "451 4.3.0 try again later"
    run = run_gate(["-c", config, "-f", "s@x.example", *order], SIMPLE)
    assert run.code == 75, run.stderr
    assert run.first_line.startswith("4.3.0")
    assert smtp_sink.messages == []
    smtp_sink.handler.rcpt_replies.clear()          # the MTA's retry
    run = run_gate(["-c", config, "-f", "s@x.example", *order], SIMPLE)
    assert run.code == 0, run.stderr
    assert sorted(m.rcpt_tos for m in smtp_sink.messages) == [["u0@x.example"], ["u1@x.example"]]
    stamped = [m for m in smtp_sink.messages if b"disclaimer 1" in m.content]
    assert [m.rcpt_tos for m in stamped] == [["u1@x.example"]]


@BOTH_ORDERS
def test_a_deferral_at_mail_from_delivers_nothing(config_file, smtp_sink, order):
    smtp_sink.handler.mail_reply = "421 4.3.2 shutting down"
    run = run_gate(["-c", gate_config(config_file, smtp_sink.address), "-f", "s@x.example", *order], SIMPLE)
    assert run.code == 75 and run.first_line.startswith("4.3.2")
    assert smtp_sink.messages == []


@BOTH_ORDERS
@pytest.mark.parametrize("refused", ["u0@x.example", "u1@x.example"])
def test_a_recipient_refused_for_good_gets_our_own_bounce_and_the_other_group_is_delivered(
        config_file, smtp_sink, order, refused):
    smtp_sink.handler.rcpt_replies[refused] = "550 5.1.1 no such user"
    run = run_gate(["-c", gate_config(config_file, smtp_sink.address), "-f", "s@x.example", *order], SIMPLE)
    assert run.code == 0, run.stderr
    delivered, bounce = smtp_sink.messages
    assert delivered.rcpt_tos == [next(r for r in order if r != refused)]
    assert (bounce.mail_from, bounce.rcpt_tos) == ("<>", ["s@x.example"])
    assert f"Final-Recipient: rfc822; {refused}".encode() in bounce.content


def test_every_transaction_is_answered_before_any_data(config_file):
    """On the wire: the groups' transactions are opened one after another, each waiting
    before DATA; the deferral closes them all and no DATA is sent.  Both recipients
    deferred in turn, in both argument orders: the deferred group comes first in some runs
    (one connection) and second in others (two), so both group orders are seen."""
    connections = set()
    for order in (["u0@x.example", "u1@x.example"], ["u1@x.example", "u0@x.example"]):
        for deferred in order:
            peer = ScriptedPeer(rcpt={deferred: b"451 4.3.0 try later\r\n"})
            try:
                run = run_inline(["-c", gate_config(config_file, peer.address), "-f", "s@x.example", *order],
                                 SIMPLE)
            finally:
                peer.close()
            assert run.code == 75 and run.first_line.startswith("4.3.0")
            assert peer.messages == []
            rcpts = [[c for c in conn.commands if c.startswith(b"RCPT")] for conn in peer.connections]
            assert rcpts[-1] == [f"RCPT TO:<{deferred}>\r\n".encode()]
            assert all(not c.startswith(b"DATA") for conn in peer.connections for c in conn.commands)
            assert all(conn.commands[-1] == b"QUIT\r\n" for conn in peer.connections)
            connections.add(len(peer.connections))
    assert connections == {1, 2}


def answering(handler, command: str, nth: int, reply: str):
    """The sink's ``command`` answers ``reply`` the nth time it is called (counted from 1)."""
    real, calls = getattr(handler, f"handle_{command}"), []

    async def hook(server, session, envelope, *args):
        calls.append(1)
        if len(calls) == nth:
            return reply
        return await real(server, session, envelope, *args)

    setattr(handler, f"handle_{command}", hook)
    return calls


def test_a_deferral_at_data_after_another_group_was_accepted_stays_smtps_own_window(config_file, smtp_sink):
    """Documented in ispmailgate(1): the first group's message was accepted before the
    second's DATA was deferred; the run ends in 75 (the second must be retried) and the
    retry delivers the first again.  The group after the deferred one is not sent."""
    calls = answering(smtp_sink.handler, "DATA", 2, "451 4.3.0 queue file write error")
    run = run_gate(["-c", gate_config(config_file, smtp_sink.address, 3), "-f", "s@x.example",
                    "u0@x.example", "u1@x.example", "u2@x.example"], SIMPLE)
    assert run.code == 75 and run.first_line.startswith("4.3.0")
    assert len(smtp_sink.messages) == 1 and len(calls) == 2      # the third group's DATA never came


def test_past_the_open_transactions_the_open_ones_are_sent_first(config_file, smtp_sink, monkeypatch):
    """The bound on connections held open (OPEN_TRANSACTIONS): the groups within it are
    answered together, those past it are handed over after (the documented window)."""
    from ispmailgate_core.delivery.smtp import SmtpHop

    monkeypatch.setattr(SmtpHop, "OPEN_TRANSACTIONS", 2)
    config = gate_config(config_file, smtp_sink.address, 4)
    recipients = [f"u{i}@x.example" for i in range(4)]
    real_rcpt = smtp_sink.handler.handle_RCPT
    answering(smtp_sink.handler, "RCPT", 2, "451 4.3.0 later")      # within the first two
    run = run_inline(["-c", config, "-f", "s@x.example", *recipients], SIMPLE)
    assert run.code == 75 and smtp_sink.messages == []
    smtp_sink.handler.handle_RCPT = real_rcpt
    answering(smtp_sink.handler, "RCPT", 4, "451 4.3.0 later")      # past them
    run = run_inline(["-c", config, "-f", "s@x.example", *recipients], SIMPLE)
    assert run.code == 75 and len(smtp_sink.messages) == 2
    smtp_sink.handler.handle_RCPT = real_rcpt
    smtp_sink.messages.clear()
    run = run_inline(["-c", config, "-f", "s@x.example", *recipients], SIMPLE)
    assert run.code == 0, run.stderr
    assert sorted(m.rcpt_tos for m in smtp_sink.messages) == [[r] for r in recipients]


def test_spooled_results_are_read_back_only_for_their_own_data(config_file, smtp_sink, monkeypatch):
    """Held open together, a spooled result is still read from its file only at its own
    DATA (memory stays one result at a time), and never when a deferral sends nothing."""
    from ispmailgate_core.delivery import spool

    monkeypatch.setattr(spool, "IN_MEMORY", 0)
    reads = []
    real = spool.Finished.to_bytes
    monkeypatch.setattr(spool.Finished, "to_bytes", lambda self: reads.append(self.path) or real(self))
    config = gate_config(config_file, smtp_sink.address, 4)
    recipients = [f"u{i}@x.example" for i in range(4)]
    smtp_sink.handler.rcpt_replies["u3@x.example"] = "451 4.3.0 later"
    run = run_inline(["-c", config, "-f", "s@x.example", *recipients], SIMPLE)
    assert run.code == 75 and smtp_sink.messages == []
    spooled = [path for path in reads if path is not None]
    assert len(spooled) == len(set(spooled)) == 2        # read once each, to make it ready
    reads.clear()
    smtp_sink.handler.rcpt_replies = {}
    run = run_inline(["-c", config, "-f", "s@x.example", *recipients], SIMPLE)
    assert run.code == 0, run.stderr
    spooled = [path for path in reads if path is not None]
    assert len(spooled) == len(set(spooled)) * 2 == 4    # and once more, for its DATA
    assert sorted(m.rcpt_tos for m in smtp_sink.messages) == [[r] for r in recipients]
