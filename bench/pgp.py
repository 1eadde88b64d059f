#!/usr/bin/env python3
"""Time the pgp filter: encrypt and decrypt a 10 KB and a 5 MB message, with a real gpg.

    .venv/bin/python bench/pgp.py [--runs 9]

Throwaway ed25519/cv25519 keys in temporary homes (the receiving gateway's secret key
protected by a passphrase, as in production).  For each size it prints the median wall
time of: the filter step in this process (encrypt to the gateway key; encrypt and sign;
decrypt; decrypt and verify), the same work by plain ``gpg`` on the same bytes (the floor),
and the whole one-shot command line (``ispmailgate --stdout``, interpreter start included).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "tests"))

from support.pgp_keys import World  # noqa: E402  (the tests' key fixture, shared on purpose)

from ispmailgate_filters.base import Context, Envelope  # noqa: E402
from ispmailgate_filters.mime import Message  # noqa: E402
from ispmailgate_filters.pgp import Pgp  # noqa: E402


def message(size: int) -> bytes:
    """A text part and a base64 attachment, ``size`` bytes in all."""
    head = (b"From: Alice <alice@a.example>\nTo: Bob <user@b.example>\nSubject: bench\n"
            b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b1\"\n\n--b1\n"
            b"Content-Type: text/plain\n\nsee attachment\n--b1\nContent-Type: application/octet-stream\n"
            b"Content-Transfer-Encoding: base64\n\n")
    payload = base64.encodebytes(random.Random(size).randbytes((size - len(head) - 8) * 3 // 4))
    return head + payload + b"--b1--\n"


def median_ms(action, runs: int) -> tuple[float, float]:
    """Median wall time and median CPU time (this process and its gpg children) in ms.

    CPU time hardly moves when other work shares the machine; gpg-agent (a daemon, not
    a child) is not counted, but it only unwraps the session key.
    """
    walls, cpus = [], []
    for _ in range(runs):
        cpu, started = _cpu(), time.perf_counter()
        action()
        walls.append((time.perf_counter() - started) * 1000)
        cpus.append((_cpu() - cpu) * 1000)
    return statistics.median(walls), statistics.median(cpus)


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def step(pgp: Pgp, data: bytes, workdir: Path) -> bytes:
    ctx = Context(Envelope("alice@a.example", ("user@b.example",)), message_id="BENCH",
                  log=logging.getLogger("bench"), workdir=lambda: workdir, postmaster="postmaster")
    msg = Message(data)
    pgp.process(msg, ctx)
    assert msg.changed
    return bytes(msg.to_bytes())


def one_shot(config: Path, data: bytes) -> None:
    gate = Path(sys.executable).parent / "ispmailgate"
    done = subprocess.run([str(gate), "-c", str(config), "--stdout", "-f", "a@a.example", "user@b.example"],
                          input=data, capture_output=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"ispmailgate exited {done.returncode}: {done.stderr.decode()[:300]}")


def config(work: Path, name: str, table: str) -> Path:
    path = work / f"{name}.toml"
    # as root, name root: the key rings are root's, and the path measured is the MTA's
    # usual unprivileged one, without a privilege drop (see bench/oneshot.py)
    user = 'mail_user = "root"\n' if os.geteuid() == 0 else ""
    path.write_text(f'{user}tmp_dir = "{work}"\ndefault_filter = ["gw"]\n[filter.gw]\ntype = "pgp"\n{table}')
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    runs = parser.parse_args().runs
    world, work = World(), Path(tempfile.mkdtemp(prefix="pgp-bench-"))
    try:
        passphrase = f'[filter.gw.passphrases]\n"gw@b.example" = {json.dumps(World.B_PASSPHRASE)}\n'
        enc = config(work, "encrypt", f'direction = "pos"\nuid = "{World.B_UID}"\ngnupghome = "{world.sending}"\n')
        dec = config(work, "decrypt", f'direction = "neg"\ngnupghome = "{world.receiving}"\n' + passphrase)
        steps = {name: Pgp.from_options(options, "bench") for name, options in {
            "encrypt": {"direction": "pos", "uid": World.B_UID, "gnupghome": str(world.sending)},
            "encrypt+sign": {"direction": "pos", "uid": World.B_UID, "gnupghome": str(world.sending), "sign": True},
            "decrypt": {"direction": "neg", "gnupghome": str(world.receiving),
                        "passphrases": {"gw@b.example": World.B_PASSPHRASE}}}.items()}
        print(f"gpg {subprocess.run(['gpg', '--version'], capture_output=True, text=True).stdout.split()[2]}, "
              f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, median of {runs} runs, "
              "milliseconds as wall / CPU")
        print(f"{'size':>8} {'operation':<16} {'filter step':>14} {'plain gpg':>14} {'one-shot CLI':>14}")
        for size in (10 * 1024, 5 * 1024 * 1024):
            data = message(size)
            encrypted = step(steps["encrypt"], data, work)
            signed = step(steps["encrypt+sign"], data, work)
            armor = Message(encrypted).root.children[1].decoded()
            rows = [
                ("encrypt", lambda: step(steps["encrypt"], data, work),
                 lambda: world.sending.encrypt(data, World.B_UID), lambda: one_shot(enc, data)),
                ("encrypt+sign", lambda: step(steps["encrypt+sign"], data, work),
                 lambda: world.sending.encrypt(data, World.B_UID, sign=World.A_UID), None),
                ("decrypt", lambda: step(steps["decrypt"], encrypted, work),
                 lambda: world.receiving.decrypt(armor, World.B_PASSPHRASE),
                 lambda: one_shot(dec, encrypted)),
                ("decrypt+verify", lambda: step(steps["decrypt"], signed, work), None, None),
            ]
            for name, filtered, plain, cli in rows:
                cells = [median_ms(f, runs) if f else None for f in (filtered, plain, cli)]
                print(f"{size // 1024:>6}KB {name:<16} " + " ".join(
                    f"{c[0]:>7.0f} /{c[1]:>5.0f}" if c else f"{'-':>14}" for c in cells))
    finally:
        world.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
