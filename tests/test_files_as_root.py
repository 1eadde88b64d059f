"""Nothing is opened, created or written as root through a path someone else controls.

Issue 14, finding 5: ``log_file`` was opened as root before privileges dropped, so the mail
user could point it at any root file and have sender-controlled text appended; the serve
pid file was written through a predictable temporary name that followed a planted link (a
root 0600 file was overwritten).  Here the planted links, FIFOs, hard links and foreign
directories are in place, and root's files stay as they were.
"""

from __future__ import annotations

import os
import pwd
import stat
import threading
from pathlib import Path

import pytest

from conftest import run_gate, run_inline

SIMPLE = b"From: a@example.org\nTo: b@example.net\nSubject: files\n\nbody\n"
NOBODY = pwd.getpwnam("nobody").pw_uid
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


@pytest.fixture
def victim(tmp_path):
    """A file of root's, mode 0600, that nobody else may change."""
    path = tmp_path / "shadow"
    path.write_text("root's secret\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def mail_users_folder(tmp_path):
    """A folder the mail user (nobody) owns and writes: what it plants there, it controls."""
    tmp_path.chmod(0o755)
    folder = tmp_path / "nobodys"
    folder.mkdir()
    os.chown(folder, NOBODY, -1)
    return folder


# -- log_file ----------------------------------------------------------------------------------

def test_the_reviews_log_file_link_reaches_no_file_of_roots(config_file, victim, mail_users_folder):
    link = mail_users_folder / "gate.log"
    link.symlink_to(victim)
    os.lchown(link, NOBODY, -1)
    config = config_file(f'mail_user = "nobody"\nlog_file = "{link}"\n')
    config.chmod(0o644)
    run = run_gate(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 0, run.stderr
    assert victim.read_text() == "root's secret\n"


def test_as_root_a_log_file_link_is_not_followed(config_file, victim, tmp_path):
    link = tmp_path / "gate.log"
    link.symlink_to(victim)
    config = config_file(f'mail_user = "root"\nlog_file = "{link}"\n')
    run = run_gate(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 0, run.stderr
    assert victim.read_text() == "root's secret\n"


def test_as_root_a_hard_link_to_a_file_of_roots_is_refused(config_file, victim, tmp_path):
    log = tmp_path / "gate.log"
    os.link(victim, log)
    config = config_file(f'mail_user = "root"\nlog_file = "{log}"\n')
    run = run_gate(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 0, run.stderr
    assert victim.read_text() == "root's secret\n"


def test_as_root_a_log_file_in_a_folder_others_can_write_is_refused(config_file, mail_users_folder):
    log = mail_users_folder / "gate.log"
    config = config_file(f'mail_user = "root"\nlog_file = "{log}"\n')
    run = run_gate(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 0, run.stderr
    assert not log.exists()


def test_a_fifo_as_log_file_neither_blocks_nor_is_written(config_file, tmp_path):
    fifo = tmp_path / "gate.log"
    os.mkfifo(fifo)
    config = config_file(f'log_file = "{fifo}"\n')
    run = run_gate(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE, timeout=20)
    assert run.code == 0 and run.stdout == SIMPLE


def test_the_log_file_is_written_as_the_mail_user(config_file):
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(dir="/tmp", prefix="iglogs"))     # where nobody can reach it
    folder.chmod(0o755)
    os.chown(folder, NOBODY, -1)
    config = config_file(f'mail_user = "nobody"\nlog_file = "{folder / "gate.log"}"\n')
    config.chmod(0o644)
    run = run_gate(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 0, run.stderr
    log = folder / "gate.log"
    assert log.stat().st_uid == NOBODY and stat.S_IMODE(log.stat().st_mode) == 0o600
    assert "status=done" in log.read_text()
    shutil.rmtree(folder)


# -- serve: the pid file and the socket ------------------------------------------------------

def test_the_reviews_pid_file_links_reach_no_file_of_roots(tmp_path, victim):
    from ispmailgate_core.serve.boot import PidFile

    folder = tmp_path / "run"
    folder.mkdir(mode=0o755)
    path = folder / "serve.pid"
    for pid in range(os.getpid() - 5, os.getpid() + 5):     # the old temporary names
        (folder / f".serve.pid.{pid}").symlink_to(victim)
    path.symlink_to(victim)
    pid_file = PidFile(str(path))
    assert victim.read_text() == "root's secret\n"
    assert not path.is_symlink() and path.read_text() == f"{os.getpid()}\n"
    pid_file.remove()
    assert not path.exists() and victim.exists()


def test_a_pid_file_in_a_folder_others_can_write_is_refused(mail_users_folder):
    from ispmailgate_core.serve.boot import PidFile

    with pytest.raises(PermissionError, match="owned by uid"):
        PidFile(str(mail_users_folder / "serve.pid"))
    assert list(mail_users_folder.iterdir()) == []


def test_a_pid_file_that_is_a_fifo_is_not_read(tmp_path):
    from ispmailgate_core.serve.boot import PidFile

    path = tmp_path / "serve.pid"
    os.mkfifo(path)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (PidFile(str(path)), done.set()), daemon=True)
    thread.start()
    thread.join(10)
    assert done.is_set() and path.read_text() == f"{os.getpid()}\n"


def test_the_socket_is_bound_with_its_mode_where_nobody_else_can_swap_it(tmp_path, mail_users_folder):
    from ispmailgate_core.serve.listener import open_listeners
    from ispmailgate_core.serve.section import ServeSettings

    settings = ServeSettings().with_overrides(socket=str(tmp_path / "s.sock"), socket_mode=0o640,
                                              lmtp=f"unix:{tmp_path / 'l.sock'}")
    listeners = open_listeners(settings, None)
    try:
        assert [listener.kind for listener in listeners] == ["client", "lmtp"]
        for name in ("s.sock", "l.sock"):
            assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o640
    finally:
        for listener in listeners:
            listener.close()
    assert not (tmp_path / "s.sock").exists() and not (tmp_path / "l.sock").exists()
    for key, value in (("socket", str(mail_users_folder / "s.sock")), ("lmtp", f"unix:{mail_users_folder / 'l.sock'}")):
        with pytest.raises(PermissionError, match="owned by uid"):
            open_listeners(settings.with_overrides(**{key: value}), None)


def test_as_root_no_work_directory_where_others_could_swap_it(config_file, mail_users_folder):
    config = config_file(f'mail_user = "root"\ntmp_dir = "{mail_users_folder}"\n'
                         'default_filter = ["gate_test_filters:NeedsWorkdir"]\n')
    run = run_inline(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 75 and "cannot create a work directory" in run.first_line
    assert "owned by uid" in run.first_line and list(mail_users_folder.iterdir()) == []


# -- keep/ and the quarantine ------------------------------------------------------------------

def test_keep_that_is_a_link_is_not_followed(config_file, tmp_path, victim, parser_gives_up):
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (spool / "keep").symlink_to(elsewhere)
    config = config_file(f'tmp_dir = "{spool}"\ndefault_filter = ["gate_test_filters:StampAny"]\n')
    run = run_inline(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 0 and run.stdout == b"X-Stamp: yes\n" + SIMPLE      # delivered all the same
    assert list(elsewhere.iterdir()) == []
    assert "cannot keep a backup" in (tmp_path / "gate.log").read_text()


@pytest.mark.parametrize("planted", ["link", "someone else's folder", "a folder others can write"])
def test_the_quarantine_is_a_folder_of_our_own(config_file, tmp_path, infected_scanner, victim, planted):
    quarantine = tmp_path / "quarantine"
    if planted == "link":
        target = tmp_path / "target"
        target.mkdir(mode=0o700)
        quarantine.symlink_to(target)
    else:
        quarantine.mkdir(mode=0o700)
        if planted == "someone else's folder":
            os.chown(quarantine, NOBODY, -1)
        else:
            quarantine.chmod(0o777)
    config = config_file(f'[filter.av]\ntype = "virscan"\nscanner = "command"\n'
                         f'command = ["{infected_scanner}", "{{paths}}"]\non_infected = "discard"\n'
                         f'quarantine_dir = "{quarantine}"\nscanner_unpacks = []\n'
                         '[[recipients]]\nfilters = ["av"]\n')
    run = run_inline(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 75 and "cannot quarantine" in run.first_line      # the MTA keeps it
    assert list(quarantine.iterdir()) == []


def test_the_quarantine_works_in_a_folder_of_our_own(config_file, tmp_path, infected_scanner):
    quarantine = tmp_path / "q" / "quarantine"
    config = config_file(f'[filter.av]\ntype = "virscan"\nscanner = "command"\n'
                         f'command = ["{infected_scanner}", "{{paths}}"]\non_infected = "discard"\n'
                         f'quarantine_dir = "{quarantine}"\nscanner_unpacks = []\n'
                         '[[recipients]]\nfilters = ["av"]\n')
    run = run_inline(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 0, run.stderr
    kept = sorted(path.suffix for path in quarantine.iterdir())
    assert kept == [".eml", ".json"] and stat.S_IMODE(quarantine.stat().st_mode) == 0o700
