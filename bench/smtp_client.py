#!/usr/bin/env python3
"""The gate's own SMTP client against smtplib: peak memory and time to send one message.

    .venv/bin/python bench/smtp_client.py [--size 50] [--runs 3]

Each client runs in a process of its own (so its peak RSS is its own) and sends one
message of SIZE MiB (80-column text lines, LF line ends as an MTA hands them over, a few
lines starting with a dot) to a discarding SMTP server in this process.  smtplib is used
as a caller would: ``SMTP.sendmail`` with bytes, which converts line ends and dot-stuffs
the whole message before it sends.  Prints, per client, the median wall time and the
median peak RSS over ``--runs`` runs, and the RSS of the same process that only built the
message (the floor).  Why it matters: the gate holds a message of up to
max_message_size (50 MB by default) and must not need several more copies to send it.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import threading
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent

CLIENT = r"""
import resource, sys, time
sys.path.insert(0, sys.argv[1])
kind, port, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
line = b"%s\n" % (b"x" * 79)
data = bytearray(b"Subject: bench\n\n")
while len(data) < size:
    data += line
data += b".a line with a leading dot\n"     # kept a bytearray, as read_message gives it
started = time.monotonic()
if kind == "smtplib":
    import smtplib
    with smtplib.SMTP("127.0.0.1", port) as smtp:
        smtp.sendmail("a@example.org", ["b@example.net"], data)
elif kind == "gate":
    from ispmailgate_core.delivery.smtp import SmtpHop
    class Config:
        delivery_timeout, loop_suffix, helo_name = 60.0, "", "bench"
    replies = SmtpHop("127.0.0.1", port, Config()).deliver("a@example.org", ["b@example.net"], data)
    assert replies["b@example.net"].code == 250, replies
took = time.monotonic() - started
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def discarding_server() -> int:
    """A minimal SMTP server that accepts and discards every message."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def converse(client: socket.socket) -> None:
        with client, client.makefile("rb") as reader:
            client.sendall(b"220 bench\r\n")
            while line := reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    client.sendall(b"250-bench\r\n250-8BITMIME\r\n250 SIZE 1000000000\r\n")
                elif verb == b"DATA":
                    client.sendall(b"354 go\r\n")
                    while reader.readline() not in (b".\r\n", b""):
                        pass
                    client.sendall(b"250 2.0.0 discarded\r\n")
                elif verb == b"QUIT":
                    client.sendall(b"221 bye\r\n")
                    return
                else:
                    client.sendall(b"250 ok\r\n")

    def serve() -> None:
        while True:
            client, _ = server.accept()
            threading.Thread(target=converse, args=(client,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=50, help="message size in MiB")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    port = discarding_server()
    size = args.size * 1024 * 1024
    print(f"one message of {args.size} MiB, {args.runs} runs each, medians")
    for kind in ("none", "gate", "smtplib"):
        results = [subprocess.run([sys.executable, "-c", CLIENT, str(PROJECT), kind, str(port), str(size)],
                                  capture_output=True, text=True, check=True).stdout.split()
                   for _ in range(args.runs)]
        seconds = statistics.median(float(r[0]) for r in results)
        rss = statistics.median(int(r[1]) for r in results) / 1024
        label = {"none": "message only (floor)", "gate": "SmtpHop (the gate's)", "smtplib": "smtplib.sendmail"}
        print(f"{label[kind]:24} {seconds * 1000:8.0f} ms  peak RSS {rss:7.0f} MiB  "
              f"({rss / args.size:.1f}x the message)")


if __name__ == "__main__":
    main()
