#!/usr/bin/env python3
"""One-shot vs served ispmailgate, side by side in one run.

    .venv/bin/python bench/serve.py [--runs 31] [--messages 60] [--workers 2] [--venv DIR]

Measures a fresh, regular (non-editable) install in a temporary venv, as bench/oneshot.py
does (an editable install recompiles the sources on every start where
PYTHONDONTWRITEBYTECODE is set).  A 5 KB message, the dummy chain, delivery by SMTP to a
local sink.  Prints the median wall time per message of the one-shot ``ispmailgate`` and
of ``ispmailgate-client`` talking to ``ispmailgate serve`` (both as the MTA runs them: a
new process per message), then throughput (messages/s) of the one-shot run done
sequentially and of the served run with 1, 2 and 8 concurrent clients.
Targets (issue 5): served <= 1/3 of one-shot per message; served throughput with 2
workers >= 4x one-shot sequential.  Run as root, the workers drop to nobody/nogroup; the
one-shot baseline names mail_user = "root", as bench/oneshot.py does (see write_configs).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oneshot import Sink, median_ms, regular_install, small_message  # noqa: E402


def write_configs(tmp: Path, sink: str, sock: Path, workers: int) -> tuple[Path, Path]:
    """The server's rule file (workers as nobody) and the one-shot baseline's."""
    common = f'tmp_dir = "{tmp / "spool"}"\nmail_host = "{sink}"\ndefault_filter = ["dummy"]\n'
    served, one_shot = tmp / "serve.toml", tmp / "oneshot.toml"
    served.write_text(common + 'mail_user = "nobody"\nmail_group = "nogroup"\n'
                      f'[serve]\nsocket = "{sock}"\nworkers = {workers}\n')
    # As root, name root, as bench/oneshot.py does: the MTA's usual path.  With nobody, a
    # one-shot run on an interpreter nobody cannot read (under /root) would import
    # everything before it drops privileges, and the baseline would be inflated.
    one_shot.write_text(common + ('mail_user = "root"\n' if os.geteuid() == 0 else ""))
    for path in (served, one_shot):
        path.chmod(0o644)
    return served, one_shot


def start_server(venv_bin: Path, config: Path, sock: Path) -> subprocess.Popen:
    server = subprocess.Popen([str(venv_bin / "ispmailgate"), "serve", "-c", str(config)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sock.exists():
            with socket.socket(socket.AF_UNIX) as probe:
                if probe.connect_ex(str(sock)) == 0:
                    probe.sendall(b"\x01A\x00\x00\x00\x0a--version\x00")     # a well-formed request
                    probe.recv(4096)
                    return server
        if server.poll() is not None:
            raise SystemExit(f"serve exited {server.returncode}: {server.stderr.read().decode()}")
        time.sleep(0.05)
    raise SystemExit("serve did not start within 60 s")


def throughput(argv: list[str], message: Path, clients: int, total: int) -> float:
    """Messages per second with ``clients`` processes handing in ``total`` messages."""
    failures = []

    def client(count: int) -> None:
        for _ in range(count):
            with open(message, "rb") as stdin:
                result = subprocess.run(argv, stdin=stdin, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, check=False)
            if result.returncode != 0:
                failures.append(result.stderr.decode()[:300])

    shares = [total // clients + (i < total % clients) for i in range(clients)]
    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(f"{len(failures)} failed: {failures[0]}")
    return total / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--runs", type=int, default=31, help="sequential runs for the medians")
    parser.add_argument("--messages", type=int, default=60, help="messages per throughput run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--venv", type=Path, help="measure this venv instead of a fresh install")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp, Sink() as sink:
        tmp = Path(tmp)
        tmp.chmod(0o755)                    # the workers (nobody) read the venv and write tmp_dir
        venv_bin = args.venv / "bin" if args.venv else regular_install(tmp / "venv")
        sock, message = tmp / "s.sock", tmp / "small.eml"
        (tmp / "spool").mkdir(mode=0o777)
        (tmp / "spool").chmod(0o777)
        message.write_bytes(small_message())
        config, one_shot_config = write_configs(tmp, sink, sock, args.workers)
        envelope = ["-f", "alice@example.org", "bob@example.com"]
        one_shot = [str(venv_bin / "ispmailgate"), "-c", str(one_shot_config), *envelope]
        served = [str(venv_bin / "ispmailgate-client"), "--socket", str(sock), "-c", str(config), *envelope]
        server = start_server(venv_bin, config, sock)
        try:
            rows = [("python -c pass", median_ms([str(venv_bin / "python"), "-c", "pass"], message, args.runs)),
                    ("ispmailgate (one-shot)", median_ms(one_shot, message, args.runs)),
                    ("ispmailgate-client (served)", median_ms(served, message, args.runs))]
            rates = [("one-shot, sequential", 1, throughput(one_shot, message, 1, args.messages // 2))]
            rates += [(f"served, {n} concurrent", n, throughput(served, message, n, args.messages))
                      for n in (1, 2, 8)]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    report(rows, rates, args)


def report(rows, rates, args) -> None:
    one_shot_ms = rows[1][1]
    print(f"{'per message (5 KB, dummy, SMTP sink)':40} {'median ms':>10} {'/ one-shot':>11}")
    for label, ms in rows:
        print(f"{label:40} {ms:>10.1f} {ms / one_shot_ms:>11.2f}")
    base = rates[0][2]
    print(f"\n{'throughput':40} {'msgs/s':>10} {'x one-shot':>11}")
    for label, _, rate in rates:
        print(f"{label:40} {rate:>10.1f} {rate / base:>11.2f}")
    print(f"\nmachine: {os.cpu_count()} cores, python {sys.version.split()[0]}, workers={args.workers}, "
          f"runs={args.runs}, messages={args.messages}")


if __name__ == "__main__":
    main()
