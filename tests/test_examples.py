"""The files in examples/ work: every rule file loads and does what its comments say, the
sendmail .mc files build with sendmail's own m4 files, and the procmail and maildrop recipes
filter and defer for real.

(examples/postfix/master.cf is what test_e2e_postfix.py runs, examples/sendmail/sendmail.mc what
test_e2e_sendmail.py runs.)
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path

import pytest

from conftest import CORPUS, PROJECT, run_gate

EXAMPLES = PROJECT / "examples"
SENDMAIL_CF = Path("/usr/share/sendmail/cf")         # Debian package sendmail-cf
MBOX_MESSAGE = (CORPUS / "mbox-forward.eml").read_bytes()  # starts with a From_ line
SIMPLE = (CORPUS / "plain.eml").read_bytes()
HTML = (CORPUS / "html-alternative.eml").read_bytes()    # multipart/alternative: text, and HTML with <body>


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
    from ispmailgate_core import rules

    rules.load_config(EXAMPLES / name)


def test_external_warning(tmp_path, smtp_sink):
    config = runnable("external-warning.toml", tmp_path)
    outside = send(config, smtp_sink, "someone@elsewhere.org", "bob@example.com", SIMPLE)
    head, body = outside.split(b"\r\n\r\n", 1)
    assert b"Subject: [EXTERNAL] Notes on the analytical engine" in head
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


# -- the rule file --------------------------------------------------------------------------------

def test_example_rule_file_uses_every_built_in_filter():
    from ispmailgate_filters import BUILTIN

    table = tomllib.loads((EXAMPLES / "ispmailgate.toml").read_text())
    types = {options["type"] for options in table["filter"].values()}
    chains = [name for rule in table["recipients"] for name in rule["filters"]]
    assert set(BUILTIN) <= types | set(chains)
    assert set(table["filter"]) <= set(chains) | set(table["default_filter"])


def test_example_rule_file_is_valid_for_every_filter_this_build_has():
    """Every problem may only be a built-in filter module that is not in this build yet;
    once it is, its options in the example are checked like any others."""
    from ispmailgate_core import rules

    problems = []
    config = rules.load_config(EXAMPLES / "ispmailgate.toml", problems)
    assert config is not None
    for problem in problems:
        assert problem.path.startswith("filter.") and problem.path.endswith(".type"), str(problem)
        assert "No module named 'ispmailgate_filters." in problem.message, str(problem)
    missing = {p.message.split("No module named ")[1] for p in problems}
    assert "'ispmailgate_filters.dummy'" not in missing
    assert config.rules[0].chain[0].name == "dummy"


@pytest.mark.parametrize("name", sorted(path.name for path in EXAMPLES.glob("*.toml")))
def test_every_example_rule_file_passes_check_config_only_on_a_machine_with_nothing_set_up(name):
    """What an administrator's CI runs before a rule file reaches the gateway: no clamd, no
    key ring, no spool, no next hop is needed for it."""
    run = run_gate(["check", "--config-only", "-c", str(EXAMPLES / name)], b"")
    assert run.code == 0, run.stdout.decode()
    assert "nothing on this machine was checked" in run.stdout.decode().splitlines()[-1]


def test_example_rules_route_as_their_comments_say():
    from ispmailgate_core import routing, rules

    config = rules.build_config(
        tomllib.loads((EXAMPLES / "ispmailgate.toml").read_text()), "example", problems=[])
    cases = {("x@example.com", "postmaster@example.com"): "recipients[0]",
             ("gw@partner.example", "alice@example.com"): "recipients[1]",
             ("alice@example.com", "bob@partner.example"): "recipients[2]",
             ("alice@example.com", "carol@elsewhere.example"): "recipients[3]",
             ("alice@example.com", "bob@example.com"): "default",
             ("carol@elsewhere.example", "bob@example.com"): "default"}
    for (sender, recipient), rule in cases.items():
        assert routing.route(config, sender, recipient).rule == rule, (sender, recipient)


# -- sendmail: the .mc files build into .cf files with the mailer in them ------------------------------
#
# test_e2e_sendmail.py runs sendmail.mc for real, in a private sendmail with ispmailgate as its
# mailer; sendmail2.mc is only built here (a test SMTP server plays the second instance there).

@pytest.fixture
def sendmail_cf(tmp_path):
    """A copy of sendmail's m4 files with examples/sendmail/ispmailgate.m4 among its mailers."""
    assert (SENDMAIL_CF / "m4" / "cf.m4").exists(), "sendmail's m4 files are missing (package sendmail-cf)"
    assert shutil.which("m4"), "m4 is missing (package m4)"
    copy = tmp_path / "cf"
    shutil.copytree(SENDMAIL_CF, copy)
    shutil.copy(EXAMPLES / "sendmail" / "ispmailgate.m4", copy / "mailer" / "ispmailgate.m4")

    def build(mc: str) -> str:
        process = subprocess.run(["m4", str(copy / "m4" / "cf.m4"), str(EXAMPLES / "sendmail" / mc)],
                                 capture_output=True, text=True, timeout=60, check=False)
        assert (process.returncode, process.stderr) == (0, ""), process.stderr
        return process.stdout
    return build


def test_first_sendmail_instance_gets_the_ispmailgate_mailer(sendmail_cf):
    cf = sendmail_cf("sendmail.mc")
    mailer = cf[cf.index("\nMispmailgate,"):].split("\n\n")[0]
    assert "P=/usr/local/bin/ispmailgate, F=DFMmnu8, S=EnvFromSMTP/HdrFromSMTP, R=EnvToSMTP/HdrFromSMTP" in mailer
    assert "U=ispmailgate:ispmailgate" in mailer
    assert mailer.rstrip().endswith("A=ispmailgate -f $g -- $u")
    assert "Kmailertable hash -o /etc/mail/mailertable" in cf
    assert "\nMsmtp," in cf and "\nMlocal," in cf


def test_second_sendmail_instance_listens_on_26_and_cannot_loop(sendmail_cf):
    cf = sendmail_cf("sendmail2.mc")
    assert "O DaemonPortOptions=Port=26, Addr=127.0.0.1, Name=MTA2" in cf
    assert "Port=587" not in cf and "O DaemonPortOptions=Name=MTA" not in cf
    assert "O QueueDirectory=/var/spool/mqueue2" in cf
    assert "Kmailertable hash -o /etc/mail2/mailertable" in cf
    assert "ispmailgate" not in cf.split("#####  ispmailgate example")[1].split("\n", 1)[1]


# -- procmail and maildrop, run for real as an unprivileged user -----------------------------------------

class Mailbox:
    """A temp dir an unprivileged user owns: the recipe, a Maildir, the gate's rule file."""

    def __init__(self, gate: Path) -> None:
        self.gate = gate
        self.user = pwd.getpwnam("nobody")
        self.home = Path(tempfile.mkdtemp(prefix="igmda-", dir="/tmp"))
        self.home.chmod(0o755)
        (self.home / "spool").mkdir()
        self.maildir = self.home / "Maildir"
        self.rules = self.home / "rules.toml"

    def write(self, name: str, text: str, mode: int = 0o644) -> Path:
        path = self.home / name
        path.write_text(text)
        path.chmod(mode)
        return path

    def rule_file(self, text: str) -> None:
        self.write("rules.toml", f'tmp_dir = "{self.home}/spool"\nunqualified_domain = "e2e.test"\n' + text)

    def run(self, argv: list[str], message: bytes) -> subprocess.CompletedProcess:
        for path in [self.home, *self.home.rglob("*")]:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)
        environment = {"PATH": "/usr/bin:/bin", "HOME": str(self.home)}
        return subprocess.run(["setpriv", f"--reuid={self.user.pw_uid}", f"--regid={self.user.pw_gid}",
                               "--clear-groups", *argv], input=message, capture_output=True,
                              env=environment, cwd=self.home, timeout=120, check=False)

    def delivered(self) -> list[bytes]:
        new = self.maildir / "new"
        return [path.read_bytes() for path in sorted(new.glob("*"))] if new.is_dir() else []

    def remove(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)


STAMP = 'default_filter = ["s"]\n[filter.s]\ntype = "gate_test_filters:Stamp"\nvalue = "mda"\n'


@pytest.fixture(scope="module")
def unprivileged_gate() -> Path:
    from support.postfix_instance import e2e_gate

    return e2e_gate()


@pytest.fixture
def mailbox(unprivileged_gate):
    box = Mailbox(unprivileged_gate)
    yield box
    box.remove()


def example(mailbox: Mailbox, path: str) -> str:
    """The recipe as shipped, with this gate and rule file (procmail clears the environment)."""
    text = (EXAMPLES / path).read_text()
    assert text.count("/usr/local/bin/ispmailgate") == 1
    return text.replace("/usr/local/bin/ispmailgate", f"{mailbox.gate} --config {mailbox.rules}")


def test_procmail_recipe_filters_the_message(mailbox):
    assert shutil.which("procmail"), "procmail is missing (package procmail)"
    rc = mailbox.write("procmailrc", example(mailbox, "procmail/procmailrc") + f"\n:0\n{mailbox.maildir}/\n")
    mailbox.rule_file(STAMP)
    run = mailbox.run(["procmail", str(rc)], MBOX_MESSAGE)
    assert run.returncode == 0, run.stderr      # so the gate found the sender in the From_ line
    [delivered] = mailbox.delivered()
    rest = MBOX_MESSAGE.split(b"\n", 1)[1]
    assert delivered.startswith(b"X-Stamp: mda\n" + rest)        # procmail drops From_ in a Maildir
    assert list((mailbox.home / "spool").iterdir()) == []        # no work directory left behind


def test_procmail_recipe_defers_when_the_gate_does(mailbox):
    rc = mailbox.write("procmailrc", example(mailbox, "procmail/procmailrc") + f"\n:0\n{mailbox.maildir}/\n")
    mailbox.write("rules.toml", "default_filter = [\n")
    run = mailbox.run(["procmail", str(rc)], MBOX_MESSAGE)
    assert run.returncode == 75, run.stderr
    assert b"Program failure (75)" in run.stderr
    assert mailbox.delivered() == []


def test_maildrop_recipe_filters_the_message_with_the_envelope_sender(mailbox):
    assert shutil.which("maildrop"), "maildrop is missing (package maildrop)"
    filter_file = mailbox.write("mailfilter", example(mailbox, "maildrop/mailfilter")
                                + f'\nto "{mailbox.maildir}/"\n', mode=0o600)
    rules = STAMP + ('[[recipients]]\nsender = "^odd\\\\$\\\\(id\\\\)@x\\\\.example$"\n'
                     'recipient = "^nobody@e2e\\\\.test$"\nfilters = ["s", "t"]\n'
                     '[filter.t]\ntype = "gate_test_filters:Stamp"\nheader = "X-Rule"\nvalue = "sender matched"\n')
    mailbox.rule_file(rules)
    assert subprocess.run(["maildirmake", str(mailbox.maildir)], check=False).returncode == 0
    message = MBOX_MESSAGE.split(b"\n", 1)[1]                      # maildrop takes no From_ line
    run = mailbox.run(["maildrop", "-f", "odd$(id)@x.example", str(filter_file)], message)
    assert run.returncode == 0, run.stderr
    [delivered] = mailbox.delivered()
    assert delivered == b"X-Rule: sender matched\nX-Stamp: mda\n" + message


def test_maildrop_recipe_defers_when_the_gate_does(mailbox):
    filter_file = mailbox.write("mailfilter", example(mailbox, "maildrop/mailfilter")
                                + f'\nto "{mailbox.maildir}/"\n', mode=0o600)
    mailbox.write("rules.toml", "default_filter = [\n")
    assert subprocess.run(["maildirmake", str(mailbox.maildir)], check=False).returncode == 0
    run = mailbox.run(["maildrop", "-f", "a@x.example", str(filter_file)], b"Subject: x\n\nbody\n")
    assert run.returncode == 75, run.stderr
    assert mailbox.delivered() == []
