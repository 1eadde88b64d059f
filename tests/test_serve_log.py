"""serve started as root with the man page's own log set-up: log_file in a directory the
mail user owns (``install -d -o ispmailgate -m 0750 /var/log/ispmailgate``).  The master
refused to open it as root, so serve did not start and every client fell back (attack
review finding 16); it now opens it as the mail user, as a one-shot run does."""

from __future__ import annotations

import grp
import os
import pwd

from conftest import CORPUS
from support.serving import Server
from support.serving import python, sink  # noqa: F401  (fixtures)

SIMPLE = (CORPUS / "plain.eml").read_bytes()


def test_serve_as_root_logs_into_a_directory_of_the_mail_user(python, sink):
    server = Server(python, f'mail_host = "{sink.address}"\nloop_suffix = ""\n[serve]\nworkers = 1\n')
    try:
        logs = server.folder / "log"
        logs.mkdir(mode=0o750)
        user, group = pwd.getpwnam(server.user).pw_uid, grp.getgrnam(server.group).gr_gid
        os.chown(logs, user, group)
        log_file = logs / "ispmailgate.log"
        server.config.write_text(server.config.read_text().replace(f'log_file = "{server.gate_log}"',
                                                                   f'log_file = "{log_file}"'))
        server.start()
        run = server.client(["-f", "a@b.example", "--", "c@d.example"], SIMPLE)
        assert run.code == 0, run.stderr
        info = os.stat(log_file)
        assert (info.st_uid, info.st_mode & 0o777) == (user, 0o600)
        text = log_file.read_text()
        assert "serving on" in text and "to=<c@d.example>" in text
    finally:
        server.stop()
