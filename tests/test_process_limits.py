"""The process around a message: privileges, the rule file's permissions, time and disk."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import CORPUS, GATE, PLUGINS, run_gate, run_inline

SIMPLE = (CORPUS / "plain.eml").read_bytes()
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


@pytest.fixture
def shared_dir():
    """A directory every user may write (the tests' own tmp_path is root's, 0700)."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="igshared"))
    path.chmod(0o777)
    yield path
    import shutil
    shutil.rmtree(path, ignore_errors=True)


@root_only
def test_started_as_root_it_drops_to_mail_user_before_the_message(config_file, shared_dir):
    record = shared_dir / "ids"
    config = config_file(f'mail_user = "nobody"\nmail_group = "nogroup"\n'
                         f'default_filter = ["gate_test_filters:WhoAmI"]\n'
                         f'[filter.w]\ntype = "gate_test_filters:WhoAmI"\npath = "{record}"\n'
                         f'[[recipients]]\nfilters = ["w"]\n')
    config.chmod(0o644)
    run = run_gate(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 0, run.stderr
    import grp
    import pwd
    nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    assert record.read_text() == f"{nobody} {nobody} {nogroup} {nogroup} []"
    assert run.stdout == SIMPLE


@root_only
def test_as_root_without_mail_user_it_becomes_nobody(tmp_path, shared_dir):
    record = shared_dir / "ids"
    config = tmp_path / "c.toml"
    config.write_text(f'[filter.w]\ntype = "gate_test_filters:WhoAmI"\npath = "{record}"\n'
                      '[[recipients]]\nfilters = ["w"]\n')
    run = run_gate(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 0, run.stderr
    import pwd
    nobody = pwd.getpwnam("nobody")
    assert record.read_text() == f"{nobody.pw_uid} {nobody.pw_uid} {nobody.pw_gid} {nobody.pw_gid} []"
    assert run.stdout == SIMPLE


@root_only
@pytest.mark.parametrize("user, complaint", [("", "mail_user: empty: refusing to run as root"),
                                             ("no-such-user-here", "mail_user: no such user: 'no-such-user-here'")])
def test_as_root_with_no_usable_mail_user_it_refuses(tmp_path, user, complaint):
    config = tmp_path / "c.toml"
    config.write_text(f'mail_user = "{user}"\ndefault_filter = ["dummy"]\n')
    run = run_gate(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 75
    assert run.first_line == f"4.3.5 config error: {config}: {complaint}"
    assert run.stdout == b""
    check = run_gate(["check", "-c", str(config)], b"")       # check says so as a run does
    assert check.code == 78 and f"{config}: {complaint}" in check.stdout.decode()


@root_only
def test_the_built_in_default_runs_as_nobody():
    run = run_gate([], SIMPLE)
    assert run.code == 0, run.stderr
    assert run.stdout == SIMPLE


def test_a_rule_file_writable_by_others_is_refused(config_file):
    config = config_file()
    config.chmod(0o666)
    run = run_gate(["-c", str(config), "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 75
    assert "writable by" in run.first_line and "others" in run.first_line


def test_passphrases_readable_by_others_are_warned_about(config_file, tmp_path):
    config = config_file('[filter.p]\ntype = "gate_test_filters:Secretive"\npassphrase = "sesame"\n'
                         'default_filter = ["p"]\n'.replace('default_filter = ["p"]\n', ''))
    for mode, warned in ((0o640, False), (0o644, True)):
        config.chmod(mode)
        run = run_gate(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE)
        assert run.code == 0, run.stderr
        log = (tmp_path / "gate.log").read_text()
        assert ("holds passphrases and is readable by others" in log) == warned
        assert "sesame" not in log


def test_time_limit_per_message_is_a_tempfail(config_file, smtp_sink):
    config = config_file(f'mail_host = "{smtp_sink.address}"\ntime_limit = 1\n'
                         '[filter.slow]\ntype = "gate_test_filters:Sleeper"\nseconds = 30\n'
                         '[[recipients]]\nfilters = ["slow"]\n')
    run = run_gate(["-c", str(config), "-f", "a@b.example", "c@d.example"], SIMPLE, timeout=20)
    assert run.code == 75
    assert run.first_line == "4.4.7 time limit of 1 s exceeded"
    assert smtp_sink.messages == []


def test_time_limit_leaves_a_sigalrm_handler_installed_from_c_alone(monkeypatch):
    """A program embedding Python installed SIGALRM's handler in C (getsignal says None):
    signal.signal could not put it back, so the limit leaves SIGALRM and the timer alone
    and is applied by check() (leftovers: it replaced the handler for good)."""
    import time

    from ispmailgate_core import process

    installed: list[int] = []
    real_getsignal, real_signal = signal.getsignal, signal.signal
    monkeypatch.setattr(signal, "getsignal", lambda n: None if n == signal.SIGALRM else real_getsignal(n))
    monkeypatch.setattr(signal, "signal", lambda n, h: installed.append(n) or real_signal(n, h))
    with process.time_limit(0.05) as clock:
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        time.sleep(0.1)
        with pytest.raises(process.TimeLimitExceeded):
            clock.check()
    assert signal.SIGALRM not in installed


def test_a_full_disk_is_a_tempfail_not_an_error_report(config_file, smtp_sink):
    config = config_file(f'mail_host = "{smtp_sink.address}"\n'
                         '[filter.s]\ntype = "gate_test_filters:Scribbler"\nsize = 2000000\n'
                         '[[recipients]]\nfilters = ["s"]\n')

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # EFBIG instead of a kill

    environment = {**os.environ, "PYTHONPATH": str(PLUGINS)}
    process = subprocess.run([str(GATE), "-c", str(config), "-f", "a@b.example", "c@d.example"],
                             input=SIMPLE, capture_output=True, env=environment, timeout=60,
                             preexec_fn=small_files)
    stderr = process.stderr.decode()
    assert process.returncode == 75, stderr
    assert stderr.startswith("4.3.0 s: [Errno 27] File too large\n")
    assert "Traceback" not in stderr
    assert smtp_sink.messages == []       # no postmaster report either: nothing was sent


def test_mime_limits_are_configurable(config_file):
    nested = b"Content-Type: multipart/mixed; boundary=b0\n\n--b0\n"
    for level in range(1, 6):
        nested += b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (level, level)
    nested += b"Content-Type: text/plain\n\nhello\n"
    config = config_file('max_mime_depth = 3\ndefault_filter = ["gate_test_filters:Upcase"]\n')
    run = run_inline(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], nested)
    assert run.code == 0
    assert run.stdout == nested       # the text part lies deeper than 3 levels: left alone
    config = config_file('max_mime_depth = 10\ndefault_filter = ["gate_test_filters:Upcase"]\n', name="b.toml")
    run = run_inline(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], nested)
    assert run.stdout.endswith(b"HELLO\n")


def test_the_parts_limit_is_configurable(config_file):
    parts = b"".join(b"--b\nContent-Type: application/octet-stream\n\npart %d\n" % n for n in range(4))
    message = (b"Content-Type: multipart/mixed; boundary=b\n\n" + parts
               + b"--b\nContent-Type: text/plain\n\npart 4\n--b--\n")
    config = config_file('max_mime_parts = 3\ndefault_filter = ["gate_test_filters:Upcase"]\n')
    run = run_inline(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], message)
    assert run.code == 0
    assert run.stdout == message      # the text part comes after the third: opaque, left alone
    config = config_file('max_mime_parts = 10\ndefault_filter = ["gate_test_filters:Upcase"]\n', name="b.toml")
    run = run_inline(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], message)
    assert b"PART 4" in run.stdout


def test_a_flat_multipart_of_twenty_thousand_parts_stays_whole(config_file):
    parts = b"--b\nContent-Type: application/octet-stream\n\nx\n" * 20_000
    message = (b"Content-Type: multipart/mixed; boundary=b\n\n" + parts
               + b"--b\nContent-Type: text/plain\n\nlast\n--b--\n")
    config = config_file('default_filter = ["gate_test_filters:Upcase"]\n')       # max_mime_parts: 10,000
    run = run_inline(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], message)
    assert run.code == 0
    assert run.stdout == message


@root_only
def test_a_tmp_dir_the_mail_user_cannot_write_is_a_tempfail(config_file, shared_dir):
    spool = shared_dir / "spool"
    spool.mkdir(mode=0o555)
    spool.chmod(0o555)                        # root's, and not writable for nobody
    config = config_file(f'mail_user = "nobody"\nmail_group = "nogroup"\ntmp_dir = "{spool}"\n'
                         'default_filter = ["gate_test_filters:NeedsWorkdir"]\n')
    config.chmod(0o644)
    run = run_gate(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 75
    assert run.first_line.startswith("4.3.0 needs-workdir: cannot create a work directory in "), run.stderr
    assert "Permission denied" in run.first_line
    assert run.stdout == b""
    assert list(spool.iterdir()) == []


def test_readable_by_walks_every_parent(tmp_path):
    from ispmailgate_core import process

    private = tmp_path / "private" / "lib"
    private.mkdir(parents=True)
    (tmp_path / "private").chmod(0o700)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    tmp_path.chmod(0o755)
    uid, gid = 65534, 65534
    expected_open = all(os.stat(p).st_mode & 0o005 == 0o005 for p in [open_dir, *open_dir.parents])
    assert process.readable_by(uid, gid, str(open_dir)) == expected_open
    assert not process.readable_by(uid, gid, str(private))
