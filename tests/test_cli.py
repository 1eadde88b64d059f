"""Invocation as MTAs and people use it: envelope, exit codes, status lines, logging."""

from __future__ import annotations

import re

import pytest

from conftest import CORPUS, PLUGINS, free_port, run_gate, run_inline

SIMPLE = (CORPUS / "plain.eml").read_bytes()
MBOX = (CORPUS / "mbox-forward.eml").read_bytes()      # starts with "From grace@navy.example.mil ..."


def test_shell_mode_reads_the_envelope_from_the_message(config_file):
    run = run_gate(["--config", str(config_file())], SIMPLE)
    assert run.code == 0
    assert run.stdout == SIMPLE
    [line] = run.stderr.splitlines()
    assert "to=<charles@engine.example.net>,<mary@engine.example.net>" in line
    assert "rule=default chain=dummy outcome=sent" in line


def test_shell_mode_with_no_config_at_all_uses_the_built_in_default(tmp_path):
    run = run_gate([], SIMPLE, env={"HOME": str(tmp_path)})
    assert run.code == 0, run.stderr
    assert run.stdout == SIMPLE


def test_shell_mode_takes_the_sender_from_the_from_line(config_file, tmp_path):
    config = config_file()
    run = run_gate(["-c", str(config), "-d"], MBOX)
    assert run.code == 0, run.stderr
    assert run.stdout == MBOX
    log = (tmp_path / "gate.log").read_text()
    assert "from=<grace@navy.example.mil>" in log


def test_from_line_gives_the_sender_and_is_not_delivered(config_file, smtp_sink):
    config = config_file(f'mail_host = "{smtp_sink.address}"\n')
    run = run_inline(["-c", str(config), "rcpt@example.com"], MBOX)
    assert run.code == 0, run.stderr
    [received] = smtp_sink.messages
    assert received.mail_from == "grace@navy.example.mil"
    assert not received.content.startswith(b"From ")
    assert received.rcpt_tos == ["rcpt@example.com.ispmailgate"]


def test_no_sender_anywhere_is_a_tempfail_with_a_clear_message(config_file, smtp_sink):
    config = config_file(f'mail_host = "{smtp_sink.address}"\n')
    run = run_gate(["-c", str(config), "rcpt@example.com"], SIMPLE)
    assert run.code == 75
    assert run.first_line.startswith("4.5.1 no envelope sender")
    assert smtp_sink.messages == []


@pytest.mark.parametrize("null", ["", "<>"])
def test_null_sender_is_passed_on(config_file, smtp_sink, null):
    config = config_file(f'mail_host = "{smtp_sink.address}"\n')
    run = run_gate(["-c", str(config), "-f", null, "--", "rcpt@example.com"], SIMPLE)
    assert run.code == 0, run.stderr
    assert smtp_sink.messages[0].mail_from == "<>"     # aiosmtpd records MAIL FROM:<> so


@pytest.mark.parametrize("given, canonical", [
    ("Some Body <body@example.com>", "body@example.com"),
    ("body@example.com (Some Body)", "body@example.com"),
    ("<body@example.com>", "body@example.com"),
    ("  body@example.com ", "body@example.com"),
])
def test_addresses_are_canonicalised(config_file, smtp_sink, given, canonical):
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\n')
    run = run_inline(["-c", str(config), "-f", given, given], SIMPLE)
    assert run.code == 0, run.stderr
    [received] = smtp_sink.messages
    assert (received.mail_from, received.rcpt_tos) == (canonical, [canonical])


@pytest.mark.parametrize("bad", ["a@b\r\nRCPT TO:<evil@x>", "a@b\nX", "a\0@b", "a@b>evil", "two words@x"])
@pytest.mark.parametrize("where", ["sender", "recipient"])
def test_addresses_that_could_inject_are_refused(config_file, smtp_sink, bad, where):
    config = config_file(f'mail_host = "{smtp_sink.address}"\n')
    args = ["-f", bad, "ok@example.com"] if where == "sender" else ["-f", "ok@example.com", "--", bad]
    runner = run_inline if "\0" in bad else run_gate     # argv cannot carry NUL; the socket can
    run = runner(["-c", str(config), *args], SIMPLE)
    # for good: retrying cannot make such an address usable (the recipient alone: a bounce)
    assert run.code == 69
    assert run.first_line.startswith("5.1.7 bad sender address" if where == "sender" else
                                     "5.1.3 bad recipient address")
    assert smtp_sink.messages == []


def test_unqualified_addresses_get_the_configured_domain(config_file, smtp_sink):
    config = config_file(f'mail_host = "{smtp_sink.address}"\nunqualified_domain = "example.net"\n')
    run = run_inline(["-c", str(config), "-f", "root", "alice"], SIMPLE)
    assert run.code == 0, run.stderr
    [received] = smtp_sink.messages
    assert received.mail_from == "root@example.net"
    assert received.rcpt_tos == ["alice@example.net.ispmailgate"]


@pytest.mark.parametrize("args", [["--no-such-option"], ["-f"], ["--mail-host"]])
def test_usage_errors_exit_75_not_2(args):
    run = run_gate(args, SIMPLE)
    assert run.code == 75
    assert run.first_line.startswith("4.3.5 usage:")


def test_help_and_version_exit_0():
    assert run_gate(["--help"], b"").code == 0
    run = run_gate(["--version"], b"")
    assert run.code == 0 and run.stdout.startswith(b"ispmailgate ")


def test_an_unexpected_exception_is_a_tempfail_without_traceback(monkeypatch, config_file):
    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("ispmailgate_core.run.route", explode)
    run = run_inline(["-c", str(config_file()), "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 75
    assert run.first_line.startswith("4.3.0 internal error: RuntimeError('boom')")


def test_a_broken_installation_is_a_tempfail_not_a_bounce(tmp_path):
    """A dependency that no longer imports: the console script still answers 75, one line."""
    (tmp_path / "typer.py").write_text("raise ImportError('typer is broken here')\n")
    run = run_gate(["-f", "a@b.example", "c@d.example"], SIMPLE,
                   env={"PYTHONPATH": f"{tmp_path}:{PLUGINS}"})
    assert run.code == 75
    assert run.stderr == "4.3.0 ispmailgate cannot start: ImportError('typer is broken here')\n"
    assert run.stdout == b""


@pytest.mark.parametrize("facility", ["kitchen", "err", "", "ftp"])     # ftp: no LOG_FTP in Python
def test_an_unknown_syslog_facility_is_a_usage_error(facility):
    run = run_inline(["-a", facility, "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 75
    assert run.first_line.startswith("4.3.5 usage: -a/--facility: not a syslog facility")


def test_the_facility_reaches_syslog(monkeypatch, config_file):
    import syslog
    opened = []
    monkeypatch.setattr(syslog, "openlog", lambda *args: opened.append(args))
    run = run_inline(["-c", str(config_file()), "-a", "LOCAL3", "--stdout", "-f", "a@b.example", "c@d.example"],
                     SIMPLE)
    assert run.code == 0, run.stderr
    assert opened[-1] == ("ispmailgate", syslog.LOG_PID, syslog.LOG_LOCAL3)


def test_oversize_message_tempfails_or_rejects_as_configured(config_file, smtp_sink):
    for action, code, status in (("tempfail", 75, "4.3.4"), ("reject", 69, "5.3.4")):
        config = config_file(f'mail_host = "{smtp_sink.address}"\nmax_message_size = "1K"\n'
                             f'on_oversize = "{action}"\n')
        run = run_gate(["-c", str(config), "-f", "a@b.example", "c@d.example"], b"X: y\n\n" + b"z" * 5000)
        assert (run.code, run.first_line[:5]) == (code, status)
    assert smtp_sink.messages == []


def test_one_log_line_per_message(config_file, smtp_sink, tmp_path):
    config = config_file(f'mail_host = "{smtp_sink.address}"\n')
    run = run_gate(["-c", str(config), "-f", "a@b.example", "c@d.example", "e@f.example"], SIMPLE)
    assert run.code == 0
    lines = [line for line in (tmp_path / "gate.log").read_text().splitlines()
             if "mail_user is root" not in line]      # the fixture's explicit root, warned about
    assert len(lines) == 1
    assert re.search(r"ispmailgate\[\d+\]: [0-9A-F]{10}: msgid=<notes-1843@lab.example.org> "
                     r"from=<a@b.example> size=%d "
                     r"to=<c@d.example>,<e@f.example> rule=default chain=dummy outcome=sent .* "
                     r"status=done ms=\d+" % len(SIMPLE), lines[0]), lines[0]


def test_debug_adds_detail(config_file, smtp_sink, tmp_path):
    config = config_file(f'mail_host = "{smtp_sink.address}"\n')
    run = run_gate(["-c", str(config), "-d", "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 0
    log = (tmp_path / "gate.log").read_text()
    assert re.search(r"dummy: [\d.]+ ms for c@d.example", log)


def test_work_directory_is_private_and_removed(config_file, smtp_sink, tmp_path):
    record = tmp_path / "workdir.txt"
    config = config_file(f'mail_host = "{smtp_sink.address}"\n'
                         f'[filter.w]\ntype = "gate_test_filters:NeedsWorkdir"\nrecord = "{record}"\n'
                         f'[[recipients]]\nfilters = ["w"]\n')
    run = run_inline(["-c", str(config), "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 0, run.stderr
    workdir, mode, scratch_mode = record.read_text().split()
    assert workdir.startswith(str(tmp_path / "spool"))
    assert (mode, scratch_mode) == ("700", "600")       # whatever the umask the MTA left
    assert not (tmp_path / "spool").joinpath(workdir).exists()
    assert list((tmp_path / "spool").iterdir()) == []


def test_unwritable_tmp_dir_is_a_tempfail(config_file, smtp_sink, tmp_path):
    config = config_file(f'tmp_dir = "{tmp_path}/does/not/exist"\nmail_host = "{smtp_sink.address}"\n'
                         f'default_filter = ["gate_test_filters:NeedsWorkdir"]\n')
    run = run_gate(["-c", str(config), "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 75
    assert "cannot create a work directory" in run.first_line
    assert smtp_sink.messages == []


def test_the_log_line_names_the_message_id(config_file, smtp_sink, tmp_path):
    config = config_file(f'mail_host = "{smtp_sink.address}"\n')
    data = b"Message-ID: <abc.123@example.org>\nSubject: x\n\nbody\n"
    assert run_gate(["-c", str(config), "-f", "a@b.example", "c@d.example"], data).code == 0
    assert "msgid=<abc.123@example.org> from=<a@b.example>" in (tmp_path / "gate.log").read_text()


def test_undecodable_bytes_and_nul_in_logged_fields_never_break_logging(config_file, tmp_path):
    config = config_file()
    data = b"Message-ID: <\x9a\xdc\xff\x00nul@example.org>\nSubject: \xff\xfe\n\nbody\n"
    run = run_gate(["-c", str(config), "--stdout", "-d", "-f", "a@b.example", "c@d.example"], data)
    assert run.code == 0 and run.stdout == data
    assert "Logging error" not in run.stderr
    log = (tmp_path / "gate.log").read_text()
    assert "msgid=<\\x9a\\xdc\\xff\\0nul@example.org>" in log


def test_a_deferral_says_its_reason_once(config_file):
    """Postfix's queue shows every stderr line of the run: the reason once, not twice."""
    config = config_file(f'mail_host = "127.0.0.1:{free_port()}"\n')
    run = run_gate(["-c", str(config), "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 75
    [line] = run.stderr.splitlines()
    assert line.startswith("4.4.1 smtp:127.0.0.1:") and line.endswith(": connection refused")


@pytest.mark.parametrize("reachable", [True, False])
def test_a_run_whose_log_goes_nowhere_says_so_after_its_status_line(config_file, monkeypatch, reachable):
    from ispmailgate_core import logs

    monkeypatch.setattr("ispmailgate_core.run.syslog_reachable", lambda probe=True: reachable)
    unlogged = "ispmailgate: " + logs.UNLOGGED
    config = config_file(f'log_file = ""\nmail_host = "127.0.0.1:{free_port()}"\n')
    run = run_inline(["-c", str(config), "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 75
    assert run.stderr.splitlines()[1:] == ([] if reachable else [unlogged])
    assert run.first_line.startswith("4.4.1 ")
    run = run_inline(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert (run.code, run.stdout) == (0, SIMPLE)
    assert run.stderr == ("" if reachable else unlogged + "\n")
    with_file = config_file('log_file = "-"\n', name="stderr.toml")
    assert unlogged not in run_inline(["-c", str(with_file), "--stdout", "-f", "a@b", "c@d"], SIMPLE).stderr
