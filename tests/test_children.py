"""Every child process is killed and reaped on every way out (issue 14, class 10).

The review: when time_limit fired, the packer's run_command cancelled the command's timer
and then waited for the command without killing it, so a hanging command outlived both
timeouts.  Here commands that hang -- and start a grandchild that hangs too -- are ended
by the time limit, by SIGTERM and by their own timeout, in a one-shot run and in-process
(as a served worker runs), for the packer, a command scanner and gpg; afterwards none of
them is running and the gate's own children are reaped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import GATE, PLUGINS, run_gate, run_inline, wait_for

MESSAGE = (b"From: a@example.org\nTo: b@example.net\nSubject: children\nMIME-Version: 1.0\n"
           b"Content-Type: text/plain\n\n" + b"a line of text that compresses well\n" * 200)


def hanging_command(folder: Path, name: str = "hang", answer_version: bool = False) -> Path:
    """A command that writes its pid and its child's pid to NAME.pids, then both hang (the
    child holding the command's output pipes, but a fake gpg's, which detaches as an agent)."""
    script = folder / name
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import os, subprocess, sys, time
        if {answer_version} and any(a in ("--version", "--list-config") for a in sys.argv):
            print("gpg (GnuPG) 2.2.40\\ncfg:version:2.2.40")
            sys.exit(0)
        quiet = {{"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}} if {answer_version} else {{}}
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], **quiet)
        with open({str(folder / (name + ".pids"))!r}, "a") as out:
            out.write(f"{{os.getpid()}} {{child.pid}}\\n")
        time.sleep(120)
        """))
    script.chmod(0o755)
    return script


def pids(folder: Path, name: str = "hang") -> list[int]:
    path = folder / f"{name}.pids"
    return [int(word) for word in path.read_text().split()] if path.exists() else []


def running(pid: int) -> bool:
    """Alive and not a zombie (a zombie whose parent is gone may wait for PID 1 a while)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def not_our_child(pid: int) -> bool:
    """Reaped: no zombie of ours left behind (what a served worker must not collect)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def packer_config(config_file, command: Path, extra: str = "") -> Path:
    return config_file(f'time_limit = 1\n{extra}[filter.z]\ntype = "packer"\ndirection = "pos"\ncodec = "zz"\n'
                       f'min_saving = 0\ncommand_pos = ["{command}"]\ncommand_neg = ["/bin/cat"]\n'
                       '[[recipients]]\nfilters = ["z"]\n')


def assert_all_gone(folder: Path, name: str = "hang") -> None:
    found = pids(folder, name)
    assert found, "the command never ran"
    assert wait_for(lambda: not any(running(pid) for pid in found), 5), \
        [(pid, running(pid)) for pid in found]


def test_one_shot_the_time_limit_ends_the_packers_command_and_its_child(config_file, tmp_path):
    config = packer_config(config_file, hanging_command(tmp_path))
    started = time.monotonic()
    run = run_gate(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], MESSAGE, timeout=60)
    assert run.code == 75 and run.first_line == "4.4.7 time limit of 1 s exceeded"
    assert time.monotonic() - started < 20          # not the command's 120 s
    assert_all_gone(tmp_path)


def test_in_process_the_command_is_killed_and_reaped(config_file, tmp_path):
    config = packer_config(config_file, hanging_command(tmp_path))
    run = run_inline(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], MESSAGE)
    assert run.code == 75
    command, grandchild = pids(tmp_path)
    assert not_our_child(command)
    assert_all_gone(tmp_path)


def test_the_commands_own_timeout_ends_its_child_too(config_file, tmp_path):
    config = config_file(f'[filter.z]\ntype = "packer"\ndirection = "pos"\ncodec = "zz"\nmin_saving = 0\n'
                         f'command_pos = ["{hanging_command(tmp_path)}"]\ncommand_neg = ["/bin/cat"]\n'
                         'command_timeout = 1\n[[recipients]]\nfilters = ["z"]\n')
    run = run_inline(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], MESSAGE)
    assert run.code == 0 and b"X-ispMailGate-Packed:" not in run.stdout     # a failed pos leaves the part
    assert_all_gone(tmp_path)


def test_sigterm_ends_the_run_and_its_command(config_file, tmp_path):
    config = packer_config(config_file, hanging_command(tmp_path)).read_text().replace("time_limit = 1", "")
    (tmp_path / "c.toml").write_text(config)
    environment = {**os.environ, "PYTHONPATH": str(PLUGINS)}
    (tmp_path / "message").write_bytes(MESSAGE)
    with open(tmp_path / "message", "rb") as stdin:
        process = subprocess.Popen([str(GATE), "-c", str(tmp_path / "c.toml"), "--stdout", "-f", "a@b.example",
                                    "c@d.example"], stdin=stdin, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=environment)
    assert wait_for(lambda: len(pids(tmp_path)) == 2, 20)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 75 and stderr.decode().startswith("4.3.0 stopped by SIGTERM before delivery")
    assert stdout == b""
    assert_all_gone(tmp_path)


def test_a_command_scanner_is_ended_by_the_time_limit(config_file, tmp_path):
    scanner = hanging_command(tmp_path, "scan")
    config = config_file(f'time_limit = 1\n[filter.av]\ntype = "virscan"\nscanner = "command"\n'
                         f'command = ["{scanner}", "{{paths}}"]\nscanner_unpacks = []\n'
                         '[[recipients]]\nfilters = ["av"]\n')
    run = run_inline(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], MESSAGE)
    assert run.code == 75 and run.first_line == "4.4.7 time limit of 1 s exceeded"
    assert not_our_child(pids(tmp_path, "scan")[0])
    assert_all_gone(tmp_path, "scan")


@pytest.mark.parametrize("way", ["time limit", "gpg timeout"])
def test_gpg_is_ended_and_reaped(config_file, tmp_path, way):
    gpg = hanging_command(tmp_path, "gpg", answer_version=True)
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    limits = "time_limit = 1\n" if way == "time limit" else "time_limit = 60\n"
    config = config_file(f'{limits}[filter.g]\ntype = "pgp"\ndirection = "neg"\ngnupghome = "{home}"\n'
                         f'gpg_binary = "{gpg}"\ntimeout = {2 if way == "gpg timeout" else 60}\n'
                         '[[recipients]]\nfilters = ["g"]\n')
    armored = (b"-----BEGIN PGP MESSAGE-----\n\nhQEMA5Zk2h0pZ2W9AQf/c29tZXRoaW5n\n=abcd\n"
               b"-----END PGP MESSAGE-----\n")
    message = b"From: a@example.org\nTo: b@example.net\nSubject: pgp\n\n" + armored
    started = time.monotonic()
    run = run_inline(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], message)
    assert time.monotonic() - started < 30 and "Traceback" not in run.stderr
    found = pids(tmp_path, "gpg")
    gpgs, theirs = found[::2], found[1::2]
    try:
        assert gpgs, run.stderr
        assert all(not_our_child(pid) and not running(pid) for pid in gpgs)
    finally:        # what gpg itself starts (its agent) is gpg's, and meant to stay: not ours to end
        for pid in theirs:
            os.kill(pid, signal.SIGKILL)
