"""The example rule files in examples/ load and do what their comments say."""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import CORPUS, PROJECT, run_gate

EXAMPLES = PROJECT / "examples"
SIMPLE = (CORPUS / "simple.msg").read_bytes()
# multipart/alternative: text and HTML (the corpus's HTML parts have no <body> to go after)
HTML = (CORPUS / "ticket-60931.msg").read_bytes().replace(b"HELLO<br>", b"<html><body>HELLO<br></body></html>")


def runnable(name: str, tmp_path) -> str:
    """The example as shipped, plus a user to become when the tests run as root."""
    path = tmp_path / name
    shutil.copy(EXAMPLES / name, path)
    if os.geteuid() == 0:
        path.write_text('mail_user = "nobody"\nmail_group = "nogroup"\n' + path.read_text())
    path.chmod(0o644)
    return str(path)


def send(config: str, sink, sender: str, recipient: str, data: bytes) -> bytes:
    run = run_gate(["-c", config, "--mail-host", sink.address, "-f", sender, recipient], data)
    assert run.code == 0, run.stderr
    return sink.messages[-1].content


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_every_example_rule_file_loads(name, tmp_path):
    import ispmailgate

    ispmailgate.load_config(EXAMPLES / name)


def test_external_warning(tmp_path, smtp_sink):
    config = runnable("external-warning.toml", tmp_path)
    outside = send(config, smtp_sink, "someone@elsewhere.org", "bob@example.com", SIMPLE)
    head, body = outside.split(b"\r\n\r\n", 1)
    assert b"Subject: [EXTERNAL] Request for Leave" in head
    assert body.startswith(b"CAUTION: This message comes from outside the organisation.")
    html = send(config, smtp_sink, "someone@elsewhere.org", "bob@sales.example.net", HTML)
    assert html.count(b"CAUTION: This message comes from outside") == 2    # the text and the HTML part
    inside = send(config, smtp_sink, "alice@example.com", "bob@example.com", SIMPLE)
    assert inside == SIMPLE.replace(b"\n", b"\r\n")
    to_postmaster = send(config, smtp_sink, "someone@elsewhere.org", "postmaster@example.com", SIMPLE)
    assert to_postmaster == SIMPLE.replace(b"\n", b"\r\n")
    again = send(config, smtp_sink, "someone@elsewhere.org", "bob@example.com", outside.replace(b"\r\n", b"\n"))
    assert again == outside                                                  # twice: nothing more


def test_per_domain_disclaimer(tmp_path, smtp_sink):
    config = runnable("per-domain-disclaimer.toml", tmp_path)
    shop = send(config, smtp_sink, "info@example-shop.de", "kunde@example.org", SIMPLE)
    from ispmailgate_filters.mime import Message
    text = Message(shop).root.text()
    assert text.rstrip().endswith("Geschäftsführung: Erika Mustermann.")
    assert "Example Shop GmbH, Musterstraße 1" in text
    legal = send(config, smtp_sink, "counsel@legal.example.com", "x@example.org", SIMPLE)
    assert b"privileged and confidential" in legal and b"Example Corp." not in legal
    corp = send(config, smtp_sink, "alice@example.com", "x@example.org", SIMPLE)
    assert corp.rstrip().endswith(b"Example Corp. https://www.example.com/")
    other = send(config, smtp_sink, "someone@elsewhere.org", "x@example.org", SIMPLE)
    assert other == SIMPLE.replace(b"\n", b"\r\n")
