"""ispmailgate serve: a real server in a subprocess, the real client, real signals."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import CORPUS, Sink, crlf, run_gate, wait_for
from ispmailgate_client import ARGUMENTS, CONTEXT, DATA, END, PROTOCOL_VERSION, encode_arguments, frame
from support.serving import CLIENT, Server, client_env, drain, proc_status, shared_folder, wait_for_workers
from support.serving import python, sink  # noqa: F401  (fixtures)

SIMPLE = (CORPUS / "plain.eml").read_bytes()
MBOX = (CORPUS / "mbox-forward.eml").read_bytes()        # starts with a From_ line


# -- the [serve] section ------------------------------------------------------------------

def test_serve_section_is_checked_with_the_rule_file(tmp_path):
    from ispmailgate_core import rules
    from ispmailgate_filters.base import ConfigError

    path = tmp_path / "rules.toml"
    path.write_text('[serve]\nworkers = 3\nsocket_mode = "0640"\nmax_request_size = "2M"\n')
    settings = rules.load_config(path).sections["serve"]
    assert (settings.workers, settings.socket_mode, settings.max_request_size) == (3, 0o640, 2 << 20)
    assert settings.fallback == "oneshot"
    for text, complaint in (("[serve]\nworkerz = 1\n", "serve.workerz: unknown key"),
                            ("[serve]\nworkers = 0\n", "serve.workers: expected an integer from 1 to 1024"),
                            ('[serve]\nfallback = "later"\n', "serve.fallback: expected one of"),
                            ('[serve]\nsocket_mode = "rw"\n', "serve.socket_mode: expected an octal")):
        path.write_text(text)
        with pytest.raises(ConfigError) as error:
            rules.load_config(path)
        assert complaint in str(error.value) and str(path) in str(error.value)


# -- served == one-shot -------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(python, sink):
    with Server(python, f'mail_host = "{sink.address}"\n[serve]\nworkers = 2\n') as server:
        yield server


@pytest.fixture(scope="module")
def client_folder(server, sink):
    """The MTA's directory, not the server's: rule files and work folders by relative names."""
    folder = shared_folder()
    folder.chmod(0o755)     # a one-shot run as root trusts no rule file in a folder others can write
    for name, stamp in (("rules.toml", "relative -c"), ("env.toml", "ISPMAILGATE_CONFIG")):
        (folder / name).write_text(
            f'mail_host = "{sink.address}"\ntmp_dir = "work"\nlog_file = "{server.gate_log}"\n'
            f'mail_user = "{server.user}"\nmail_group = "{server.group}"\n'
            'default_filter = ["stamp", "gate_test_filters:NeedsWorkdir"]\n'
            f'[filter.stamp]\ntype = "gate_test_filters:Stamp"\nvalue = "{stamp}"\n')
    for name in ("work", "other"):
        (folder / name).mkdir(mode=0o777)
        (folder / name).chmod(0o777)
    yield folder
    shutil.rmtree(folder)


# Each case runs in client_folder; leading NAME=value words go to the environment, as with env(1).
SAME_RESULT_CASES = [
    (["--help"], b""),
    (["-h"], b""),
    (["--version"], b""),
    (["--no-such-option"], SIMPLE),
    (["-f"], SIMPLE),
    (["--mail-host"], SIMPLE),
    (["--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE),
    (["--stdout", "-d", "-f", "a@b.example", "c@d.example"], MBOX),
    (["--stdout", "c@d.example"], MBOX),
    (["--stdout", "-f", "a@b.example", "c@d.example"], b""),
    ([], SIMPLE),                                           # shell test mode
    (["-d"], MBOX),
    (["c@d.example"], SIMPLE),                              # no sender anywhere: 4.5.1
    (["-f", "a@b\nRCPT TO:<evil@x>", "c@d.example"], SIMPLE),
    (["-f", "a@b.example", "--", "two words@x"], SIMPLE),
    (["-m", "[::1", "-f", "a@b.example", "c@d.example"], SIMPLE),
    (["-f", "a@b.example", "c@d.example", "e@f.example"], SIMPLE),
    (["--originating", "-f", "a@b.example", "c@d.example"], SIMPLE),
    (["-f", "", "--", "-odd@example.com"], MBOX),
    (["-f", "a@b.example", "ümlaut@exämple.org"], SIMPLE),
    # relative paths resolve in the client's directory, and its $ISPMAILGATE_CONFIG counts
    (["-c", "rules.toml", "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE),
    (["-c", "rules.toml", "-f", "a@b.example", "c@d.example"], SIMPLE),
    (["-c", "rules.toml", "-t", "other", "-d", "--stdout", "-f", "a@b.example", "c@d.example"], MBOX),
    (["-c", "rules.toml", "-t", "absent", "-f", "a@b.example", "c@d.example"], SIMPLE),
    (["-c", "absent.toml", "-f", "a@b.example", "c@d.example"], SIMPLE),
    (["ISPMAILGATE_CONFIG=env.toml", "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE),
    (["ISPMAILGATE_CONFIG=env.toml", "-f", "a@b.example", "c@d.example"], SIMPLE),
    (["ISPMAILGATE_CONFIG=env.toml", "-c", "rules.toml", "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE),
    (["ISPMAILGATE_CONFIG=absent.toml", "-f", "a@b.example", "c@d.example"], SIMPLE),
    (["ISPMAILGATE_CONFIG=", "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE),   # empty: unset
]


@pytest.mark.parametrize("args, stdin", SAME_RESULT_CASES)
def test_served_result_is_the_one_shot_result(server, sink, client_folder, args, stdin):
    env = {}
    while args and re.match(r"[A-Z_]+=", args[0]):
        name, _, value = args[0].partition("=")
        env[name], args = value, args[1:]
    names_a_config = "-c" in args or env.get("ISPMAILGATE_CONFIG") or args[:1] == ["--help"]
    config_args = [] if names_a_config else ["-c", str(server.config)]
    one_shot = run_gate(config_args + args, stdin, env=env, cwd=client_folder)
    delivered_one_shot = drain(sink)
    served = server.client(config_args + args, stdin, env=env, cwd=client_folder)
    delivered_served = drain(sink)
    assert (served.code, served.stdout, served.stderr) == (one_shot.code, one_shot.stdout, one_shot.stderr)
    assert [(m.mail_from, m.rcpt_tos, m.content) for m in delivered_served] == \
           [(m.mail_from, m.rcpt_tos, m.content) for m in delivered_one_shot]


def test_a_config_error_reads_the_same_served_and_one_shot(server):
    args = ["-c", str(server.folder / "missing.toml"), "-f", "a@b.example", "c@d.example"]
    one_shot, served = run_gate(args, SIMPLE), server.client(args, SIMPLE)
    assert served.code == one_shot.code == 75
    assert served.stderr == one_shot.stderr and served.first_line.startswith("4.3.5 config error")


ENVELOPE = ["--stdout", "-f", "a@b.example", "c@d.example"]


def test_a_directory_the_workers_cannot_enter_fails_only_relative_paths(server, client_folder):
    """A procmail user's home of 0700: what is absolute works, what is relative is deferred
    with the reason, and never resolved in another directory."""
    private = Path(tempfile.mkdtemp(dir="/tmp"))           # root's, 0700: nobody cannot enter
    shutil.copy(client_folder / "rules.toml", private)
    try:
        absolute = server.client(["-c", str(server.config), *ENVELOPE], SIMPLE, cwd=private)
        relative = server.client(["-c", "rules.toml", *ENVELOPE], SIMPLE, cwd=private)
    finally:
        shutil.rmtree(private)
    assert (absolute.code, absolute.stdout) == (0, SIMPLE), absolute.stderr
    assert relative.code == 75
    assert relative.stderr.splitlines() == [
        "4.3.5 config error: rules.toml: cannot read: No such file or directory",
        f"ispmailgate serve: cannot enter the client's working directory {private}: Permission denied: "
        "relative paths did not resolve"]
    for _ in range(4):          # each worker went back to its own directory
        again = server.client(["-c", "rules.toml", *ENVELOPE], SIMPLE, cwd=client_folder)
        assert again.code == 0 and b"X-Stamp: relative -c" in again.stdout, again.stderr


def test_a_removed_client_directory_resolves_relative_paths_nowhere(server, client_folder):
    def in_removed_directory(args: list[str]) -> subprocess.CompletedProcess:
        gone = shared_folder()
        shutil.copy(client_folder / "rules.toml", gone)
        return subprocess.run(["sh", "-c", 'cd "$0" && rm -r "$0" && exec "$@"', str(gone), str(CLIENT),
                               "--socket", str(server.socket), *args], input=SIMPLE, capture_output=True,
                              env=client_env(), timeout=120)

    absolute = in_removed_directory(["-c", str(server.config), *ENVELOPE])
    relative = in_removed_directory(["-c", "rules.toml", *ENVELOPE])
    assert (absolute.returncode, absolute.stdout) == (0, SIMPLE), absolute.stderr
    assert relative.returncode == 75
    # (The installed client starts through /bin/sh, which warns first that it has no directory.)
    assert [line for line in relative.stderr.decode().splitlines() if "getcwd" not in line] == [
        "4.3.5 config error: rules.toml: cannot read: No such file or directory",
        "ispmailgate serve: the client cannot tell its working directory: relative paths did not resolve"]


def test_a_directory_that_is_another_one_for_the_server_resolves_nothing(server, client_folder):
    """Same path, another directory (the server's private /tmp, another mount namespace):
    told apart by device and inode, it is treated as a directory the worker cannot enter."""
    def request(dev_ino: bytes) -> tuple[int, bytes]:
        context = os.fsencode(client_folder) + b"\0" + dev_ino + b"\0"
        args = encode_arguments(["-c", "rules.toml", *ENVELOPE])
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(60)
            connection.connect(str(server.socket))
            connection.sendall(b"\x02" + frame(CONTEXT, context) + frame(ARGUMENTS, args)
                               + frame(DATA, SIMPLE) + frame(END))
            connection.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := connection.recv(65536):
                reply += chunk
        return reply[-1], reply

    here = client_folder.stat()
    assert request(b"%d:%d" % (here.st_dev, here.st_ino))[0] == 0
    status, reply = request(b"%d:%d" % (here.st_dev, here.st_ino + 1))
    assert status == 75
    assert (b"ispmailgate serve: cannot enter the client's working directory " + os.fsencode(client_folder)
            + b": the server sees another directory there") in reply


class DashCServer(Server):
    """Started as ``python -c``: sys.path begins with "", whatever the current directory is."""

    def command(self) -> list[str]:
        return [str(self.python), "-c", "import sys, ispmailgate; sys.exit(ispmailgate.main())",
                *super().command()[3:]]


def test_a_client_directory_never_supplies_modules_to_the_workers(python, sink):
    folder = shared_folder()
    (folder / "planted.py").write_text(f"open({str(folder / 'imported')!r}, 'w').close()\n")
    (folder / "rules.toml").write_text('default_filter = ["planted:Filter"]\n')
    folder.chmod(0o755)         # root's alone: else the server declines the rule file (the client is root)
    try:
        with DashCServer(python, f'mail_host = "{sink.address}"\n') as server:
            run = server.client(["-c", "rules.toml", *ENVELOPE], SIMPLE, cwd=folder)
        assert run.code == 75 and "No module named 'planted'" in run.first_line, run.stderr
        assert not (folder / "imported").exists()
    finally:
        shutil.rmtree(folder)


def test_delivery_is_byte_identical_and_the_peer_is_logged(server, sink):
    run = server.client(["-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 0, run.stderr
    [received] = drain(sink)
    assert received.content == crlf(SIMPLE)
    assert re.search(r"connection from pid=\d+ uid=0 gid=0", server.log())


def test_serve_cannot_be_started_through_the_client(server):
    run = server.client(["serve", "--socket", "/tmp/elsewhere.sock"], b"")
    assert run.code == 75
    assert run.first_line.startswith("4.3.5 usage: 'serve' cannot run inside a server")


def test_many_clients_at_once(server, sink):
    results: list = [None] * 24

    def one(i: int) -> None:
        results[i] = server.client(["-f", f"s{i}@b.example", f"r{i}@d.example"], SIMPLE)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert [r.code for r in results] == [0] * len(results), [r.stderr for r in results if r.code]
    received = drain(sink)
    assert sorted(m.mail_from for m in received) == sorted(f"s{i}@b.example" for i in range(len(results)))
    assert all(m.content == crlf(SIMPLE) for m in received)
    served_by = set(re.findall(r"worker (\d+): pid=\d+ uid=0 exit=0", server.log()))
    assert len(served_by) == 2       # both workers took their share


# -- privileges -----------------------------------------------------------------------------

def test_workers_drop_to_the_mail_user_and_the_master_stays_root(server):
    assert os.geteuid() == 0, "this test must run as root, as CI does"
    workers = wait_for_workers(server, 2)
    for pid in workers:
        status = proc_status(pid)
        assert status["Uid"].split() == ["65534"] * 4
        assert status["Gid"].split() == ["65534"] * 4
        assert status["Groups"] == ""
    assert proc_status(server.pid)["Uid"].split()[0] == "0"
    mode = server.socket.stat()
    assert (oct(mode.st_mode & 0o777), mode.st_gid) == ("0o660", 65534)


def test_root_workers_are_refused(python):
    server = Server(python, "", user="root", group="root")
    try:
        process = subprocess.run(server.command(), capture_output=True, env=server.env(), timeout=120)
    finally:
        server.stop()
    assert process.returncode == 78
    assert b"mail_user: must not be root" in process.stderr


# -- life cycle -------------------------------------------------------------------------------

def pause_config(sink: Sink, folder: Path, extra: str = "") -> str:
    return (f'mail_host = "{sink.address}"\ndefault_filter = ["hold"]\n'
            f'[filter.hold]\ntype = "serve_test_filters:Pause"\nfolder = "{folder}"\n{extra}')


def started(folder: Path) -> list[Path]:
    return sorted(folder.glob("started-*"))


def test_a_worker_killed_mid_message_costs_a_tempfail_not_the_message(python, sink):
    drain(sink)
    pauses = shared_folder()
    (pauses / "hold").touch()
    with Server(python, pause_config(sink, pauses) + "[serve]\nworkers = 1\n") as server:
        [worker] = wait_for_workers(server, 1)
        client = subprocess.Popen([str(CLIENT), "--socket", str(server.socket),
                                   "-f", "a@b.example", "c@d.example"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        client.stdin.write(SIMPLE)
        client.stdin.close()
        assert wait_for(lambda: started(pauses), 30), server.log()
        os.kill(worker, signal.SIGKILL)
        assert client.wait(timeout=60) == 75
        assert client.stderr.read().decode().startswith("4.3.0 ispmailgate-client: the server closed")
        assert drain(sink) == []            # the MTA still has it: nothing was delivered
        (pauses / "hold").unlink()
        [replacement] = wait_for_workers(server, 1, exclude={worker})
        retry = server.client(["-f", "a@b.example", "c@d.example"], SIMPLE)     # the MTA's retry
        assert retry.code == 0, retry.stderr
        assert [m.content for m in drain(sink)] == [crlf(SIMPLE)]
        assert f"worker {worker} was killed by signal 9; replacing it" in server.log()
        assert replacement != worker


def test_a_worker_killed_takes_the_commands_it_runs_with_it(python, sink):
    """A filter's command runs in a process group of its own (not the worker's): a worker
    killed with SIGKILL cannot end it, so the master does, from the groups the worker
    recorded in its heartbeat."""
    folder = shared_folder()
    scanner = ["/bin/sh", "-c", f'echo $$ > {folder}/pid; sleep 600 & echo $! > {folder}/child; wait', "{path}"]
    config = (f'mail_host = "{sink.address}"\ndefault_filter = ["scan"]\n[filter.scan]\ntype = "virscan"\n'
              f'scanner = "command"\ncommand = {json.dumps(scanner)}\ntimeout = 900\n[serve]\nworkers = 1\n')
    with Server(python, config) as server:
        [worker] = wait_for_workers(server, 1)
        client = subprocess.Popen([str(CLIENT), "--socket", str(server.socket), "-f", "a@b.example", "c@d.example"],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env=client_env())
        client.stdin.write(SIMPLE)
        client.stdin.close()
        assert wait_for(lambda: (folder / "child").exists() and (folder / "child").read_text().strip(), 30), \
            server.log()
        command, child = (int((folder / name).read_text()) for name in ("pid", "child"))
        assert os.getpgid(child) == command != os.getpgid(worker)
        os.kill(worker, signal.SIGKILL)
        assert client.wait(timeout=60) == 75
        assert wait_for(lambda: not _alive(command) and not _alive(child), 30), server.log()
        wait_for_workers(server, 1, exclude={worker})
    drain(sink)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init counts as gone)."""
    try:
        return proc_status(pid)["State"][:1] != "Z"
    except OSError:
        return False


def test_a_busy_worker_holds_no_connection_hostage_and_the_doorkeeper_waits_idle(python, sink):
    """One worker busy with a held message: the other takes every other client in turn (no
    connection waits on the busy one).  Then both busy: a client whose head arrived waits
    for a free worker past head_timeout, and the doorkeeper does not spin meanwhile."""
    drain(sink)
    pauses = shared_folder()
    (pauses / "hold").touch()
    config = (f'mail_host = "{sink.address}"\ndefault_filter = ["dummy"]\n'
              f'[[recipients]]\nrecipient = "^held@"\nfilters = ["hold"]\n'
              f'[filter.hold]\ntype = "serve_test_filters:Pause"\nfolder = "{pauses}"\n'
              '[serve]\nworkers = 2\nhead_timeout = 0.5\n')
    with Server(python, config) as server:
        wait_for_workers(server, 2)
        held = [subprocess.Popen([str(CLIENT), "--socket", str(server.socket), "-f", "a@b.example", "held@d.example"],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 env=client_env())]
        held[0].stdin.write(SIMPLE)
        held[0].stdin.close()
        assert wait_for(lambda: len(started(pauses)) == 1, 30), server.log()
        for number in range(6):
            run = server.client(["--deadline", "30", "-f", "a@b.example", f"free{number}@d.example"], SIMPLE)
            assert run.code == 0, run.stderr
        assert len(drain(sink)) == 6 and "does not run this request" not in server.gate_log.read_text()
        doorkeeper = server.doorkeeper()
        held.append(subprocess.Popen([str(CLIENT), "--socket", str(server.socket), "-f", "a@b.example",
                                      "held@d.example"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=client_env()))
        held[1].stdin.write(SIMPLE)
        held[1].stdin.close()
        assert wait_for(lambda: len(started(pauses)) == 2, 30), server.log()
        waiting = subprocess.Popen([str(CLIENT), "--socket", str(server.socket), "--deadline", "60", "-f",
                                    "a@b.example", "last@d.example"], stdin=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=client_env())
        waiting.stdin.write(SIMPLE)
        waiting.stdin.close()
        before = _cpu_seconds(doorkeeper)
        time.sleep(3)               # six head_timeouts: a spinning doorkeeper burns most of it
        assert _cpu_seconds(doorkeeper) - before < 1.0
        assert waiting.poll() is None
        (pauses / "hold").unlink()
        assert [process.wait(timeout=60) for process in (*held, waiting)] == [0, 0, 0]
        assert len(drain(sink)) == 3


def test_half_a_large_head_holds_no_worker(python, sink):
    """Attack finding 12: heads that stop half-way, even past 256 KB, wait in the doorkeeper
    (at most head_timeout), never in a worker: the one worker goes on serving."""
    drain(sink)
    with Server(python, f'mail_host = "{sink.address}"\n[serve]\nworkers = 1\nhead_timeout = 20\n') as server:
        wait_for_workers(server, 1)
        half = (bytes([PROTOCOL_VERSION]) + frame(CONTEXT, b"/\0\0") + ARGUMENTS
                + (1 << 20).to_bytes(4, "big") + b"x\0" * (150 << 10))      # 300 KB of a 1 MB frame
        stalled = []
        for _ in range(3):
            connection = socket.socket(socket.AF_UNIX)
            connection.connect(str(server.socket))
            connection.sendall(half)
            stalled.append(connection)
        try:
            for number in range(3):
                run = server.client(["--deadline", "10", "-f", "a@b.example", f"c{number}@d.example"], SIMPLE)
                assert run.code == 0, run.stderr
                assert "does not run this request" not in run.stderr and "took the message" not in run.stderr
            assert len(drain(sink)) == 3
        finally:
            for connection in stalled:
                connection.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_sigterm_lets_messages_in_flight_finish_then_exits(python, sink):
    drain(sink)
    pauses = shared_folder()
    (pauses / "hold").touch()
    server = Server(python, pause_config(sink, pauses) + "[serve]\nworkers = 2\n").start()
    try:
        results: list = [None, None]
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, server.client(["-f", "a@b.example", f"r{i}@d.example"], SIMPLE))) for i in range(2)]
        for thread in threads:
            thread.start()
        assert wait_for(lambda: len(started(pauses)) == 2, 30), server.log()
        server.signal(signal.SIGTERM)
        assert server.wait_notice("STOPPING=1", 30)
        assert not server.socket.exists()           # new clients fall back from now on
        time.sleep(0.5)
        assert server.process.poll() is None        # still draining
        (pauses / "hold").unlink()
        for thread in threads:
            thread.join(timeout=120)
        assert [r.code for r in results] == [0, 0], [r.stderr for r in results]
        assert sorted(m.rcpt_tos[0] for m in drain(sink)) == ["r0@d.example.ispmailgate",
                                                              "r1@d.example.ispmailgate"]
        assert server.wait(60) == 0
        assert not server.pidfile.exists()
        assert "stopped" in server.log()
    finally:
        server.stop()


def test_sighup_reloads_a_good_rule_file_and_refuses_a_bad_one(python, sink):
    drain(sink)
    stamp = '[filter.stamp]\ntype = "gate_test_filters:Stamp"\nvalue = "{}"\n'
    rules = 'mail_host = "{}"\ndefault_filter = ["stamp"]\n'.format(sink.address)
    with Server(python, rules + stamp.format("one")) as server:
        assert server.client(["-f", "a@b.example", "c@d.example"], SIMPLE).code == 0
        old = wait_for_workers(server, 2)
        server.write_config(rules + stamp.format("two"))
        server.signal(signal.SIGHUP)
        assert server.wait_notice("RELOADING=1") and server.wait_notice("READY=1"), server.log()
        assert wait_for(lambda: not (server.workers() & old), 60), server.log()
        new = wait_for_workers(server, 2)
        assert server.client(["-f", "a@b.example", "c@d.example"], SIMPLE).code == 0
        server.write_config(rules + stamp.format("three") + "bogus_key = 1\n")
        server.signal(signal.SIGHUP)
        assert server.wait_notice("RELOADING=1") and server.wait_notice("READY=1"), server.log()
        assert "reload refused, still serving the previous rule file" in server.log()
        assert "filter.stamp.bogus_key" in server.log()
        assert server.client(["-f", "a@b.example", "c@d.example"], SIMPLE).code == 0
        assert server.workers() == new
        stamps = [re.findall(rb"X-Stamp: (\w+)", m.content) for m in drain(sink)]
        assert stamps == [[b"one"], [b"two"], [b"two"]]


# Filter modules outside the repo's import path: one that cannot even be imported, one whose
# filter fails to build in a way of its own.  Each is a config error, never the master's end.
BROKEN_PLUGINS = {
    "broken_syntax.py": "def oops(:\n",
    "broken_build.py": ("from ispmailgate_filters.base import Filter\n\n\n"
                        "class Faulty(Filter):\n"
                        "    @classmethod\n"
                        "    def from_options(cls, options, where, label=''):\n"
                        "        raise RuntimeError('no luck today')\n"),
    "broken_exit.py": "import sys\n\nsys.exit('this plugin gives up')\n",
    "broken_preload.py": ("from ispmailgate_filters.base import Filter\n\n\n"
                          "class Needy(Filter):\n"
                          "    lazy_modules = ('no_such_module_here',)\n"),
}


class PluginServer(Server):
    """A server whose PYTHONPATH also holds a folder of plugins."""

    def __init__(self, python: Path, config: str, plugins: Path) -> None:
        super().__init__(python, config)
        self.plugins = plugins

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PYTHONPATH"] += os.pathsep + str(self.plugins)
        return env


@pytest.mark.parametrize("kind, complaint", [
    ("broken_syntax:Any", "filter.bad.type: cannot load filter 'broken_syntax:Any' from broken_syntax:Any: "
                          "SyntaxError: invalid syntax"),
    ("broken_build:Faulty", "filter.bad: cannot build filter broken_build:Faulty: RuntimeError: no luck today"),
    ("broken_exit:Any", "SystemExit: this plugin gives up"),
    ("broken_preload:Needy", "No module named 'no_such_module_here'"),     # fails in preload()
])
def test_sighup_with_a_filter_that_fails_its_own_way_keeps_serving(python, sink, kind, complaint):
    drain(sink)
    plugins = shared_folder()
    for name, text in BROKEN_PLUGINS.items():
        (plugins / name).write_text(text)
    rules = f'mail_host = "{sink.address}"\n'
    try:
        with PluginServer(python, rules, plugins) as server:
            workers = wait_for_workers(server, 2)
            server.write_config(rules + f'default_filter = ["bad"]\n[filter.bad]\ntype = "{kind}"\n')
            check = run_gate(["check", "-c", str(server.config)], b"", env=server.env())
            assert check.code == 78 and complaint in check.stdout.decode(), check
            server.signal(signal.SIGHUP)
            assert server.wait_notice("RELOADING=1") and server.wait_notice("READY=1"), server.log()
            assert "reload refused, still serving the previous rule file" in server.log()
            assert complaint in server.log()
            run = server.client(["-f", "a@b.example", "c@d.example"], SIMPLE)
            assert run.code == 0, (run.stderr, server.log())
            assert server.process.poll() is None and server.workers() == workers
            assert server.socket.exists() and server.pidfile.exists()
    finally:
        shutil.rmtree(plugins)
    assert [m.content for m in drain(sink)] == [crlf(SIMPLE)]


def test_workers_are_recycled_after_max_requests(python, sink):
    drain(sink)
    config = f'mail_host = "{sink.address}"\n[serve]\nworkers = 1\nmax_requests = 3\nmax_requests_jitter = 0\n'
    with Server(python, config) as server:
        for _ in range(7):
            assert server.client(["-f", "a@b.example", "c@d.example"], SIMPLE).code == 0
        assert wait_for(lambda: server.log().count("exits after 3 messages") == 2, 30), server.log()
        served_by = re.findall(r"worker (\d+): pid=\d+ uid=0 exit=0", server.log())
        assert len(served_by) == 7 and len(set(served_by)) == 3
    assert len(drain(sink)) == 7


def test_daemon_mode_writes_and_removes_the_pid_file(python, sink):
    drain(sink)
    server = Server(python, f'mail_host = "{sink.address}"\n', args=("--daemon",))
    try:
        process = subprocess.run(server.command(), capture_output=True, env=server.env(), timeout=120)
        assert process.returncode == 0, process.stderr
        daemon = int(server.pidfile.read_text())
        assert b"serve" in Path(f"/proc/{daemon}/cmdline").read_bytes()
        assert os.getsid(daemon) != os.getsid(0)    # detached into a session of its own
        assert server.client(["-f", "a@b.example", "c@d.example"], SIMPLE).code == 0
        assert "serving on" in server.gate_log.read_text()          # the log_file: no stderr now
        os.kill(daemon, signal.SIGTERM)
        assert wait_for(lambda: not Path(f"/proc/{daemon}").exists(), 60)
        assert not server.pidfile.exists() and not server.socket.exists()
    finally:
        if server.pidfile.exists():                 # a failed test leaves no daemon behind
            os.kill(int(server.pidfile.read_text()), signal.SIGTERM)
        server.stop()
    assert len(drain(sink)) == 1


# -- boot errors stop the master ------------------------------------------------------------

def test_boot_errors_exit_78_without_forking(python):
    server = Server(python, "")
    try:
        server.socket.write_text("not a socket")
        process = subprocess.run(server.command(), capture_output=True, env=server.env(), timeout=120)
        assert (process.returncode, process.stderr.decode().strip()) == (
            78, f"ispmailgate serve: cannot start: {server.socket} exists and is not a socket")
        server.socket.unlink()
        server.write_config('mail_group = "no-such-group-here"\n')
        process = subprocess.run(server.command(), capture_output=True, env=server.env(), timeout=120)
        assert process.returncode == 78
        assert b"mail_group: no such group: 'no-such-group-here'" in process.stderr
        server.write_config('unknown_thing = 1\n')
        process = subprocess.run(server.command(), capture_output=True, env=server.env(), timeout=120)
        assert process.returncode == 78 and b"unknown_thing: unknown key" in process.stderr
    finally:
        server.stop()


def test_a_second_server_on_the_same_socket_is_refused(server):
    process = subprocess.run(server.command()[:-2] + ["--pidfile", str(server.folder / "other.pid")],
                             capture_output=True, env=server.env(), timeout=120)
    assert process.returncode == 78
    assert b"another server is listening on" in process.stderr
    assert server.client(["--version"], b"").code == 0


# -- systemd ------------------------------------------------------------------------------------

# What systemd does for a .socket unit: the socket as fd 3, LISTEN_PID and LISTEN_FDS set.
SOCKET_ACTIVATION = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
                     "os.environ['LISTEN_PID'] = str(os.getpid()); os.environ['LISTEN_FDS'] = '1'; "
                     "os.execv(sys.argv[2], sys.argv[2:])")


def test_systemd_socket_activation_uses_the_socket_it_is_handed(python, sink):
    drain(sink)
    server = Server(python, f'mail_host = "{sink.address}"\n')
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(server.socket))
    listener.listen(16)
    try:
        with open(server.server_log, "ab") as log:
            server.process = subprocess.Popen(
                [str(python), "-c", SOCKET_ACTIVATION, str(listener.fileno()), *server.command()],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=server.env(),
                pass_fds=(listener.fileno(),))
        assert server.wait_notice("READY=1"), server.log()
        assert server.client(["-f", "a@b.example", "c@d.example"], SIMPLE).code == 0
        server.signal(signal.SIGTERM)
        assert server.wait(60) == 0
        assert server.socket.exists()           # systemd's socket: left for the next start
    finally:
        listener.close()
        server.stop()
    assert len(drain(sink)) == 1


# -- frames read strictly (issue 14, finding 10) ------------------------------------------------

@pytest.mark.parametrize("context", [
    b"/tmp\x00" + b"1" * 5000 + b":2\x00",                  # the review: 5000 digits, "internal error"
    b"/tmp\x00" + "\u0661\u0662:\u0663".encode() + b"\x00",     # Arabic-Indic digits were accepted
    b"/tmp\x00" + b"1" * 21 + b":2\x00",                    # more than 2**64 has digits
    b"/tmp\x00 1:2\x00", b"/tmp\x001:+2\x00", b"/tmp\x00-1:2\x00", b"/tmp\x001:2:3\x00",
    b"/" + b"x" * 5000 + b"\x001:2\x00",                    # longer than PATH_MAX
    b"/tmp\x001:2\x00ISPMAILGATE_CONFIG=a\x00ISPMAILGATE_CONFIG=b\x00",
    b"/tmp\x001:2\x00PATH=/evil\x00", b"/tmp\x00", b"/tmp\x001:2",
])
def test_a_malformed_context_is_a_bad_request(context):
    from ispmailgate_core.serve.protocol import ClientContext, RequestError

    with pytest.raises(RequestError):
        ClientContext.decode(context)


def test_a_well_formed_context_is_read():
    from ispmailgate_core.serve.protocol import ClientContext

    context = ClientContext.decode(b"/home/ann\x0018446744073709551615:393220\x00ISPMAILGATE_CONFIG=r.toml\x00")
    assert context == ClientContext("/home/ann", (2 ** 64 - 1, 393220), "r.toml")
    assert ClientContext.decode(b"\x00\x00").dev_ino is None


@pytest.mark.parametrize("frames", [
    b"\x02" + frame(CONTEXT, b"/tmp\x00" + b"9" * 5000 + b":1\x00") + frame(ARGUMENTS, b""),
    b"\x02" + frame(CONTEXT, b"/tmp\x00" + b"9" * 5000 + b":1\x00"),     # and then the end: half a head
    b"\x02" + frame(b"Z", b"") + frame(ARGUMENTS, b""),
    b"\x02" + frame(CONTEXT, b"\x00\x00") + frame(ARGUMENTS, b"x" * (128 * 1024 + 1) + b"\x00"),
])
def test_the_server_answers_a_malformed_request_as_bad_not_internal(server, frames):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(60)
        connection.connect(str(server.socket))
        connection.sendall(frames)
        connection.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    assert reply[-1] == 75
    assert b"4.3.0 ispmailgate serve: bad request: " in reply and b"internal error" not in reply
