#!/usr/bin/env python3
"""Time the smime filter: encrypt and decrypt a 10 KB and a 5 MB message, beside plain openssl.

    .venv/bin/python bench/smime.py [--runs 9]

A private CA and RSA 2048 keys made by openssl (tests/smime_keys.py).  For each size it
prints the median wall and CPU time of: the filter step in this process (encrypt with
AES-256-CBC through cryptography; with AES-256-GCM through openssl; encrypt and sign;
decrypt; decrypt and verify the signature inside, which runs openssl), plain ``openssl
cms`` doing the same on the same bytes (the floor), and the whole one-shot command line
(``ispmailgate --stdout``, interpreter start and imports included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "tests"))
sys.path.insert(0, str(PROJECT / "bench"))

from pgp import median_ms, message, one_shot  # noqa: E402  (same messages, same clock as bench/pgp.py)
from support.smime_keys import Pki  # noqa: E402  (the tests' keys, shared on purpose)

from ispmailgate_filters.base import Context, Envelope  # noqa: E402
from ispmailgate_filters.mime import Message  # noqa: E402
from ispmailgate_filters.smime import Smime  # noqa: E402


def step(smime: Smime, data: bytes, workdir: Path) -> bytes:
    import logging

    ctx = Context(Envelope("alice@a.example", ("user@b.example",)), message_id="BENCH",
                  log=logging.getLogger("bench"), workdir=lambda: workdir, postmaster="postmaster")
    msg = Message(data)
    smime.process(msg, ctx)
    assert msg.changed
    return bytes(msg.to_bytes())


def openssl(*args, data: bytes) -> bytes:
    done = subprocess.run(["openssl", "cms", *map(str, args)], input=data, capture_output=True, check=True)
    return done.stdout


def config(work: Path, name: str, options: dict) -> Path:
    path = work / f"{name}.toml"
    user = 'mail_user = "root"\n' if os.geteuid() == 0 else ""
    table = "".join(f"{key} = {json.dumps(value)}\n" for key, value in options.items())
    path.write_text(f'{user}tmp_dir = "{work}"\ndefault_filter = ["gw"]\n[filter.gw]\ntype = "smime"\n{table}')
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    runs = parser.parse_args().runs
    keys, work = Pki(), Path(tempfile.mkdtemp(prefix="smime-bench-"))
    b, a = keys.gateway_b, keys.gateway_a
    outgoing = {"direction": "pos", "recipient_cert": str(b.cert)}
    incoming = {"direction": "neg", "key_file": str(b.key), "cert_file": str(b.cert),
                "trust_store": str(keys.trust_store)}
    signing = {**outgoing, "sign": True, "key_file": str(a.key), "cert_file": str(a.cert)}
    try:
        steps = {name: Smime.from_options(options, "bench") for name, options in {
            "encrypt": outgoing, "encrypt-gcm": {**outgoing, "cipher": "aes256-gcm"}, "encrypt+sign": signing,
            "decrypt": incoming}.items()}
        enc, dec = config(work, "encrypt", outgoing), config(work, "decrypt", incoming)
        version = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.split()[1]
        print(f"OpenSSL {version}, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, median of {runs} runs, "
              "milliseconds as wall / CPU")
        print(f"{'size':>8} {'operation':<16} {'filter step':>14} {'openssl cms':>14} {'one-shot CLI':>14}")
        for size in (10 * 1024, 5 * 1024 * 1024):
            data = message(size)
            encrypted = step(steps["encrypt"], data, work)
            signed = step(steps["encrypt+sign"], data, work)
            der = Message(encrypted).root.decoded()
            rows = [
                ("encrypt", lambda: step(steps["encrypt"], data, work),
                 lambda: openssl("-encrypt", "-binary", "-outform", "DER", "-aes-256-cbc", b.cert, data=data),
                 lambda: one_shot(enc, data)),
                ("encrypt gcm", lambda: step(steps["encrypt-gcm"], data, work),
                 lambda: openssl("-encrypt", "-binary", "-outform", "DER", "-aes-256-gcm", b.cert, data=data), None),
                ("encrypt+sign", lambda: step(steps["encrypt+sign"], data, work), None, None),
                ("decrypt", lambda: step(steps["decrypt"], encrypted, work),
                 lambda: openssl("-decrypt", "-binary", "-inform", "DER", "-recip", b.cert, "-inkey", b.key,
                                 data=der),
                 lambda: one_shot(dec, encrypted)),
                ("decrypt+verify", lambda: step(steps["decrypt"], signed, work), None, None),
            ]
            for name, filtered, plain, cli in rows:
                cells = [median_ms(f, runs) if f else None for f in (filtered, plain, cli)]
                print(f"{size // 1024:>6}KB {name:<16} " + " ".join(
                    f"{c[0]:>7.0f} /{c[1]:>5.0f}" if c else f"{'-':>14}" for c in cells))
    finally:
        keys.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
