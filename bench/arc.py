#!/usr/bin/env python3
"""What ARC sealing adds per message: median time of Sealer.seal on changed messages.

    .venv/bin/python bench/arc.py [--runs 50]

Seals a 5 KB and a 1 MB message (no DNS: the trusted Authentication-Results come with the
message, as from the MTA's verifier).  The first seal of a run also pays the import of
dkimpy; it is reported separately.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oneshot import small_message  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "arc.pem"
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
        key.chmod(0o600)
        started = time.perf_counter()
        from ispmailgate_core.arc import ArcSettings, Sealer
        settings = ArcSettings("gw.example.net", "arc1", key.read_bytes(), "mx.example.net", False, None)
        head = b"Authentication-Results: mx.example.net; dkim=pass header.d=example.org\n"
        messages = {"5 KB": head + small_message(),
                    "1 MB": head + small_message() + b"x" * 75 + b"\n" * 1 + (b"y" * 76 + b"\n") * 13500}
        Sealer(settings).seal(messages["5 KB"], messages["5 KB"], b"\n")
        print(f"first seal in a process (imports dkimpy): {(time.perf_counter() - started) * 1000:.1f} ms")
        for label, message in messages.items():
            times = []
            for _ in range(args.runs):
                sealer = Sealer(settings)
                started = time.perf_counter()
                sealer.seal(message, message, b"\n")
                times.append((time.perf_counter() - started) * 1000)
            print(f"seal {label:5} ({len(message)} bytes): median {statistics.median(times):.2f} ms "
                  f"over {args.runs} runs")


if __name__ == "__main__":
    main()
