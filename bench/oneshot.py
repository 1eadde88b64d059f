#!/usr/bin/env python3
"""One-shot cost of ispmailgate, side by side with its floors, in one run.

    .venv/bin/python bench/oneshot.py [--runs 21] [--venv DIR]

By default it measures a fresh, regular (non-editable) install in a temporary venv, as an
administrator would have it: an editable install adds an import hook to every interpreter
start and, where PYTHONDONTWRITEBYTECODE is set, recompiles the sources on every run.
Prints the median wall time of: ``cat`` (the floor of any pipe filter), a bare ``python -c
pass`` from the same venv (the interpreter floor), and ``ispmailgate`` with the dummy chain
on a small (5 KB) and a large (20 MB attachment) message, writing to stdout and to a local
SMTP sink; and the peak RSS of each.  Targets (issue 2): small one-shot <= 8x bare python;
large peak RSS <= 2.5x the message size.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent

RSS_PROBE = """
import resource, subprocess, sys
with open(sys.argv[1], "rb") as stdin:
    subprocess.run(sys.argv[2:], stdin=stdin, stdout=subprocess.DEVNULL, check=False)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def small_message() -> bytes:
    words = "the quick brown fox jumps over a lazy dog while mail flows through gates".split()
    rng = random.Random(5)
    lines = [" ".join(rng.choice(words) for _ in range(11)) for _ in range(70)]
    body = "\n".join(lines) + "\n"
    head = ("From: Alice <alice@example.org>\nTo: Bob <bob@example.com>\nSubject: a small message\n"
            "Date: Thu, 26 Nov 2026 10:00:00 +0000\nMessage-ID: <bench-small@example.org>\n"
            "MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\n")
    return (head + body).encode()


def large_message() -> bytes:
    payload = random.Random(20).randbytes(20 * 1024 * 1024)
    encoded = base64.encodebytes(payload)
    return (b"From: Alice <alice@example.org>\nTo: Bob <bob@example.com>\nSubject: a large attachment\n"
            b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b1\"\n\n--b1\n"
            b"Content-Type: text/plain\n\nsee attachment\n--b1\nContent-Type: application/octet-stream\n"
            b"Content-Transfer-Encoding: base64\nContent-Disposition: attachment; filename=\"data.bin\"\n\n"
            + encoded + b"--b1--\n")


def median_ms(argv: list[str], stdin_path: Path, runs: int) -> float:
    times = []
    for _ in range(runs):
        with open(stdin_path, "rb") as stdin:
            started = time.perf_counter()
            result = subprocess.run(argv, stdin=stdin, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, check=False)
            times.append((time.perf_counter() - started) * 1000)
        if result.returncode != 0:
            raise SystemExit(f"{argv} exited {result.returncode}: {result.stderr.decode()[:300]}")
    return statistics.median(times)


def peak_rss_kib(argv: list[str], stdin_path: Path) -> int:
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(stdin_path), *argv],
                         capture_output=True, check=True)
    return int(out.stdout)


class Sink:
    """A local SMTP sink that accepts and forgets, as fast as the socket allows.

    Not aiosmtpd: it reads DATA line by line in Python and would be what the large message
    measures.  This one answers each command and reads DATA in 1 MB chunks until the final
    dot, in a thread of this process.
    """

    def __enter__(self) -> str:
        import socket
        import threading

        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        threading.Thread(target=self._serve, daemon=True).start()
        return f"127.0.0.1:{self.server.getsockname()[1]}"

    def _serve(self) -> None:
        import threading

        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(connection,), daemon=True).start()

    @staticmethod
    def _session(connection) -> None:
        import socket

        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with connection:
            connection.sendall(b"220 sink ESMTP\r\n")
            pending = b""
            while True:
                chunk = connection.recv(1 << 20)
                if not chunk:
                    return
                pending += chunk
                while b"\r\n" in pending:
                    line, pending = pending.split(b"\r\n", 1)
                    verb = line[:4].upper()
                    if verb == b"DATA":
                        connection.sendall(b"354 go on\r\n")
                        while not (b"\r\n" + pending).endswith(b"\r\n.\r\n"):
                            more = connection.recv(1 << 20)
                            if not more:
                                return
                            pending = pending[-4:] + more
                        pending = b""
                        connection.sendall(b"250 2.0.0 ok\r\n")
                    elif verb == b"QUIT":
                        connection.sendall(b"221 bye\r\n")
                        return
                    elif verb == b"EHLO":
                        connection.sendall(b"250-sink\r\n250-8BITMIME\r\n250 SIZE\r\n")
                    else:
                        connection.sendall(b"250 ok\r\n")

    def __exit__(self, *exc) -> None:
        self.server.close()


def regular_install(target: Path) -> Path:
    """A fresh venv with the project installed as a user would install it."""
    subprocess.run(["python3", "-m", "venv", str(target)], check=True)
    subprocess.run([str(target / "bin" / "pip"), "install", "-q", str(PROJECT)], check=True)
    return target / "bin"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--venv", type=Path, help="measure this venv instead of a fresh install")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Sink() as sink:
        tmp = Path(tmp)
        venv_bin = args.venv / "bin" if args.venv else regular_install(tmp / "venv")
        config = tmp / "bench.toml"
        # As root, name root explicitly: the path measured is then the MTA's usual one
        # (Postfix's pipe(8) never runs a command as root), without a privilege drop.
        user = 'mail_user = "root"\n' if os.geteuid() == 0 else ""
        config.write_text(f'{user}tmp_dir = "{tmp}"\nmail_host = "{sink}"\ndefault_filter = ["dummy"]\n')
        config.chmod(0o644)
        messages = {"small": tmp / "small.eml", "large": tmp / "large.eml"}
        messages["small"].write_bytes(small_message())
        messages["large"].write_bytes(large_message())
        gate = [str(venv_bin / "ispmailgate"), "-c", str(config), "-f", "alice@example.org"]
        rows = []
        for size_name, path in messages.items():
            runs = args.runs if size_name == "small" else max(5, args.runs // 3)
            size = path.stat().st_size
            cases = [("cat", ["cat"]),
                     ("python -c pass", [str(venv_bin / "python"), "-c", "pass"]),
                     ("ispmailgate --stdout", gate + ["--stdout", "bob@example.com"]),
                     ("ispmailgate -> smtp", gate + ["bob@example.com"])]
            for label, argv in cases:
                rows.append((size_name, size, label, median_ms(argv, path, runs), peak_rss_kib(argv, path)))
    floor = {s: ms for s, _, label, ms, _ in rows if label == "python -c pass"}
    print(f"{'message':8} {'bytes':>10} {'command':24} {'median ms':>10} {'x python':>9} "
          f"{'peak RSS MiB':>13} {'RSS/size':>9}")
    for size_name, size, label, ms, rss in rows:
        print(f"{size_name:8} {size:>10} {label:24} {ms:>10.1f} {ms / floor[size_name]:>9.2f} "
              f"{rss / 1024:>13.1f} {rss * 1024 / size:>9.2f}")
    print(f"\nmachine: {os.cpu_count()} cores, python {sys.version.split()[0]}, runs={args.runs}")


if __name__ == "__main__":
    main()
