"""The doorkeeper's command phase (core/serve/session.py) without a server: what it lets
into an envelope."""

from __future__ import annotations

from ispmailgate_core.serve.session import Limits, Session


def replies(*lines: str, loop_suffix: str = "") -> list[str]:
    session = Session("lmtp", Limits("gate.example", 10_000_000, 50, False, "", loop_suffix), "peer")
    session.feed(b"LHLO mta.example\r\n")
    del session.output[:]
    session.feed("".join(line + "\r\n" for line in lines).encode())
    return session.output.decode().splitlines()


def test_a_recipient_the_run_would_find_empty_or_unusable_is_refused_alone_at_rcpt():
    got = replies("MAIL FROM:<a@example.org>", "RCPT TO:<\t>", "RCPT TO:< >", "RCPT TO:<b@x.example>",
                  "RCPT TO:<a b@x.example>", f"RCPT TO:<{'r' * 495}@x.example>", "RCPT TO:<c@x.example>")
    assert got[0] == "250 2.1.0 ok"
    assert [line[:9] for line in got[1:]] == ["501 5.1.3", "501 5.1.3", "250 2.1.5", "501 5.1.3",
                                              "501 5.1.3", "250 2.1.5"], got
    assert "empty" in got[1] and "longer than 500 octets" in got[5]


def test_the_loop_suffix_counts_in_a_recipient_s_length():
    address = f"{'r' * 480}@x.example"
    assert replies("MAIL FROM:<>", f"RCPT TO:<{address}>")[1] == "250 2.1.5 ok"
    assert replies("MAIL FROM:<>", f"RCPT TO:<{address}>", loop_suffix=".ispmailgate" * 2)[1][:9] == "501 5.1.3"


def test_an_unusable_sender_is_refused_at_mail_and_the_null_sender_is_not():
    assert replies("MAIL FROM:<>") == ["250 2.1.0 ok"]
    assert replies(f"MAIL FROM:<{'s' * 600}@example.org>")[0].startswith("501 5.1.7 bad sender address")


def test_refused_recipients_are_not_errors_that_end_the_session():
    got = replies("MAIL FROM:<a@example.org>", *[f"RCPT TO:<{'r' * 600}{n}@x.example>" for n in range(30)],
                  "RCPT TO:<b@x.example>")
    assert got[-1] == "250 2.1.5 ok", got[-3:]
    assert len(got) == 32
