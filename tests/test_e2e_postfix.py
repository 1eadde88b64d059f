"""End to end: a real Postfix hands mail to ispmailgate through pipe(8) and takes it back.

One private instance serves the module (see postfix_instance.py); every test starts with
an empty queue, empty Maildirs and the default rules below.  A new case is a rule file
and a message:

    def test_banner_is_added(postfix):
        postfix.rules('default_filter = ["banner"]\\n[filter.banner]\\n...')
        postfix.submit("sender@e2e.test", ["alice@e2e.test"], MESSAGE)
        [mail] = postfix.wait_for_mail("alice")
        assert b"..." in mail
"""

from __future__ import annotations

import base64
import os
import re

import pytest

from conftest import CORPUS
from support.mailauth import signed
from support.postfix_instance import PIPE_USER, PostfixInstance, e2e_gate, run_failing_test

NESTED = (CORPUS / "nested.eml").read_bytes()
SIMPLE_BODY = b"Subject: e2e\nFrom: sender@e2e.test\nTo: alice@e2e.test\n\nHello through Postfix.\n"

STAMP = '''
    default_filter = ["stamp"]
    [filter.stamp]
    type = "gate_test_filters:Stamp"
    value = "e2e"
'''
# Fields Postfix puts in front: smtpd's Received before the gate (the gate's input), and
# smtpd's after it and virtual(8)'s on delivery.
POSTFIX_FIELDS = {"return-path", "x-original-to", "delivered-to", "received"}
FIELD = re.compile(rb"([A-Za-z-]+):.*\n(?:[ \t].*\n)*")


@pytest.fixture(scope="module")
def postfix_instance():
    instance = PostfixInstance(e2e_gate())
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


@pytest.fixture
def postfix(postfix_instance):
    postfix_instance.reset()
    postfix_instance.rules(STAMP)
    return postfix_instance


def split_postfix_fields(delivered: bytes) -> tuple[list[str], bytes]:
    """Header fields Postfix put in front of what the gate delivered, and the rest.

    A filter that adds its field on top puts it above the first smtpd's Received field,
    so "the rest" starts with that field; a gate that changed nothing delivers it
    (and everything after it) as it came.  virtual(8) ends each Maildir file with an
    empty line, which is dropped here (test_postfix_alone_... shows both).
    """
    names, position = [], 0
    while (match := FIELD.match(delivered, position)) and match.group(1).lower().decode() in POSTFIX_FIELDS:
        names.append(match.group(1).lower().decode())
        position = match.end()
    assert delivered.endswith(b"\n\n"), delivered[-80:]
    return names, delivered[position:-1]


def test_postfix_alone_adds_its_fields_in_front_and_an_empty_line_at_the_end(postfix):
    import smtplib

    with smtplib.SMTP("127.0.0.1", postfix.ports["reinject"], timeout=60) as client:
        client.sendmail("sender@e2e.test", ["carol@e2e.test"], NESTED)
    [delivered] = postfix.wait_for_mail("carol")
    added, message = split_postfix_fields(delivered)
    assert added == ["return-path", "x-original-to", "delivered-to", "received"]
    assert message == NESTED and delivered.endswith(NESTED + b"\n")
    assert postfix.gate_log() == ""                     # this listener does not filter


def without_received(message: bytes) -> bytes:
    """``message`` without its first Received field (the one smtpd added before the gate)."""
    match = re.search(rb"(?m)^Received:.*\n(?:[ \t].*\n)*", message)
    assert match, message[:300]
    return message[:match.start()] + message[match.end():]


def test_message_submitted_by_smtp_arrives_filtered_and_otherwise_byte_identical(postfix):
    postfix.submit("sender@e2e.test", ["alice@e2e.test"], NESTED)
    [delivered] = postfix.wait_for_mail("alice")
    added, message = split_postfix_fields(delivered)
    assert added == ["return-path", "x-original-to", "delivered-to", "received"]
    assert message.startswith(b"X-Stamp: e2e\nReceived: from client.e2e.test ")
    assert without_received(message) == b"X-Stamp: e2e\n" + NESTED
    assert delivered.startswith(b"Return-Path: <sender@e2e.test>\n")
    postfix.wait_for_queue(lambda queue: queue == [])


def test_several_recipients_share_one_run_and_one_reinjection(postfix):
    postfix.submit("sender@e2e.test", ["alice@e2e.test", "bob@e2e.test"], SIMPLE_BODY)
    for user in ("alice", "bob"):
        [delivered] = postfix.wait_for_mail(user)
        assert without_received(split_postfix_fields(delivered)[1]) == b"X-Stamp: e2e\n" + SIMPLE_BODY
    [line] = postfix.wait_for_gate_log("status=").splitlines()
    assert "to=<alice@e2e.test>,<bob@e2e.test> rule=default chain=stamp outcome=sent" in line


def test_null_sender_bounces_pass_with_the_null_sender(postfix):
    bounce = b"From: MAILER-DAEMON@elsewhere.example\nSubject: Undelivered Mail\n\nreport\n"
    postfix.submit("", ["bob@e2e.test"], bounce)
    [delivered] = postfix.wait_for_mail("bob")
    assert delivered.startswith(b"Return-Path: <>\n")
    assert without_received(split_postfix_fields(delivered)[1]) == b"X-Stamp: e2e\n" + bounce
    assert "from=<> " in postfix.wait_for_gate_log("status=")


def test_a_rejected_message_bounces_to_the_sender_with_the_gates_reason(postfix):
    postfix.rules('default_filter = ["judge"]\n[filter.judge]\ntype = "gate_test_filters:Judge"\n')
    postfix.submit("sender@e2e.test", ["alice@e2e.test"], SIMPLE_BODY)
    [bounce] = postfix.wait_for_mail("sender")
    assert b"Subject: Undelivered Mail Returned to Sender" in bounce
    # pipe(8) takes the status from the front of the gate's first stderr line
    assert b"\nStatus: 5.7.1\nDiagnostic-Code: x-unix; judge: judged unacceptable\n" in bounce
    assert b"\n<alice@e2e.test>: judge: judged unacceptable\n" in bounce
    assert b"Content-Type: message/rfc822" in bounce and b"\n\nHello through Postfix.\n" in bounce
    assert postfix.mailbox("alice") == []
    postfix.wait_for_queue(lambda queue: queue == [])


def test_partly_rejected_the_gate_delivers_the_rest_and_bounces_the_others_itself(postfix):
    postfix.rules('default_filter = ["judge"]\n[filter.judge]\ntype = "gate_test_filters:Judge"\n'
                  'only = "alice@e2e.test"\n')
    postfix.submit("sender@e2e.test", ["alice@e2e.test", "bob@e2e.test"], SIMPLE_BODY)
    [delivered] = postfix.wait_for_mail("bob")
    added, message = split_postfix_fields(delivered)
    assert added == ["return-path", "x-original-to", "delivered-to", "received", "received"]
    assert message == SIMPLE_BODY
    [bounce] = postfix.wait_for_mail("sender")
    assert b"Return-Path: <>" in bounce                  # the gate's own DSN, re-injected
    assert b"<alice@e2e.test>: 5.7.1 judge: judged unacceptable" in bounce
    assert postfix.mailbox("alice") == []


def test_exit_75_keeps_the_mail_queued_until_the_fault_is_fixed(postfix):
    postfix.broken_rules("default_filter = [\n")
    queue_id = postfix.submit("sender@e2e.test", ["alice@e2e.test"], SIMPLE_BODY)
    [queued] = postfix.wait_for_queue(
        lambda queue: any(m["queue_name"] == "deferred" for m in queue))
    assert queued["queue_id"] == queue_id
    [recipient] = queued["recipients"]
    assert recipient["address"] == "alice@e2e.test"
    assert recipient["delay_reason"].startswith(f"config error: {postfix.rules_file}: TOML syntax")
    assert re.search(rf"{queue_id}: to=<alice@e2e.test>, relay=ispmailgate, .* dsn=4\.3\.5, "
                     r"status=deferred \(config error: ", postfix.maillog.read_text())
    assert postfix.mailbox("alice") == [] and postfix.mailbox("sender") == []

    postfix.rules(STAMP)
    postfix.flush()
    [delivered] = postfix.wait_for_mail("alice")
    assert without_received(split_postfix_fields(delivered)[1]) == b"X-Stamp: e2e\n" + SIMPLE_BODY
    postfix.wait_for_queue(lambda queue: queue == [])
    assert postfix.mailbox("sender") == []              # no bounce, no delay warning


def test_a_filter_error_reaches_the_postmaster_with_the_original(postfix):
    postfix.rules('default_filter = ["judge"]\n[filter.judge]\ntype = "gate_test_filters:Judge"\n'
                  'verdict = "error"\n')
    postfix.submit("sender@e2e.test", ["alice@e2e.test"], NESTED)
    [report] = postfix.wait_for_mail("postmaster")
    assert b"Subject: ispmailgate: filter judge failed" in report
    assert b"Content-Type: message/rfc822" in report
    assert NESTED in report
    assert postfix.mailbox("alice") == []
    postfix.wait_for_queue(lambda queue: queue == [])


def test_reinjection_through_sendmail_and_pickup(postfix):
    postfix.rules('sendmail_command = ["/usr/sbin/sendmail", "-oi"]\n' + STAMP)
    postfix.submit("sender@e2e.test", ["alice@e2e.test"], SIMPLE_BODY)
    [delivered] = postfix.wait_for_mail("alice")
    assert b"X-Stamp: e2e\n" in delivered
    assert delivered.endswith(b"\n\nHello through Postfix.\n\n")
    assert delivered.startswith(b"Return-Path: <sender@e2e.test>\n")
    log = postfix.maillog.read_text()
    assert re.search(r"postfix/pickup\[\d+\]: \w+: uid=\d+ from=<sender@e2e.test>", log), log
    # the gate logs its line after sendmail returned, and pickup may deliver before that
    assert "outcome=sent (2.0.0 accepted by sendmail:/usr/sbin/sendmail)" in postfix.wait_for_gate_log("status=")


def test_the_instance_is_torn_down_even_when_a_test_fails(tmp_path):
    """A failing test in another pytest run, with these very fixtures: nothing survives it."""
    printed = run_failing_test(tmp_path, "from test_e2e_postfix import postfix, postfix_instance\n\n"
                                         "def test_fails(postfix):\n"
                                         "    print(f'BASE={postfix.base} MASTER={postfix._master_pid()}')\n"
                                         "    assert False, 'on purpose'\n")
    base, master = printed.split(" MASTER=")
    assert int(master) > 1
    assert not os.path.exists(base)
    assert not os.path.exists(f"/proc/{master}"), "Postfix master outlived the failed test"


# -- the built-in filters behind Postfix: a case is a rule file and a message -------------------

def test_a_banner_is_added_on_the_way(postfix):
    postfix.rules('default_filter = ["disclaimer"]\n'
                  '[filter.disclaimer]\ntype = "banner"\ntext = "-- checked by the gateway"\n')
    postfix.submit("sender@e2e.test", ["alice@e2e.test"], SIMPLE_BODY)
    [delivered] = postfix.wait_for_mail("alice")
    body = delivered.split(b"\n\n", 1)[1]
    assert body.startswith(b"Hello through Postfix.\n") and b"-- checked by the gateway" in body


def test_a_virus_is_bounced_and_clean_mail_marked(postfix, clamd):
    from support.clamav import EICAR, EICAR_NAME

    for path, mode in ((clamd.home, 0o755), (clamd.socket, 0o666)):   # the pipe user must reach it
        os.chmod(path, mode)
    postfix.rules(f'default_filter = ["av"]\n[filter.av]\ntype = "virscan"\nsocket = "{clamd.socket}"\n'
                  'on_infected = "reject"\nclamd_config = ""\n')
    infected = SIMPLE_BODY.replace(b"Hello through Postfix.\n", EICAR + b"\n")
    postfix.submit("sender@e2e.test", ["alice@e2e.test"], infected)
    [bounce] = postfix.wait_for_mail("sender")
    assert b"\nStatus: 5.7.1\n" in bounce and EICAR_NAME.encode() in bounce
    postfix.submit("sender@e2e.test", ["alice@e2e.test"], SIMPLE_BODY)
    [delivered] = postfix.wait_for_mail("alice")
    assert b"X-ispMailGate-VirScan: scanned\n" in delivered
    assert postfix.mailbox("alice") == [delivered]                # the infected one never arrived


def test_a_virus_can_be_discarded_into_the_quarantine_instead(postfix, clamd):
    from support.clamav import EICAR, EICAR_NAME

    for path, mode in ((clamd.home, 0o755), (clamd.socket, 0o666)):
        os.chmod(path, mode)
    quarantine = postfix.spool / "quarantine"
    postfix.rules(f'default_filter = ["av"]\n[filter.av]\ntype = "virscan"\nsocket = "{clamd.socket}"\n'
                  f'on_infected = "discard"\nquarantine_dir = "{quarantine}"\nclamd_config = ""\n')
    infected = SIMPLE_BODY.replace(b"Hello through Postfix.\n", EICAR + b"\n")
    postfix.submit("sender@e2e.test", ["alice@e2e.test"], infected)
    assert "outcome=discarded by av" in postfix.wait_for_gate_log("status=done"), postfix.log_tail()
    postfix.wait_for_queue(lambda queue: queue == [])
    [kept] = quarantine.glob("*.eml")
    assert infected in kept.read_bytes() and EICAR_NAME in postfix.gate_log()
    assert postfix.mailbox("alice") == [] and postfix.mailbox("sender") == []   # no backscatter


def test_a_banner_on_dkim_signed_mail_is_arc_sealed_on_the_way(postfix, mailauth):
    """The gate verifies DKIM itself (through a real DNS server), adds a warning, seals."""
    import pwd

    import dkim

    key = postfix.base / "arc.pem"                       # the pipe user's, and nobody else's
    key.write_bytes(mailauth.gateway_key.private_pem)
    os.chown(key, pwd.getpwnam(PIPE_USER).pw_uid, -1)
    key.chmod(0o600)
    postfix.rules(f'''
        default_filter = ["warn"]
        [filter.warn]
        type = "banner"
        position = "top"
        text = "CAUTION: external sender"
        subject_prefix = "[EXT] "
        [arc]
        domain = "{mailauth.gateway_key.domain}"
        selector = "{mailauth.gateway_key.selector}"
        private_key_file = "{key}"
        authserv_id = "mx.e2e.test"
        verify_dkim = true
        resolver = "{mailauth.dns.address}"
    ''')
    postfix.submit("author@sender.example", ["alice@e2e.test"], signed(mailauth, SIMPLE_BODY))
    [delivered] = postfix.wait_for_mail("alice")
    wire = delivered.replace(b"\n", b"\r\n")
    assert b"Subject: [EXT] e2e" in delivered and b"\n\nCAUTION: external sender" in delivered
    verdict, _, reason = dkim.arc_verify(wire, dnsfunc=mailauth.dns.txt)
    assert verdict == dkim.CV_Pass, reason
    assert re.search(rb"ARC-Authentication-Results: i=1; mx.e2e.test;\s+dkim=pass header.d=sender.example",
                     delivered)


def test_mail_from_our_domain_leaves_with_a_banner_and_a_signature_that_verifies(postfix):
    """DKIM-signed after the banner (issue 20): the signature verifies in alice's Maildir,
    after Postfix's reinjection and delivery added their fields."""
    import pwd

    import dkim

    from support.mailauth import DnsServer, make_key

    key, record = make_key(postfix.base, "gw", "e2e.test")
    os.chown(key.path, pwd.getpwnam(PIPE_USER).pw_uid, -1)       # the pipe user's, and nobody else's
    dns = DnsServer({key.dns_name: record})
    try:
        postfix.rules(f'''
            default_filter = ["disclaimer"]
            [filter.disclaimer]
            type = "banner"
            text = "-- checked by the gateway"
            [[dkim]]
            domain = "e2e.test"
            selector = "gw"
            private_key_file = "{key.path}"
        ''')
        postfix.submit("sender@e2e.test", ["alice@e2e.test"], SIMPLE_BODY, port="originate")
        [delivered] = postfix.wait_for_mail("alice")
        assert b"Hello through Postfix.\n" in delivered and b"-- checked by the gateway" in delivered
        assert re.search(rb"\nDKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=e2e.test;", delivered)
        assert dkim.verify(delivered.replace(b"\n", b"\r\n"), dnsfunc=dns.txt)
        postfix.submit("sender@e2e.test", ["alice@e2e.test"], SIMPLE_BODY)      # port 25: from outside
        both = postfix.wait_for_mail("alice", 2)
        assert sum(b"DKIM-Signature" in m for m in both) == 1        # the second one went unsigned
        assert all(b"-- checked by the gateway" in m for m in both)
    finally:
        dns.stop()


def test_smime_in_and_out_through_postfix(postfix):
    """openssl-made signed-and-enveloped mail is decrypted and verified on its way to alice;
    plain mail to bob leaves encrypted to bob's own certificate, which openssl decrypts."""
    import pwd

    from support.smime_keys import openssl, pki

    keys = pki()
    bob = keys.person("e2e-bob", "bob@e2e.test")
    folder = postfix.base / "smime"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o755)
    (folder / "certs").mkdir(exist_ok=True)
    nobody = pwd.getpwnam(PIPE_USER).pw_uid
    for name, source in (("gw.key", keys.gateway_b.key), ("gw.pem", keys.gateway_b.cert), ("ca.pem", keys.trust_store),
                         ("certs/bob.pem", bob.cert)):
        (folder / name).write_bytes(source.read_bytes())
    os.chown(folder / "gw.key", nobody, -1)                 # the pipe user's, and nobody else's
    (folder / "gw.key").chmod(0o600)
    postfix.rules(f'''
        [[recipients]]
        recipient = '^alice@'
        filters = ["smime-in"]
        [[recipients]]
        recipient = '^bob@'
        filters = ["smime-out"]
        [filter.smime-in]
        type = "smime"
        direction = "neg"
        key_file = "{folder}/gw.key"
        cert_file = "{folder}/gw.pem"
        trust_store = "{folder}/ca.pem"
        [filter.smime-out]
        type = "smime"
        direction = "pos"
        per_recipient = true
        recipient_certs = "{folder}/certs"
    ''')
    content = b"Content-Type: text/plain\r\n\r\nThe figures, signed and sealed.\r\n"
    sealed = openssl("cms", "-encrypt", "-aes256", keys.gateway_b.cert,
                     data=keys.alice.sign(content, detached=False)).stdout.replace(b"\r\n", b"\n")
    postfix.submit("alice@b.example", ["alice@e2e.test"],
                   b"From: alice@b.example\nTo: alice@e2e.test\nSubject: sealed\n" + sealed)
    [delivered] = postfix.wait_for_mail("alice")
    assert b"\nX-ispMailGate-SMIME-Result: decrypted; scope=message\n" in delivered, postfix.log_tail()
    assert b'\nX-ispMailGate-SMIME-Signature: good; signer="alice.smith@b.example,\n alice@b.example"; ' \
           b"scope=message\n" in delivered
    assert b"\n\nThe figures, signed and sealed.\n" in delivered
    postfix.submit("sender@e2e.test", ["bob@e2e.test"], SIMPLE_BODY)
    [encrypted] = postfix.wait_for_mail("bob")
    body = encrypted.split(b"\n\n", 1)[1]
    assert b"Hello through Postfix" not in encrypted and b"smime-type=enveloped-data" in encrypted
    plain = bob.decrypt(base64.b64decode(body), inform="DER")
    assert plain.returncode == 0 and plain.stdout.startswith(b"\r\nHello through Postfix.\r\n"), plain.stderr
