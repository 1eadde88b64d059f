"""A caller that closed stdin, stdout or stderr (attack review finding 14): no traceback, a
defined exit status, nothing delivered twice, nothing written where a closed stream's
descriptor was reused."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import CORPUS, GATE, PLUGINS

SIMPLE = (CORPUS / "plain.eml").read_bytes()


def gate_with_closed(stream: int, args: list[str], message: bytes) -> subprocess.CompletedProcess:
    """The installed gate with one standard descriptor closed, the others piped."""
    pipes = {0: subprocess.PIPE, 1: subprocess.PIPE, 2: subprocess.PIPE}
    message_file = None
    if stream != 0:
        read, write = os.pipe()
        os.write(write, message)
        os.close(write)
        pipes[0] = message_file = read
    keep = [fd for fd in (0, 1, 2) if fd != stream]

    def close_it() -> None:
        os.close(stream)

    environment = {**{k: v for k, v in os.environ.items() if not k.startswith("ISPMAILGATE_")},
                   "PYTHONPATH": str(PLUGINS)}
    try:
        return subprocess.run([str(GATE), *args], stdin=pipes[0] if 0 in keep else subprocess.DEVNULL,
                              stdout=pipes[1] if 1 in keep else subprocess.DEVNULL,
                              stderr=pipes[2] if 2 in keep else subprocess.DEVNULL,
                              preexec_fn=close_it, env=environment, timeout=60, check=False)
    finally:
        if message_file is not None:
            os.close(message_file)


def test_closed_stderr_delivers_once_and_exits_0(config_file, smtp_sink):
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\n')
    run = gate_with_closed(2, ["-c", str(config), "-f", "s@x.example", "--", "a@x"], SIMPLE)
    assert run.returncode == 0
    assert len(smtp_sink.messages) == 1


def test_closed_stdin_is_a_retry_with_nothing_delivered(config_file, smtp_sink):
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\n')
    run = gate_with_closed(0, ["-c", str(config), "-f", "s@x.example", "--", "a@x"], SIMPLE)
    assert run.returncode == 75, run.stderr
    assert run.stderr.decode().startswith("4.3.0 cannot read the message: [Errno 9] standard input is closed")
    assert b"Traceback" not in run.stderr and smtp_sink.messages == []


@pytest.mark.parametrize("args", [["--stdout"], []], ids=["stdout", "smtp"])
def test_closed_stdout(config_file, smtp_sink, tmp_path, args):
    """With --stdout a retry (the message had nowhere to go); else it does not matter.  The
    log file the run opens does not get what was meant for stdout."""
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\n')
    run = gate_with_closed(1, ["-c", str(config), *args, "-f", "s@x.example", "--", "a@x"], SIMPLE)
    assert b"Traceback" not in run.stderr
    if args:
        assert run.returncode == 75
        assert run.stderr.decode().startswith("4.3.0 cannot write to stdout: [Errno 9] standard output is closed")
    else:
        assert (run.returncode, len(smtp_sink.messages)) == (0, 1)
    assert b"Subject" not in (tmp_path / "gate.log").read_bytes()
