"""ispmailgate serve speaking LMTP and SMTP to the MTA: a real server, a plain-socket client,
a real SMTP sink as the next hop."""

from __future__ import annotations

import os
import signal

import pytest

from conftest import CORPUS, crlf, wait_for
from support.lmtp import Talk, stuffed
from support.serving import Server, drain, wait_for_workers
from support.serving import python, sink  # noqa: F401  (fixtures)

SIMPLE = crlf((CORPUS / "plain.eml").read_bytes())
DOTS = b"Subject: dots\r\n\r\n.\r\n..two\r\n.leading\r\nend .\r\n"


class Listening(Server):
    """A server with an LMTP and an SMTP listener in its folder."""

    def __init__(self, python, config: str, **kwargs) -> None:
        super().__init__(python, config, **kwargs)
        self.lmtp, self.smtp = self.folder / "l.sock", self.folder / "m.sock"
        self.write_config(config + f'lmtp = "unix:{self.lmtp}"\nsmtp = "unix:{self.smtp}"\n')


@pytest.fixture(scope="module")
def server(python, sink):
    with Listening(python, f'mail_host = "{sink.address}"\nloop_suffix = ""\n'
                           "[serve]\nworkers = 2\nmax_recipients = 5\n") as server:
        yield server


@pytest.fixture
def next_hop(sink):
    """The module's sink, empty, with its per-recipient replies reset afterwards."""
    drain(sink)
    yield sink
    sink.handler.rcpt_replies.clear()
    drain(sink)


def lhlo(server: Listening) -> Talk:
    talk = Talk(server.lmtp)
    assert talk.reply().startswith("220 ")
    assert talk.command("LHLO mta.example").startswith("250-")
    return talk


def test_lmtp_delivers_with_one_reply_per_recipient_and_the_bytes_unchanged(server, next_hop):
    with lhlo(server) as talk:
        head = talk.transaction("alice@example.org", ["a@x.example", "b@x.example"], SIMPLE)
        assert head[:3] == ["250 2.1.0 ok", "250 2.1.5 ok", "250 2.1.5 ok"]
        replies = talk.replies(2)
    assert [r[:10] for r in replies] == ["250 2.0.0 "] * 2
    assert "<a@x.example>" in replies[0] and "<b@x.example>" in replies[1]
    [received] = drain(next_hop)
    assert received.mail_from == "alice@example.org"
    assert received.rcpt_tos == ["a@x.example", "b@x.example"]
    assert received.content == SIMPLE


def test_lmtp_answers_each_recipient_with_what_the_next_hop_said_in_one_transaction(server, next_hop):
    next_hop.handler.rcpt_replies.update({"later@x.example": "450 4.2.1 mailbox busy",
                                          "gone@x.example": "550 5.1.1 no such user"})
    with lhlo(server) as talk:
        talk.transaction("alice@example.org", ["ok@x.example", "later@x.example", "gone@x.example"], SIMPLE)
        replies = talk.replies(3)
        assert talk.command("NOOP") == "250 2.0.0 ok"       # the session goes on
    assert replies[0].startswith("250 2.0.0 <ok@x.example>")
    assert replies[1].startswith("451 4.2.1 <later@x.example> deferred"), replies
    assert replies[2].startswith("550 5.1.1 <gone@x.example> rejected"), replies
    [received] = drain(next_hop)
    assert received.rcpt_tos == ["ok@x.example"]
    assert not [line for line in server.gate_log.read_text().splitlines()
                if "delivery status notification" in line.lower() and "gone@x.example" in line]


def test_lmtp_passes_the_null_sender_on(server, next_hop):
    with lhlo(server) as talk:
        talk.transaction("", ["a@x.example"], SIMPLE)
        assert talk.reply().startswith("250 ")
    [received] = drain(next_hop)
    assert received.mail_from in ("", "<>")


def test_lmtp_unstuffs_dots_and_keeps_the_session_for_the_next_transaction(server, next_hop):
    with lhlo(server) as talk:
        for number in range(3):
            talk.transaction("alice@example.org", [f"n{number}@x.example"], DOTS)
            assert talk.reply().startswith("250 2.0.0"), number
    received = drain(next_hop)
    assert [r.content for r in received] == [DOTS] * 3
    assert [r.rcpt_tos for r in received] == [["n0@x.example"], ["n1@x.example"], ["n2@x.example"]]


def test_a_pipelined_session_in_one_write_gets_every_reply_in_order(server, next_hop):
    talk = Talk(server.lmtp)
    talk.send(b"LHLO mta.example\r\nMAIL FROM:<a@example.org> BODY=8BITMIME\r\nRCPT TO:<b@x.example>\r\n"
              b"DATA\r\n" + stuffed(DOTS) + b".\r\nRSET\r\nQUIT\r\n")
    replies = talk.replies(8)
    assert [r[:3] for r in replies] == ["220", "250", "250", "250", "354", "250", "250", "221"], replies
    assert "8BITMIME" in replies[1] and "PIPELINING" in replies[1] and "SIZE" in replies[1]
    assert [r.content for r in drain(next_hop)] == [DOTS]


def test_smtp_gives_one_reply_the_worst_and_defers_the_transaction(server, next_hop):
    next_hop.handler.rcpt_replies["later@x.example"] = "450 4.2.1 mailbox busy"
    with Talk(server.smtp) as talk:
        greeting = talk.reply()
        assert greeting.startswith("220 ") and "ESMTP" in greeting
        assert talk.command("LHLO x").startswith("500 ")
        assert talk.command("EHLO mta.example").startswith("250-")
        talk.transaction("alice@example.org", ["ok@x.example", "later@x.example"], SIMPLE)
        deferred = talk.reply()
        talk.transaction("alice@example.org", ["ok@x.example"], SIMPLE)
        accepted = talk.reply()
    assert deferred.startswith("451 4.2.1"), deferred
    assert accepted.startswith("250 2.0.0"), accepted
    assert [r.rcpt_tos for r in drain(next_hop)] == [["ok@x.example"]]     # nothing of the deferred one


def test_the_command_phase_refuses_what_it_must(server, next_hop):
    with lhlo(server) as talk:
        assert talk.command("RCPT TO:<a@x.example>").startswith("503 5.5.1")
        assert talk.command("MAIL FROM:<a@example.org> SIZE=999999999999").startswith("452 4.3.4")  # on_oversize
        assert talk.command("MAIL FROM:<a@example.org> AUTH=<>").startswith("555 ")
        assert talk.command("MAIL FROM:<a@example.org>") == "250 2.1.0 ok"
        assert talk.command("MAIL FROM:<a@example.org>").startswith("503 ")
        assert talk.command("DATA").startswith("503 5.5.1 no valid recipients")
        for number in range(5):
            assert talk.command(f"RCPT TO:<r{number}@x.example>") == "250 2.1.5 ok"
        assert talk.command("RCPT TO:<r5@x.example>").startswith("452 4.5.3")     # max_recipients
        assert talk.command("X" * 5000).startswith("500 5.5.0 line too long")
        assert talk.command("RCPT TO:<a\x01b@x.example>").startswith("501 ")
        assert talk.command("RSET") == "250 2.0.0 ok"
    assert drain(next_hop) == []


def test_a_message_cut_off_before_its_end_runs_nothing(server, next_hop):
    with lhlo(server) as talk:
        talk.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n")
        assert talk.replies(3)[-1].startswith("354")
        talk.send(SIMPLE[:100])
    assert wait_for(lambda: "connection closed in the middle of the message" in server.log(), 30), server.log()
    assert drain(next_hop) == []


def test_a_worker_killed_mid_message_makes_the_mta_retry_and_nothing_is_lost(server, next_hop):
    before = wait_for_workers(server, 2)
    talk = lhlo(server)
    talk.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n")
    assert talk.replies(3)[-1].startswith("354")
    talk.send(SIMPLE[:100])         # a worker holds the session now, in the message
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    assert talk.reply() == ""       # closed without a word: the MTA keeps the message, retries
    talk.sock.close()
    wait_for_workers(server, 2, exclude=before)
    with lhlo(server) as again:     # the retry
        again.transaction("a@example.org", ["b@x.example"], SIMPLE)
        assert again.reply().startswith("250 ")
    assert [r.content for r in drain(next_hop)] == [SIMPLE]


def test_idle_sessions_hold_no_worker(server, next_hop):
    """More sessions than workers, idle after LHLO: a client's request still gets a worker."""
    idle = [lhlo(server) for _ in range(4)]
    try:
        run = server.client(["-f", "a@example.org", "c@x.example"], SIMPLE, timeout=60)
        assert run.code == 0, run.stderr
        for talk in idle:
            assert talk.command("NOOP") == "250 2.0.0 ok"
    finally:
        for talk in idle:
            talk.close()
    assert len(drain(next_hop)) == 1


def test_an_inet_listener_speaks_lmtp_to_loopback(python, sink):
    from conftest import free_port

    port = free_port()
    drain(sink)
    with Server(python, f'mail_host = "{sink.address}"\nloop_suffix = ""\n[serve]\nworkers = 1\n',
                args=("--lmtp", f"inet:127.0.0.1:{port}")) as server:
        with Talk(("127.0.0.1", port)) as talk:
            assert talk.reply().startswith("220 ")
            assert talk.command("LHLO mta.example").startswith("250-")
            talk.transaction("", ["a@x.example"], SIMPLE)
            assert talk.reply().startswith("250 ")
        assert "lmtp inet:127.0.0.1:" in server.log()
    assert [r.content for r in drain(sink)] == [SIMPLE]


def test_a_bad_listen_address_is_a_boot_error(python, tmp_path):
    import subprocess

    from support.serving import client_env

    rules = tmp_path / "rules.toml"
    rules.write_text('[serve]\nlmtp = "tcp:1.2.3.4"\n')
    process = subprocess.run([str(python), "-m", "ispmailgate", "serve", "-c", str(rules)],
                             capture_output=True, text=True, env=client_env(), timeout=60)
    assert process.returncode == 78
    assert 'serve.lmtp: expected "unix:/path", "inet:host:port" or ""' in process.stderr


def test_sessions_a_killed_worker_held_no_longer_count_against_the_connection_limit(python, sink):
    killed: set[int] = set()
    with Listening(python, f'mail_host = "{sink.address}"\nloop_suffix = ""\n'
                           "[serve]\nworkers = 1\nconnections_per_worker = 2\n") as server:
        for _ in range(2):
            [worker] = wait_for_workers(server, 1, exclude=killed) - killed
            talk = lhlo(server)
            talk.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n")
            assert talk.replies(3)[-1].startswith("354")
            os.kill(worker, signal.SIGKILL)
            assert talk.reply() == ""
            talk.sock.close()
            killed.add(worker)
        wait_for_workers(server, 1, exclude=killed)
        sessions = [lhlo(server) for _ in range(2)]         # both greeted: 220, not 421
        for talk in sessions:
            talk.close()
    drain(sink)
