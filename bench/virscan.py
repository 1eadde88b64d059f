#!/usr/bin/env python3
"""Scan time per MB through a real clamd, and what virscan adds around it.

    .venv/bin/python bench/virscan.py [--runs 5]

Starts a private clamd as the tests do (tests/clamav.py: two test signatures, so this
measures clamd's scanning engine and the INSTREAM transfer, not the loading of a full
signature database), then prints the median time of:

- one zINSTREAM of random bytes, of base64 text and of zeros, at several sizes (MB/s);
- 1,000 tiny objects, one connection each (the per-object overhead);
- virscan's whole inspection of a message with a 10 MB zip attachment of 100 members.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "tests"))

from support.attacks import message, zip_of  # noqa: E402
from support.clamav import ClamdProcess  # noqa: E402
from ispmailgate_filters.base import Context, Envelope  # noqa: E402
from ispmailgate_filters.mime import Message  # noqa: E402
from ispmailgate_filters.virscan.scanners import Clamd  # noqa: E402
from ispmailgate_filters.virscan import VirScan  # noqa: E402

MB = 1024 * 1024


def median_seconds(action, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def samples(size: int) -> dict[str, bytes]:
    random = os.urandom(size)
    return {"random": random, "base64 text": base64.encodebytes(random)[:size], "zeros": bytes(size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    daemon = ClamdProcess(StreamMaxLength="100M", MaxFileSize="100M", MaxScanSize="400M").start()
    try:
        clamd = Clamd(daemon.socket, tcp=False, timeout=120, max_stream=100 * MB)
        print(f"clamd {clamd.command('VERSION')}, {os.cpu_count()} CPUs, median of {runs} runs")
        for size in (1 * MB, 10 * MB, 25 * MB):
            for kind, data in samples(size).items():
                seconds = median_seconds(lambda: clamd.instream(data), runs)
                print(f"  INSTREAM {size // MB:>3} MB {kind:<12} {seconds * 1000:8.1f} ms"
                      f"  {seconds / (size / MB) * 1000:6.1f} ms/MB  {size / MB / seconds:7.1f} MB/s")
        tiny = [os.urandom(200) for _ in range(1000)]
        seconds = median_seconds(lambda: [clamd.instream(blob) for blob in tiny], runs)
        print(f"  1,000 objects of 200 bytes: {seconds * 1000:.0f} ms ({seconds:.2f} ms per object)")
        inspect_message(daemon, runs)
    finally:
        daemon.remove()


def inspect_message(daemon: ClamdProcess, runs: int) -> None:
    members = {f"file{i}.bin": os.urandom(100 * 1024) for i in range(100)}
    data = message(("big.zip", "application/zip", zip_of(members)))
    scan = VirScan(socket=daemon.socket)
    with tempfile.TemporaryDirectory(dir="/tmp") as work:
        context = Context(Envelope("a@example.org", ("b@example.com",)), message_id="BENCH",
                          log=logging.getLogger("bench"), workdir=lambda: Path(work), postmaster="postmaster")
        seconds = median_seconds(lambda: scan.process(Message(data), context), runs)
    print(f"  virscan on a {len(data) / MB:.1f} MB message (zip of 100 x 100 KB): {seconds * 1000:.0f} ms")


if __name__ == "__main__":
    main()
