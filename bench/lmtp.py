#!/usr/bin/env python3
"""One-shot, client + serve, and LMTP into serve, side by side in one run.

    .venv/bin/python bench/lmtp.py [--messages 200] [--chain dummy|virscan] [--workers 2] [--venv DIR]

Measures a fresh, regular (non-editable) install in a temporary venv (as bench/oneshot.py
does), on the same 5 KB message, delivered by SMTP to a local sink, with 1 and 2
concurrent senders:

- one-shot: ``ispmailgate`` started per message, as a pipe(8) transport runs it;
- client + serve: ``ispmailgate-client`` started per message, handing it to ``serve``
  (and, for comparison, the same client started as before issue 18: the interpreter with
  its site module, as a console script starts it);
- LMTP: sender threads in this process speak LMTP to ``serve`` over its Unix socket, one
  connection each, reused for every message (as Postfix's lmtp(8) with its connection
  cache); the sender's own CPU is the MTA's, not counted.

For each: messages per second, and CPU ms per message across every gateway process --
the processes started per message (getrusage of reaped children) plus the server's
master, doorkeeper and workers (/proc/PID/stat, with what they reaped).  With
``--chain virscan`` a private clamd is started as the tests start it (two test signatures):
its CPU is counted apart, as "clamd ms".

Targets (issue 18): LMTP with the dummy chain at most 5 ms CPU per message and at least 4x
the messages per second of client + serve; the client at most 12 ms CPU per message.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from oneshot import Sink, regular_install, small_message  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def process_tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and its living descendants, with what each has reaped."""
    total, parents = 0.0, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / TICK)
    wanted = {root}
    changed = True
    while changed:
        changed = False
        for pid, (parent, _) in parents.items():
            if parent in wanted and pid not in wanted:
                wanted.add(pid)
                changed = True
    return total + sum(cpu for pid, (_, cpu) in parents.items() if pid in wanted)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def write_config(tmp: Path, sink: str, workers: int, chain: str, clamd: str | None) -> Path:
    config = tmp / "rules.toml"
    text = (f'tmp_dir = "{tmp / "spool"}"\nmail_host = "{sink}"\nloop_suffix = ""\n'
            f'default_filter = ["{"scan" if clamd else chain}"]\n')
    if os.geteuid() == 0:
        text += 'mail_user = "nobody"\nmail_group = "nogroup"\n'
    if clamd:
        text += f'[filter.scan]\ntype = "virscan"\nsocket = "{clamd}"\n'
    text += (f'[serve]\nsocket = "{tmp / "s.sock"}"\nlmtp = "unix:{tmp / "l.sock"}"\nworkers = {workers}\n'
             "max_requests = 0\n")
    config.write_text(text)
    config.chmod(0o644)
    return config


def start_server(venv_bin: Path, config: Path, lmtp: Path) -> subprocess.Popen:
    log = config.parent / "serve.log"       # a file: a pipe nobody reads would stop the server once full
    with open(log, "wb") as output:
        server = subprocess.Popen([str(venv_bin / "ispmailgate"), "serve", "-c", str(config)],
                                  stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX) as probe:
            if probe.connect_ex(str(lmtp)) == 0 and probe.recv(100).startswith(b"220"):
                return server
        if server.poll() is not None:
            raise SystemExit(f"serve exited {server.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    raise SystemExit("serve did not start within 60 s")


def in_parallel(senders: int, total: int, send) -> None:
    """``send(count)`` in ``senders`` threads, ``total`` messages in all."""
    failures: list[str] = []

    def run(count: int) -> None:
        try:
            send(count)
        except Exception as error:      # noqa: BLE001 -- reported below
            failures.append(repr(error))

    shares = [total // senders + (i < total % senders) for i in range(senders)]
    threads = [threading.Thread(target=run, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"{len(failures)} senders failed: {failures[0]}")


def by_process(argv: list[str], message: Path):
    def send(count: int) -> None:
        for _ in range(count):
            with open(message, "rb") as stdin:
                result = subprocess.run(argv, stdin=stdin, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"{argv[0]} exited {result.returncode}: {result.stderr.decode()[:300]}")
    return send


def by_lmtp(path: Path, data: bytes):
    stuffed = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")
    transaction = (b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
                   + stuffed + b".\r\n")

    def send(count: int) -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            replies = sock.makefile("rb")
            replies.readline()
            sock.sendall(b"LHLO bench.example\r\n")
            while replies.readline()[3:4] == b"-":
                pass
            for _ in range(count):
                sock.sendall(transaction)
                for _ in range(4):          # MAIL, RCPT, 354, the recipient's status
                    line = replies.readline()
                    if not line[:1] in (b"2", b"3"):
                        raise RuntimeError(f"LMTP: {line!r}")
            sock.sendall(b"QUIT\r\n")
    return send


def measure(label: str, send, senders: int, total: int, server: int, clamd: int | None) -> tuple:
    before = (time.perf_counter(), children_cpu(), process_tree_cpu(server),
              process_tree_cpu(clamd) if clamd else 0.0)
    in_parallel(senders, total, send)
    after = (time.perf_counter(), children_cpu(), process_tree_cpu(server),
             process_tree_cpu(clamd) if clamd else 0.0)
    elapsed, spawned, served, scanner = (b - a for a, b in zip(before, after))
    return (label, senders, total / elapsed, (spawned + served) * 1000 / total, spawned * 1000 / total,
            scanner * 1000 / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--messages", type=int, default=200, help="messages per measurement")
    parser.add_argument("--chain", choices=("dummy", "virscan"), default="dummy")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--venv", type=Path, help="measure this venv instead of a fresh install")
    args = parser.parse_args()
    daemon = None
    if args.chain == "virscan":
        from support.clamav import ClamdProcess

        daemon = ClamdProcess(LocalSocketMode="666").start()
        Path(daemon.home).chmod(0o755)          # the workers (nobody) connect to it
    try:
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp, Sink() as sink:
            rows = run(Path(tmp), sink, args, daemon)
    finally:
        if daemon is not None:
            daemon.stop()
    report(rows, args)


def run(tmp: Path, sink: str, args, daemon) -> list[tuple]:
    tmp.chmod(0o755)                    # the workers (nobody) read the venv and write tmp_dir
    venv_bin = args.venv / "bin" if args.venv else regular_install(tmp / "venv")
    (tmp / "spool").mkdir(mode=0o777)
    (tmp / "spool").chmod(0o777)
    message = tmp / "small.eml"
    message.write_bytes(small_message())
    config = write_config(tmp, sink, args.workers, args.chain, daemon.socket if daemon else None)
    envelope = ["-f", "alice@example.org", "bob@example.com"]
    one_shot = [str(venv_bin / "ispmailgate"), "-c", str(config), *envelope]
    client = [str(venv_bin / "ispmailgate-client"), "--socket", str(tmp / "s.sock"), "-c", str(config), *envelope]
    before = [str(venv_bin / "python3"), "-c", "import sys; from ispmailgate_client import main; sys.exit(main())"]
    server = start_server(venv_bin, config, tmp / "l.sock")
    clamd = daemon.process.pid if daemon else None
    n = args.messages
    try:
        rows = []
        for senders in (1, 2):
            rows.append(measure("one-shot", by_process(one_shot, message), senders, max(10, n // 4),
                                server.pid, clamd))
            rows.append(measure("client + serve", by_process(client, message), senders, n, server.pid, clamd))
            if senders == 1:        # the client as it started before issue 18: with the site module
                rows.append(measure("(client with site)", by_process(before + client[1:], message), senders, n,
                                    server.pid, clamd))
            rows.append(measure("LMTP into serve", by_lmtp(tmp / "l.sock", message.read_bytes()), senders, n,
                                server.pid, clamd))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    return rows


def report(rows: list[tuple], args) -> None:
    print(f"5 KB message, {args.chain} chain, SMTP sink, {args.workers} workers, "
          f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    print(f"{'':18} {'senders':>7} {'msg/s':>8} {'CPU ms/msg':>11} {'of which':>9} {'clamd ms':>9}")
    print(f"{'':18} {'':>7} {'':>8} {'(gateway)':>11} {'per-msg':>9} {'':>9}")
    for label, senders, rate, cpu, spawned, scanner in rows:
        print(f"{label:18} {senders:>7} {rate:>8.1f} {cpu:>11.2f} {spawned:>9.2f} {scanner:>9.2f}")
    print("\n(per-msg: the CPU of the processes started per message -- one-shot runs, clients)")


if __name__ == "__main__":
    main()
