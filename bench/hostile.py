#!/usr/bin/env python3
"""What hostile shapes cost: scaling of every parser entry point, and issue 14's findings
through the whole gate.

    .venv/bin/python bench/hostile.py [scaling] [gate] [--only WORD]

scaling: each parser entry point on the same construct at n and at 4n, in this process;
the CPU time of the best of three runs and the ratio.  A linear path costs about 4x, a
quadratic one 16x; the target is at most ~6x.

gate: issue 14's findings as messages through ``ispmailgate`` (this venv), each in its own
process: exit status, wall time, peak RSS, and peak RSS over the message size.  The
memory target: peak RSS at most 3x the message plus a fixed overhead (the dummy chain on a
small message, about 40 MB), for any nesting with any built-in chain.  The virscan cases
start a private clamd as the tests do (tests/clamav.py).

Measured on the 2-core development machine (issue 14), before -> after:

    scaling n -> 4n: folded header 22.9x -> 4.0x; encoded words 16.4x -> 4.0x; unclosed
    encoded words 15.9x -> 3.9x; RFC 2231 continuations 10.4x -> 4.1x; quoted semicolons
    15.7x -> 4.0x; many parameters 11.8x -> 4.3x; HTML <a without > 15.4x -> 3.6x; the
    others were linear and stay so (3.4x to 4.9x).

    case                                      seconds          peak RSS MiB
    F1 folded header 200k lines, dummy        1.67 -> 0.12     22 -> 26
    F1 folded header 600k lines, dummy        34.1 -> 0.22     28 -> 30
    F2 banner, 20 MB, 63 levels               7.47 -> 0.63     2470 -> 65
    F2 banner, 50 MB, 63 levels               22.4 -> 1.56     6312 -> 124
    F2 banner, 20 MB rfc822, 30 levels        1.65 -> 0.44     1884 -> 68
    F2 packer pos+neg, 50 MB, 63 levels       23.9 -> 2.46     6309 -> 175
    F2 virscan, 50 MB, 63 levels              17.9 -> 2.78     6309 -> 164
    F2 virscan, 47 MB, 8 base64 rfc822 levels 1.25 -> 1.13     549 -> 136
    F6 banner, HTML <a x 20k (60 KB)          29.5 -> 0.12     42 -> 24
    F6 banner, 7 MB Subject of encoded words  340.7 -> 2.48    208 -> 95
    F6 virscan, nested tar.gz 73^3 (3 KB)     39.3 -> 2.07     22 -> 25   (unscannable: max_objects)
    F6 virscan, 45 base64 rfc822 x 9,990      70.5 -> 0.83     47 -> 36   (unscannable: max_mime_parts)
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "tests"))
sys.path.insert(0, str(PROJECT / "bench"))

from support import costly  # noqa: E402

MB = 1024 * 1024


# -- scaling ---------------------------------------------------------------------------------

def scaling(only: str) -> None:
    print(f"{'entry point':28} {'n':>9} {'cost(n) s':>10} {'cost(4n) s':>11} {'ratio':>6}")
    for name, action, build, n in costly.ENTRY_POINTS:
        if only and only not in name:
            continue
        small, large = costly.cpu_seconds(action, build(n)), costly.cpu_seconds(action, build(4 * n))
        print(f"{name:28} {n:>9} {small:>10.4f} {large:>11.4f} {large / max(small, 1e-6):>6.1f}", flush=True)


# -- the whole gate ----------------------------------------------------------------------------

PROBE = """
import resource, subprocess, sys, time
with open(sys.argv[1], "rb") as stdin:
    started = time.monotonic()
    done = subprocess.run(sys.argv[2:], stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    took = time.monotonic() - started
line = (done.stderr.decode("utf-8", "replace").strip().splitlines() or [""])[0][:100]
print(done.returncode, round(took, 2), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, line, sep="\\t")
"""

PACKER = ('[filter.zip]\ntype = "packer"\ndirection = "pos"\ncodec = "gzip"\n'
          '[filter.unzip]\ntype = "packer"\ndirection = "neg"\n')
BANNER = ('[filter.b]\ntype = "banner"\ntext = "-- \\nvertraulich"\nhtml = "<p>vertraulich</p>"\n'
          'subject_prefix = "[EXTERN] "\n')


def gate_cases(clamd_socket: str | None) -> list[tuple[str, str, bytes]]:
    """(name, rule-file chain section, message)."""
    virscan = (f'[filter.v]\ntype = "virscan"\nsocket = "{clamd_socket}"\nclamd_config = ""\n'
               'on_unscannable = "tag"\n')
    cases = [
        ("F1 folded header 200k lines, dummy", "", costly.folded_header(200_000)),
        ("F1 folded header 600k lines, dummy", "", costly.folded_header(600_000)),
        ("F2 dummy, 50 MB attachment, 63 levels", "", costly.nested_multipart(63, 36 * MB)),
        ("F2 banner, 20 MB, 63 levels", BANNER, costly.nested_multipart(63, 14 * MB)),
        ("F2 banner, 50 MB, 63 levels", BANNER, costly.nested_multipart(63, 36 * MB)),
        ("F2 banner, 20 MB rfc822, 30 levels", BANNER, costly.nested_rfc822(30, 20 * MB)),
        ("F2 packer pos+neg, 50 MB, 63 levels", PACKER, costly.nested_multipart(63, 36 * MB)),
        ("F6 banner, HTML <a x 20k (60 KB)", BANNER, costly.html_open_tags(20_000)),
        ("F6 banner, 7 MB Subject of encoded words", BANNER, costly.encoded_subject(350_000)),
    ]
    if clamd_socket:
        cases += [
            ("F2 virscan, 50 MB, 63 levels", virscan, costly.nested_multipart(63, 36 * MB)),
            ("F2 virscan, 47 MB, 8 base64 rfc822 levels", virscan, costly.nested_base64_rfc822(8, 4 * MB)),
            ("F6 virscan, nested tar.gz 73^3 (3 KB)", virscan,
             costly.with_attachment("t.tar.gz", costly.nested_tar_gz(3, 73))),
            ("F6 virscan, 45 base64 rfc822 x 9,990 parts", virscan, costly.base64_messages(45, 9_990)),
        ]
    return cases


def gate(only: str, with_clamd: bool, binary: str) -> None:
    from oneshot import Sink

    daemon = None
    if with_clamd:
        from support.clamav import ClamdProcess

        daemon = ClamdProcess().start()
    try:
        with tempfile.TemporaryDirectory() as tmp, Sink() as sink:
            run_cases(Path(tmp), sink, daemon.socket if daemon else None, only, binary)
    finally:
        if daemon:
            daemon.remove()


def run_cases(tmp: Path, sink: str, clamd_socket: str | None, only: str, gate_binary: str) -> None:
    user = 'mail_user = "root"\n' if os.geteuid() == 0 else ""
    print(f"{'case':44} {'bytes':>9} {'exit':>4} {'seconds':>8} {'peak MiB':>9} {'RSS/size':>8}  first line")
    for name, section, data in gate_cases(clamd_socket):
        if only and only not in name:
            continue
        chains = {"banner": '["b"]', "virscan": '["v"]', "packer": '["zip", "unzip"]'}
        chain = next((chain for word, chain in chains.items() if word in name), '["dummy"]')
        config = tmp / "rules.toml"
        config.write_text(f'{user}tmp_dir = "{tmp}"\nmail_host = "{sink}"\ndefault_filter = {chain}\n'
                          + section)
        message = tmp / "message.eml"
        message.write_bytes(data)
        argv = [gate_binary, "-c", str(config), "-f", "a@b.example", "c@d.example"]
        out = subprocess.run([sys.executable, "-c", PROBE, str(message), *argv], capture_output=True,
                             text=True, check=True, timeout=1800).stdout.strip().split("\t")
        code, seconds, rss = int(out[0]), float(out[1]), int(out[2])
        print(f"{name:44} {len(data):>9} {code:>4} {seconds:>8.2f} {rss / 1024:>9.1f} "
              f"{rss * 1024 / len(data):>8.2f}  {out[3] if len(out) > 3 else ''}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", help="scaling, gate (default: both)")
    parser.add_argument("--only", default="", help="only the cases whose name contains this")
    parser.add_argument("--no-clamd", action="store_true", help="skip the virscan cases")
    parser.add_argument("--gate", default=str(Path(sys.executable).parent / "ispmailgate"),
                        help="the ispmailgate to run (default: this venv's)")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}")
    parts = args.parts or ["scaling", "gate"]
    if not set(parts) <= {"scaling", "gate"}:
        parser.error(f"unknown part: {', '.join(sorted(set(parts) - {'scaling', 'gate'}))}")
    if "scaling" in parts:
        scaling(args.only)
    if "gate" in parts:
        gate(args.only, not args.no_clamd, args.gate)


if __name__ == "__main__":
    main()
