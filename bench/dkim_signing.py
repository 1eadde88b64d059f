#!/usr/bin/env python3
"""What DKIM signing adds per message: median time of Signer.sign for a 5 KB and a 1 MB message.

    .venv/bin/python bench/dkim_signing.py [--runs 50]

Signs with an RSA-2048 key (rsa-sha256) and an Ed25519 key (ed25519-sha256), relaxed/relaxed,
the default header list, over the wire form as a run does (the line-end conversion counted).
The first signature of a process also pays the import of dkimpy (and its DNS library); it is
reported separately.  Also timed: the check that an unchanged message already carries the
table's own signature (one verification against the key itself, no DNS), and 1 MB messages
of the shapes dkimpy was quadratic or slow in (empty lines, a line of blanks).
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


def table(path: Path, algorithm: str):
    from ispmailgate_core.signing import load_section

    return load_section([{"domain": "example.org", "selector": "bench", "private_key_file": str(path),
                          "algorithm": algorithm}], "dkim")[0]


def median_ms(action, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rsa, ed = Path(tmp) / "rsa.pem", Path(tmp) / "ed.pem"
        subprocess.run(["openssl", "genrsa", "-out", str(rsa), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(ed)], check=True,
                       capture_output=True)
        rsa.chmod(0o600)
        ed.chmod(0o600)
        from ispmailgate_core.signing import Signer

        tables = {"rsa-sha256": table(rsa, "rsa-sha256"), "ed25519-sha256": table(ed, "ed25519-sha256")}
        small = small_message().replace(b"From: ", b"From: someone@example.org\nX-Old-From: ", 1)
        messages = {"5 KB": small, "1 MB": small + (b"y" * 76 + b"\n") * 13500}
        started = time.perf_counter()
        Signer(tuple(tables.values())).sign(small, small + b"x", b"\n", [tables["rsa-sha256"]])
        print(f"first signature in a process (imports dkimpy): {(time.perf_counter() - started) * 1000:.1f} ms")
        for algorithm, chosen in tables.items():
            signer = Signer((chosen,))
            for label, message in messages.items():
                changed = message + b"\n-- banner\n"
                ms = median_ms(lambda: signer.sign(message, changed, b"\n", [chosen]), args.runs)
                print(f"sign  {algorithm:14} {label:5} ({len(changed)} bytes): median {ms:.2f} ms over {args.runs} runs")
            signed, _ = signer.sign(messages["1 MB"], messages["1 MB"], b"\n", [chosen])
            ms = median_ms(lambda: signer.sign(signed, signed, b"\n", [chosen]), args.runs)
            print(f"found signed before {algorithm:14} 1 MB: median {ms:.2f} ms over {args.runs} runs")
        hostile(Signer((tables["rsa-sha256"],)), tables["rsa-sha256"], small, args.runs)


def hostile(signer, chosen, small: bytes, runs: int) -> None:
    """Shapes that were quadratic in dkimpy (see core/dkim_linear.py): 1 MB of each."""
    head = small.split(b"\n\n", 1)[0] + b"\n\n"
    shapes = {"empty lines": head + b"\n" * (1 << 20), "one line of blanks": head + b" " * (1 << 20) + b"x\n",
              "blank lines of blanks": head + b" \t \n" * (1 << 18)}
    for label, message in shapes.items():
        ms = median_ms(lambda: signer.sign(message, message + b"x", b"\n", [chosen]), runs)
        print(f"sign  rsa-sha256     1 MB of {label}: median {ms:.2f} ms over {runs} runs")


if __name__ == "__main__":
    main()
