"""How an LMTP or SMTP session goes from the doorkeeper to a worker, and what happens when it
cannot (attack review 3): large envelopes, sessions that close while they wait, reloads."""

from __future__ import annotations

import socket
import time

import pytest

from conftest import CORPUS, crlf, wait_for
from support.lmtp import Talk
from support.serving import Server, drain
from support.serving import python, sink  # noqa: F401  (fixtures)

SIMPLE = crlf((CORPUS / "plain.eml").read_bytes())


class Listening(Server):
    """A server with an LMTP listener in its folder."""

    def __init__(self, python, config: str, **kwargs) -> None:
        super().__init__(python, config, **kwargs)
        self.lmtp = self.folder / "l.sock"
        self.write_config(config + f'lmtp = "unix:{self.lmtp}"\n')


def lhlo(server: Listening) -> Talk:
    talk = Talk(server.lmtp)
    assert talk.reply().startswith("220 ")
    assert talk.command("LHLO mta.example").startswith("250-")
    return talk


# -- the channel ---------------------------------------------------------------------------------

def test_a_parcel_of_any_size_goes_through_the_channel_whole():
    from ispmailgate_core.serve.handoff import Parcel, channel

    write, read = channel()
    mine, theirs = socket.socketpair()
    state = {"recipients": [f"{'r' * 980}{n:05d}@example.org" for n in range(200)],
             "reply": "250 2.0.0 ok\r\n" * 5000, "sender": "s\u00e9@example.org"}
    for data in (b"", b"x" * 100, b"y" * 200_000):
        assert write.send(Parcel("lmtp", theirs, state, data))
        parcel = read.receive()
        assert (parcel.kind, parcel.state, parcel.data) == ("lmtp", state, data)
        parcel.connection.sendall(b"hello")
        assert mine.recv(5) == b"hello"
        parcel.connection.close()
    assert write.send(Parcel("taken", state={"pid": 1}))
    assert read.receive() == Parcel("taken", None, {"pid": 1}, b"")


# -- through a real server ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_worker(python, sink):
    with Listening(python, f'mail_host = "{sink.address}"\nloop_suffix = ""\n'
                           "[serve]\nworkers = 1\nmax_recipients = 150\n") as server:
        yield server


def test_a_large_envelope_reaches_a_worker_and_leaves_the_worker_free(one_worker, sink):
    """120 recipients of 450 characters, pipelined with their replies unread: over 100 KiB of
    envelope.  Twice, on one worker: each is delivered, and a small one after them too."""
    drain(sink)
    recipients = [f"{'r' * 440}{n:05d}@x.example" for n in range(120)]
    for _ in range(2):
        with lhlo(one_worker) as talk:
            head = talk.transaction("a@example.org", recipients, SIMPLE)
            assert head[1:-1] == ["250 2.1.5 ok"] * 120
            replies = talk.replies(120)
            assert all(reply.startswith("250 2.0.0") for reply in replies), replies[:3]
    with lhlo(one_worker) as talk:
        talk.transaction("a@example.org", ["small@x.example"], SIMPLE)
        assert talk.reply().startswith("250 2.0.0")
    received = drain(sink)
    assert [len(r.rcpt_tos) for r in received] == [120, 120, 1]
    assert "malformed parcel" not in one_worker.log()


def test_a_session_that_cannot_be_queued_is_told_to_retry_and_uses_no_worker(monkeypatch):
    import select

    from ispmailgate_core.serve.doorkeeper import Door, Doorkeeper
    from ispmailgate_core.serve.session import Limits, Session

    class Broken:
        def send(self, parcel, timeout=0.0):
            raise OSError("no memory for a memfd")

    keeper = object.__new__(Doorkeeper)
    keeper.queue, keeper.settings = Broken(), type("S", (), {"workers": 2})()
    keeper.poll, keeper.queued = select.poll(), 0
    mta, ours = socket.socketpair()
    session = Session("lmtp", Limits("gate.example", 10_000_000, 50, False), "peer")
    session.feed(b"LHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    assert session.ready
    door = Door(ours, "lmtp", "peer", 0.0, session, ready=True)
    keeper.doors, keeper.ready = {ours.fileno(): door}, [door]
    keeper.dispatch()
    assert (keeper.queued, keeper.ready, keeper.doors) == (0, [], {})
    replies = mta.makefile("rb").read().decode().splitlines()
    assert replies[-1].startswith("421 4.3.0 "), replies
    assert replies[-3:-1] == ["250 2.1.0 ok", "250 2.1.5 ok"]       # what was due before, then 421


# -- sessions that wait for a worker -------------------------------------------------------------

DATA_AFTER = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n"


def hang_up(talk: Talk) -> None:
    talk.file.close()
    talk.sock.close()


@pytest.fixture
def busy(python, sink):
    """One worker, three connections at most, each session waits 3 s at most; the worker held
    by a session in the middle of its message for the whole test."""
    with Listening(python, f'mail_host = "{sink.address}"\nloop_suffix = ""\n[serve]\nworkers = 1\n'
                           "connections_per_worker = 3\ncommand_timeout = 3\n") as server:
        holder = lhlo(server)
        holder.send(DATA_AFTER)
        assert holder.replies(3)[-1].startswith("354")
        holder.send(b"Subject: slow\r\n")
        queued = lhlo(server)       # put on the queue: the one worker will take it next
        queued.send(DATA_AFTER)
        yield server
        hang_up(holder)
        hang_up(queued)
    drain(sink)


def test_a_session_that_closes_while_it_waits_for_a_worker_frees_its_place(busy):
    waiting = lhlo(busy)
    waiting.send(DATA_AFTER)
    time.sleep(0.5)                 # the doorkeeper reads the DATA (its replies wait for a worker)
    hang_up(waiting)                # no QUIT: the MTA gave up
    assert wait_for(lambda: "closed while it waited for a worker" in busy.log(), 2), busy.log()
    with Talk(busy.lmtp) as again:
        assert again.reply().startswith("220 "), busy.log()
    assert "waited 3 s for a worker" not in busy.log()      # noticed at once, not at its deadline


def test_a_session_waits_for_a_worker_only_so_long_and_is_told_to_retry(busy):
    with lhlo(busy) as waiting:
        waiting.send(DATA_AFTER)
        replies = waiting.replies(3)
    assert replies[:2] == ["250 2.1.0 ok", "250 2.1.5 ok"]
    assert replies[2].startswith("421 4.3.2 "), replies
    assert "no worker free" in replies[2]
    with Talk(busy.lmtp) as again:      # its place is free again
        assert again.reply().startswith("220 ")


def test_a_session_waiting_for_a_worker_keeps_its_envelope_through_a_reload(python, sink):
    import signal

    drain(sink)
    with Listening(python, f'mail_host = "{sink.address}"\nloop_suffix = ""\n[serve]\nworkers = 1\n') as server:
        holder = lhlo(server)
        holder.send(DATA_AFTER)
        assert holder.replies(3)[-1].startswith("354")
        holder.send(b"Subject: held\r\n")           # the one worker is busy with this
        queued = lhlo(server)
        queued.send(DATA_AFTER)                     # on the queue
        waiting = lhlo(server)
        waiting.sock.settimeout(30)
        waiting.send(b"MAIL FROM:<w@example.org>\r\nRCPT TO:<w1@x.example>\r\nRCPT TO:<w2@x.example>\r\nDATA\r\n")
        time.sleep(0.5)                             # read by the doorkeeper: waits for a worker
        server.signal(signal.SIGHUP)
        assert server.wait_notice("RELOADING=1") and server.wait_notice("READY=1"), server.log()
        hang_up(holder)
        hang_up(queued)
        assert waiting.replies(4) == ["250 2.1.0 ok", "250 2.1.5 ok", "250 2.1.5 ok",
                                      "354 2.0.0 send the message, end with <CR><LF>.<CR><LF>"], server.log()
        waiting.send(b"Subject: waited\r\n\r\nbody\r\n.\r\n")
        assert [reply[:9] for reply in waiting.replies(2)] == ["250 2.0.0"] * 2
        waiting.close()
    [received] = drain(sink)
    assert (received.mail_from, received.rcpt_tos) == ("w@example.org", ["w1@x.example", "w2@x.example"])


def test_noops_do_not_keep_an_idle_session_for_good(python, sink):
    with Listening(python, f'mail_host = "{sink.address}"\n[serve]\nworkers = 1\ncommand_timeout = 2\n') as server:
        with lhlo(server) as talk:
            answers = []
            for _ in range(12):         # 6 s of NOOPs, one every half second
                try:
                    talk.send(b"NOOP\r\n")
                except BrokenPipeError:     # told goodbye while we slept: the 421 waits to be read
                    pass
                answers.append(talk.reply())
                if not answers[-1].startswith("250"):
                    break
                time.sleep(0.5)
        assert answers[-1].startswith("421 4.4.2"), answers
        assert 3 <= len(answers) <= 6, answers
        with lhlo(server) as talk:      # a command that moves the session on does put it off
            for _ in range(3):
                time.sleep(1.2)
                assert talk.command("MAIL FROM:<a@example.org>") == "250 2.1.0 ok"
                assert talk.command("RSET") == "250 2.0.0 ok"
