"""A private sendmail with ispmailgate as its ``prog`` mailer, run from Debian's own binary.

Debian's sendmail-bin cannot be installed beside Postfix (both are the
mail-transport-agent), so tools/test's install step fetches the package from the Debian
archive with ``apt-get download`` (the version the installed sendmail-cf belongs to) and
unpacks it under the temp dir (prepared.py; ``sendmail_binary`` finds it); of its libraries
only libwrap0 is not already on the machine (tools/debian-packages). Nothing of it is
installed, and the host's mail set-up is not touched.

The instance is examples/sendmail/sendmail.mc, built with sendmail's m4 files and
examples/sendmail/ispmailgate.m4, with test paths in place of /etc/mail and
/var/spool/mqueue and a few lines for a temporary directory (see ``_mc``). It runs no
daemon: each command is one sendmail process in the foreground (``-bs -odi`` speaks SMTP
on stdin and stdout and delivers before it exits, ``-q`` runs the queue, ``-bp`` lists it),
so when a command returns the gate has run and is gone:

    test --SMTP over a socket pair--> sendmail -bs
        --> mailertable: e2e.test  ispmailgate:localhost
        --> ispmailgate -f $g -- $u   (as nobody, rule file from the environment)
        --SMTP--> mail_host (the test's sink, standing in for the second instance)

Each command runs in mount and UTS namespaces of its own, in which the instance's hosts
and resolv.conf files are bind-mounted on /etc's and the host name is mx.e2e.test:
sendmail sleeps a minute at start when it cannot find a fully qualified name for the
host, and must not ask a real name server about test domains.  The hosts file gives
e2e.test an address too: sendmail refuses a sender whose domain does not resolve.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
import textwrap
from pathlib import Path

from conftest import PROJECT
from support.postfix_instance import smtp_transaction, write_rules
from support.prepared import sendmail_binary  # noqa: F401  (imported from here by the tests)

SYSTEM_PYTHON = "/usr/bin/python3"
SENDMAIL_CF = Path("/usr/share/sendmail/cf")         # Debian package sendmail-cf
HOST_NAME = "mx.e2e.test"
DOMAIN = "e2e.test"
MAILER_USER = "nobody:nogroup"

# Runs in the new namespaces, then becomes sendmail: argv is ETC HOST_NAME SENDMAIL ARGS...
IN_NAMESPACES = """
import os, socket, subprocess, sys
etc, host_name, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
for name in ("hosts", "resolv.conf"):
    subprocess.run(["mount", "--bind", f"{etc}/{name}", f"/etc/{name}"], check=True)
socket.sethostname(host_name)
os.execv(argv[0], argv)
"""


def _run(argv: list[str], cwd: Path | None = None, stdin: bytes = b"") -> str:
    process = subprocess.run(argv, input=stdin, capture_output=True, cwd=cwd, timeout=300, check=False)
    assert process.returncode == 0, f"{argv} failed:\n{process.stdout!r}\n{process.stderr!r}"
    return process.stdout.decode(errors="replace")


# -- the instance -------------------------------------------------------------------------------

class _PipeSMTP(smtplib.SMTP):
    """smtplib on one end of a socket pair whose other end is sendmail -bs's stdin and stdout."""

    def __init__(self, pipe: socket.socket) -> None:
        self._pipe = pipe
        super().__init__()

    def _get_socket(self, host, port, timeout):
        return self._pipe


class SendmailInstance:
    """One private sendmail: start(), rules(), submit(), queue(), mailq(), run_queue(), stop()."""

    def __init__(self, sendmail: Path, gate: Path) -> None:
        self.sendmail = sendmail
        self.gate = gate
        self.base = Path(tempfile.mkdtemp(prefix="ism-", dir="/tmp"))
        self.etc = self.base / "etc"
        self.queue_dir = self.base / "queue"
        self.spool = self.base / "gate"
        self.rules_file = self.spool / "rules.toml"
        self.cf = self.etc / "sendmail.cf"

    # life cycle

    def start(self) -> None:
        assert os.geteuid() == 0, "a private sendmail needs root"
        assert shutil.which("m4"), "m4 is missing (package m4)"
        assert (SENDMAIL_CF / "m4" / "cf.m4").exists(), "sendmail's m4 files are missing (package sendmail-cf)"
        self._lay_out()
        self.cf.write_text(self._build_cf())
        for table in ("mailertable", "virtusertable"):
            text = (self.etc / table).read_bytes()
            _run([str(self.sendmail.parent / "makemap"), "-C", str(self.cf), "hash",
                  str(self.etc / table)], stdin=text)
        self.command("-bi")                  # the aliases database

    def stop(self) -> None:
        """Nothing runs between commands: removing the directory is the whole tear-down."""
        shutil.rmtree(self.base, ignore_errors=True)

    # what the tests do

    def rules(self, mail_host: str, text: str = "") -> Path:
        """The rule file every ispmailgate run reads (sendmail passes its path in the environment)."""
        return write_rules(self.rules_file, self.spool, mail_host, text)

    def command(self, *args: str) -> str:
        """Run ``sendmail -C cf ARGS`` to its end; returns what it printed."""
        process = subprocess.run(self._argv(*args), capture_output=True, timeout=120, check=False)
        assert process.returncode == 0, f"sendmail {args} exited {process.returncode}: {process.stderr!r}"
        return process.stdout.decode(errors="replace")

    def submit(self, sender: str, recipients: list[str], data: bytes, mail_options=()) -> str:
        """Hand a message to ``sendmail -bs -odi`` by SMTP; returns its queue id once delivery
        was tried (interactive delivery: sendmail exits only after the mailer has run)."""
        mine, theirs = socket.socketpair()
        process = subprocess.Popen(self._argv("-bs", "-odi"), stdin=theirs, stdout=theirs,
                                   stderr=subprocess.PIPE)
        theirs.close()
        try:
            with _PipeSMTP(mine) as client:
                client.connect("localhost")
                text = smtp_transaction(client, sender, recipients, data, mail_options)
        finally:
            mine.close()
            assert process.wait(timeout=120) == 0, process.stderr.read()
        return text.decode().split()[1]          # "2.0.0 QUEUEID Message accepted for delivery"

    def queue(self) -> dict[str, str]:
        """The queue as sendmail keeps it: queue id -> the qf file's text."""
        return {path.name[2:]: path.read_text(errors="replace") for path in sorted(self.queue_dir.glob("qf*"))}

    def mailq(self) -> str:
        return self.command("-bp")

    def run_queue(self) -> str:
        """One queue run in the foreground; returns its transcript."""
        return self.command("-q", "-v")

    def gate_log(self) -> str:
        path = self.spool / "gate.log"
        return path.read_text() if path.exists() else ""

    # set-up

    def _argv(self, *args: str) -> list[str]:
        return ["unshare", "--mount", "--uts", "--propagation", "private", "--",
                SYSTEM_PYTHON, "-c", IN_NAMESPACES, str(self.etc), HOST_NAME,
                str(self.sendmail), "-C", str(self.cf), *args]

    def _lay_out(self) -> None:
        self.base.chmod(0o755)               # the mailer user must reach the gate's spool
        for name in ("etc", "queue", "gate", "cf"):
            (self.base / name).mkdir()
        self.queue_dir.chmod(0o700)
        shutil.chown(self.spool, MAILER_USER.split(":")[0])
        files = {"hosts": f"127.0.0.1\t{HOST_NAME} localhost\n192.0.2.25\t{DOMAIN}\n",
                 "resolv.conf": "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
                 "service.switch": "hosts files\naliases files\n",
                 "mailertable": f"{DOMAIN}\tispmailgate:localhost\n",
                 "virtusertable": "", "local-host-names": "", "aliases": ""}
        for name, text in files.items():
            (self.etc / name).write_text(text)

    def _build_cf(self) -> str:
        m4_files = self.base / "cf"
        shutil.copytree(SENDMAIL_CF, m4_files, dirs_exist_ok=True)
        shutil.copy(PROJECT / "examples" / "sendmail" / "ispmailgate.m4", m4_files / "mailer" / "ispmailgate.m4")
        (self.etc / "sendmail.mc").write_text(self._mc())
        return _run(["m4", str(m4_files / "m4" / "cf.m4"), str(self.etc / "sendmail.mc")])

    def _mc(self) -> str:
        """examples/sendmail/sendmail.mc as shipped, changed only where a test instance must be."""
        comments, config = (PROJECT / "examples" / "sendmail" / "sendmail.mc").read_text().split("divert(0)dnl\n")
        for shipped, here in (
                ("/etc/mail/local-host-names", f"{self.etc}/local-host-names"),
                ("/etc/mail/aliases", f"{self.etc}/aliases"),
                ("/var/spool/mqueue", str(self.queue_dir)),
                ("/usr/local/bin/ispmailgate", str(self.gate)),
                ("ispmailgate:ispmailgate", MAILER_USER),
                ("hash -o /etc/mail/mailertable", f"hash -o {self.etc}/mailertable"),
                ("hash -o /etc/mail/virtusertable", f"hash -o {self.etc}/virtusertable"),
                ("OSTYPE(`linux')dnl\n", "OSTYPE(`linux')dnl\n" + self._test_lines())):
            assert config.count(shipped) == 1, f"examples/sendmail/sendmail.mc no longer has {shipped!r}"
            config = config.replace(shipped, here)
        return comments + "divert(0)dnl\n" + config

    def _test_lines(self) -> str:
        """A temp dir under sticky /tmp, no name server, the rule file through the environment."""
        return textwrap.dedent(f"""\
            define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl
            define(`confSERVICE_SWITCH_FILE', `{self.etc}/service.switch')dnl
            define(`confHOSTS_FILE', `{self.etc}/hosts')dnl
            LOCAL_CONFIG
            EISPMAILGATE_CONFIG={self.rules_file}
            divert(0)dnl
            """)
