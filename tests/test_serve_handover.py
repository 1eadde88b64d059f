"""How an LMTP or SMTP session goes from the doorkeeper to a worker, and what happens when it
cannot (attack review 3): large envelopes, sessions that close while they wait, reloads."""

from __future__ import annotations

import socket

import pytest

from conftest import CORPUS, crlf
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
