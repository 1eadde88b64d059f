"""A private Postfix instance on loopback with ispmailgate as its content filter.

Set up as Postfix's FILTER_README describes a pipe(8) content filter, in a temporary
directory of its own (config, queue, data, Maildirs, the gate's spool and log):

    test --SMTP--> smtpd 127.0.0.1:submit      content_filter=ispmailgate:
                     --> pipe(8) as nobody: ispmailgate -f ${sender} -- ${recipient}
                     --SMTP--> smtpd 127.0.0.1:reinject   content_filter= (empty),
                               receive_override_options=...,no_address_mappings
                     --> virtual(8) --> Maildir the test reads
    test --SMTP--> smtpd 127.0.0.1:originate   content_filter=ispmailgate-out:
                     --> pipe(8): ispmailgate --originating ... (the users' mail: DKIM-signed)

The services above are examples/postfix/master.cf itself, with the ports, the
pipe user and the gate's path replaced: the tests prove the example works.

With ``sendmail_command = ["/usr/sbin/sendmail", "-oi"]`` in the rule file the gate
re-injects through sendmail(1), postdrop(1) and pickup(8) instead.  For that the instance
runs in a mount namespace of its own in which its config directory is bind-mounted on
/etc/postfix: there it is the default instance, which an unprivileged sendmail may use
(set-gid postdrop accepts any other config directory only if the host's
/etc/postfix/main.cf lists it, and the tests must not touch the host's mail set-up).
Nothing leaves the machine: ``default_transport`` is an error.

Postfix needs root to start, and pipe(8) refuses to run commands as root, so the gate
runs from a venv of Debian's /usr/bin/python3 outside the checkout (``e2e_gate``, made by
tools/test's install step: see prepared.py), which the unprivileged user can reach.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from conftest import HERE, PROJECT, free_port
from support.prepared import e2e_gate  # noqa: F401  (the end-to-end tests' gate, imported from here)

SYSTEM_PYTHON = "/usr/bin/python3"
DOMAIN = "e2e.test"
MAILBOXES = ("alice", "bob", "carol", "sender", "postmaster")
PIPE_USER = "nobody"


# Runs in the new mount namespace: this instance's config becomes /etc/postfix there, and
# master (which daemonizes) keeps the namespace alive for pipe(8) and its children.
START_IN_NAMESPACE = """
import os, subprocess, sys
subprocess.run(["mount", "--bind", sys.argv[1], "/etc/postfix"], check=True)
os.execvp("postfix", ["postfix", "start"])
"""


# -- shared by the end-to-end tests (this one and sendmail_instance.py) -------------------------

def write_rules(path: Path, spool: Path, mail_host: str, text: str = "") -> Path:
    """The rule file an e2e gate reads: its spool and log under ``spool``, then ``text``."""
    head = (f'tmp_dir = "{spool}"\nlog_file = "{spool}/gate.log"\nmail_host = "{mail_host}"\n'
            f'postmaster = "postmaster@{DOMAIN}"\n')
    path.write_text(head + textwrap.dedent(text))
    path.chmod(0o644)
    return path


def smtp_transaction(client: smtplib.SMTP, sender: str, recipients: list[str], data: bytes,
                     mail_options=()) -> bytes:
    """EHLO, MAIL, RCPT for each, DATA, every reply 250; the text of the last one."""
    client.ehlo("client.e2e.test")
    code, text = client.mail(sender, list(mail_options))
    assert code == 250, (code, text)
    for recipient in recipients:
        code, text = client.rcpt(recipient)
        assert code == 250, (recipient, code, text)
    code, text = client.data(data)
    assert code == 250, (code, text)
    return text


def run_failing_test(tmp_path: Path, source: str) -> str:
    """Run ``source`` (a test that fails on purpose) in another pytest; the BASE= it printed."""
    (tmp_path / "test_failing.py").write_text(source)
    process = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         str(tmp_path / "test_failing.py")],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "PYTHONPATH": str(HERE)}, cwd=tmp_path)
    assert process.returncode == 1, process.stdout + process.stderr
    assert "AssertionError: on purpose" in process.stdout
    [line] = [line for line in process.stdout.splitlines() if line.startswith("BASE=")]
    return line.removeprefix("BASE=")


# -- the instance -------------------------------------------------------------------------------

class PostfixInstance:
    """One private Postfix: start(), rules(), submit(), wait_for_mail(), queue(), stop()."""

    def __init__(self, gate: Path) -> None:
        self.gate = gate
        self.base = Path(tempfile.mkdtemp(prefix="ipf-", dir="/tmp"))    # short socket paths
        self.etc = self.base / "etc"
        self.spool = self.base / "gate"
        self.rules_file = self.spool / "rules.toml"
        self.maillog = self.base / "maillog"
        self.ports = {name: free_port() for name in ("submit", "originate", "reinject")}

    # life cycle

    def start(self) -> None:
        assert os.geteuid() == 0, "a private Postfix instance needs root to start"
        assert shutil.which("postfix"), "Postfix is not installed (Debian package postfix)"
        self._lay_out()
        self.rules()
        process = subprocess.run(["unshare", "--mount", "--propagation", "private", "--",
                                  SYSTEM_PYTHON, "-c", START_IN_NAMESPACE, str(self.etc)],
                                 capture_output=True, text=True, timeout=120, check=False)
        assert process.returncode == 0, f"postfix start failed: {process.stderr}\n{self.log_tail()}"
        for name in ("submit", "originate", "reinject"):
            self._wait_for_greeting(self.ports[name])

    def stop(self) -> None:
        """Stop master and its children, whatever state the tests left, then remove it all."""
        try:
            subprocess.run(["postfix", "-c", str(self.etc), "stop"], capture_output=True,
                           timeout=60, check=False)
            pid = self._master_pid()
            deadline = time.monotonic() + 30
            while pid and _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def reset(self) -> None:
        """Between tests: empty queue and Maildirs, default rules, empty gate log."""
        self.postsuper("-d", "ALL")
        for user in MAILBOXES:
            for sub in ("new", "cur", "tmp"):
                for path in (self.base / "mail" / DOMAIN / user / sub).glob("*"):
                    path.unlink()
        (self.spool / "gate.log").unlink(missing_ok=True)
        self.rules()

    # what the tests do

    def rules(self, text: str = "") -> Path:
        """Write the rule file every ispmailgate run reads (the run reads it afresh)."""
        return write_rules(self.rules_file, self.spool, f"127.0.0.1:{self.ports['reinject']}",
                           'loop_suffix = ""\n' + textwrap.dedent(text))

    def broken_rules(self, text: str) -> None:
        self.rules_file.write_text(text)
        self.rules_file.chmod(0o644)

    def submit(self, sender: str, recipients: list[str], data: bytes, port: str = "submit") -> str:
        """Hand a message to Postfix by SMTP (``port`` "originate": the users' service that
        passes --originating); returns its queue id."""
        with smtplib.SMTP("127.0.0.1", self.ports[port], timeout=60) as client:
            text = smtp_transaction(client, sender, recipients, data)
        return text.decode().rsplit(" ", 1)[-1]

    def mailbox(self, user: str) -> list[bytes]:
        new = self.base / "mail" / DOMAIN / user / "new"
        return [path.read_bytes() for path in sorted(new.glob("*"))] if new.is_dir() else []

    def wait_for_mail(self, user: str, count: int = 1, timeout: float = 60) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.mailbox(user)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        messages = self.mailbox(user)
        assert len(messages) >= count, (f"{user}@{DOMAIN} got {len(messages)} of {count} messages "
                                        f"in {timeout} s\n{self.log_tail()}")
        return messages

    def queue(self) -> list[dict]:
        """Postfix's queue, one dict per message (``postqueue -j``)."""
        process = subprocess.run(["postqueue", "-c", str(self.etc), "-j"], capture_output=True,
                                 text=True, timeout=60, check=True)
        return [json.loads(line) for line in process.stdout.splitlines() if line.strip()]

    def wait_for_queue(self, predicate, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while not predicate(queue := self.queue()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert predicate(queue), f"queue never got there: {queue}\n{self.log_tail()}"
        return queue

    def flush(self) -> None:
        subprocess.run(["postqueue", "-c", str(self.etc), "-f"], timeout=60, check=True)

    def postsuper(self, *args: str) -> None:
        subprocess.run(["postsuper", "-c", str(self.etc), *args], capture_output=True,
                       timeout=60, check=True)

    def gate_log(self) -> str:
        path = self.spool / "gate.log"
        return path.read_text() if path.exists() else ""

    def wait_for_gate_log(self, text: str, timeout: float = 60) -> str:
        """The gate's log once ``text`` is in it (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.gate_log()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return log

    def log_tail(self, lines: int = 40) -> str:
        text = self.maillog.read_text(errors="replace") if self.maillog.exists() else "(no maillog)"
        return "maillog:\n" + "\n".join(text.splitlines()[-lines:]) + "\ngate log:\n" + self.gate_log()

    # set-up

    def _lay_out(self) -> None:
        self.base.chmod(0o755)          # mkdtemp's 0700 would keep the postfix user out
        for name in ("etc", "queue", "data", "mail", "gate"):
            (self.base / name).mkdir()
        shutil.chown(self.base / "data", "postfix")
        for name in ("mail", "gate"):
            shutil.chown(self.base / name, PIPE_USER)
        shutil.copytree("/etc/postfix", self.etc, dirs_exist_ok=True, symlinks=True,
                        ignore=lambda directory, names: {"main.cf", "master.cf"} & set(names))
        (self.etc / "main.cf").write_text(self._main_cf())
        (self.etc / "master.cf").write_text(self._master_cf())
        (self.etc / "mailboxes").write_text(
            "".join(f"{user}@{DOMAIN} {DOMAIN}/{user}/\n" for user in MAILBOXES))

    def _main_cf(self) -> str:
        uid = _uid(PIPE_USER)
        return textwrap.dedent(f"""\
            compatibility_level = 3.6
            queue_directory = {self.base}/queue
            data_directory = {self.base}/data
            maillog_file = {self.maillog}
            maillog_file_prefixes = {self.base}
            myhostname = mx.{DOMAIN}
            mydomain = {DOMAIN}
            myorigin = {DOMAIN}
            mydestination =
            inet_interfaces = 127.0.0.1
            inet_protocols = ipv4
            mynetworks = 127.0.0.0/8
            smtpd_relay_restrictions = permit_mynetworks, reject
            relayhost =
            default_transport = error:5.7.1 this test instance relays nowhere
            alias_maps =
            alias_database =
            local_header_rewrite_clients =
            biff = no
            virtual_mailbox_domains = {DOMAIN}
            virtual_mailbox_base = {self.base}/mail
            virtual_mailbox_maps = texthash:{self.etc}/mailboxes
            virtual_uid_maps = static:{uid}
            virtual_gid_maps = static:{uid}
            virtual_minimum_uid = 1
            """)

    def _master_cf(self) -> str:
        return self._example_services() + textwrap.dedent("""\
            pickup    unix  n - n 60 1 pickup
            cleanup   unix  n - n -  0 cleanup
            qmgr      unix  n - n 300 1 qmgr
            rewrite   unix  - - n -  - trivial-rewrite
            bounce    unix  - - n -  0 bounce
            defer     unix  - - n -  0 bounce
            trace     unix  - - n -  0 bounce
            verify    unix  - - n -  1 verify
            flush     unix  n - n 1000? 0 flush
            proxymap  unix  - - n -  - proxymap
            showq     unix  n - n -  - showq
            error     unix  - - n -  - error
            retry     unix  - - n -  - error
            discard   unix  - - n -  - discard
            virtual   unix  - n n -  - virtual
            anvil     unix  - - n -  1 anvil
            scache    unix  - - n -  1 scache
            postlog   unix-dgram n - n - 1 postlogd
            """)

    def _example_services(self) -> str:
        """examples/postfix/master.cf as shipped, changed only where a test instance must be."""
        text = (PROJECT / "examples" / "postfix" / "master.cf").read_text()
        for shipped, here in (
                ("smtp      inet  n       -       y       -       -       smtpd",     # loopback, no chroot
                 f"127.0.0.1:{self.ports['submit']} inet  n - n - - smtpd"),
                ("submission inet n       -       y       -       -       smtpd",
                 f"127.0.0.1:{self.ports['originate']} inet  n - n - - smtpd"),
                ("user=ispmailgate ", f"user={PIPE_USER} "),
                ("argv=/usr/local/bin/ispmailgate ", f"argv={self.gate} --config {self.rules_file} "),
                ("127.0.0.1:10026 ", f"127.0.0.1:{self.ports['reinject']} ")):
            expected = 2 if shipped.startswith(("user=", "argv=")) else 1     # the two pipe transports
            assert text.count(shipped) == expected, f"examples/postfix/master.cf no longer has {shipped!r}"
            text = text.replace(shipped, here)
        return text

    def _wait_for_greeting(self, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as probe:
                    if probe.recv(512).startswith(b"220"):
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"smtpd on port {port} never greeted\n{self.log_tail()}"
            time.sleep(0.1)

    def _master_pid(self) -> int | None:
        try:
            return int((self.base / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


def _uid(user: str) -> int:
    import pwd
    return pwd.getpwnam(user).pw_uid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


if __name__ == "__main__":      # by hand: python tests/postfix_instance.py, then ^C
    instance = PostfixInstance(e2e_gate())
    instance.start()
    print(f"Postfix in {instance.base}, ports {instance.ports}", file=sys.stderr)
    try:
        signal.pause()
    finally:
        instance.stop()
