"""Two delivery groups through serve's listeners (attack review 3, two groups): the SMTP
listener gives one reply for all, so a recipient deferred in one group sends no group (the
MTA's retry delivers each once); LMTP answers per recipient, so there a deferred group
holds back only itself and the other is delivered."""

from __future__ import annotations

import pytest

from conftest import CORPUS, crlf
from support.lmtp import Talk
from support.serving import drain
from support.serving import python, sink  # noqa: F401  (fixtures)
from test_serve_lmtp import Listening, lhlo, next_hop  # noqa: F401  (next_hop: a fixture)

SIMPLE = crlf((CORPUS / "plain.eml").read_bytes())
BOTH_ORDERS = pytest.mark.parametrize("order", [["a@x.example", "b@x.example"], ["b@x.example", "a@x.example"]])
BANNER_FOR_B = '[[recipients]]\nrecipient = "^b@"\nfilters = ["ban"]\n[filter.ban]\ntype = "banner"\ntext = "BANNER"\n'


@pytest.fixture(scope="module")
def server(python, sink):
    with Listening(python, f'mail_host = "{sink.address}"\nloop_suffix = ""\n{BANNER_FOR_B}'
                           "[serve]\nworkers = 1\n") as server:
        yield server


@BOTH_ORDERS
@pytest.mark.parametrize("deferred", ["a@x.example", "b@x.example"])
def test_the_smtp_listener_sends_no_group_when_one_recipient_is_deferred(server, next_hop, order, deferred):
    next_hop.handler.rcpt_replies[deferred] = "451 4.3.0 try later"
    with Talk(server.smtp) as talk:
        assert talk.reply().startswith("220 ")
        assert talk.command("EHLO mta.example").startswith("250-")
        talk.transaction("alice@example.org", order, SIMPLE)
        reply = talk.reply()
    assert reply.startswith("451 4.3.0"), reply
    assert drain(next_hop) == []


@BOTH_ORDERS
def test_lmtp_delivers_the_other_group_when_one_is_deferred(server, next_hop, order):
    next_hop.handler.rcpt_replies["b@x.example"] = "451 4.3.0 try later"
    with lhlo(server) as talk:
        talk.transaction("alice@example.org", order, SIMPLE)
        replies = dict(zip(order, talk.replies(2)))
    assert replies["a@x.example"].startswith("250 2.0.0"), replies
    assert replies["b@x.example"].startswith("451 4.3.0"), replies
    [received] = drain(next_hop)
    assert received.rcpt_tos == ["a@x.example"] and b"BANNER" not in received.content
