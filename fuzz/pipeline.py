#!/usr/bin/env python3
"""Coverage-guided fuzzing of the whole pipeline (parse, route, every filter, serialise, deliver).

    .venv/bin/python fuzz/pipeline.py -max_total_time=3600 fuzz/work   # the long run (see README)
    .venv/bin/python fuzz/pipeline.py -runs=15000                       # what the tests run

Each input is one message through the gate in this process, four times: the dummy chain
and two changing test filters to stdout; the built-in filters that need no outside
service (banner, packer both ways, pgp) routed by a rule to two recipients, to an SMTP
next hop (aiosmtpd on loopback, counting what it accepts); and smime both ways with real
keys (tests/smime_keys.py makes them with openssl), to stdout.

The gate's limits are armed as in production: a short ``time_limit`` (SIGALRM; libFuzzer's
own alarm is therefore off, a watchdog thread stands in for it) and an address-space
limit on this process.  A crash is: an exit status other than 0, 69 or 75; a traceback
on stderr; an internal error, a filter failure, a MemoryError or the time limit (each
exits 75, so no mail is lost, but no input of a few KB may cost that); any mail
delivered (to the SMTP sink, or to stdout) by a run that did not exit 0, or a recipient
of a run that exited 0 that did not get the message exactly once (or appear in the gate's
own report of what happened to it); for the dummy chain, output that differs from the
input.  Seeds: the test corpus, tests/corpus/, and S/MIME messages made by openssl
(written to the first directory given).
"""

from __future__ import annotations

import atexit
import faulthandler
import io
import logging
import os
import re
import resource
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))                 # support: hostile rules, keys
sys.path.insert(0, str(HERE.parent / "tests" / "plugins"))     # the test filters

with atheris.instrument_imports():
    import ispmailgate  # noqa: F401  (the face, and with it the core of a one-shot run)
    from ispmailgate_core.rules import Config, load_config
    from ispmailgate_core.run import Gate, Request, Streams
    import ispmailgate_core.delivery.smtp  # noqa: F401
    import ispmailgate_filters.mime  # noqa: F401
    import gate_test_filters  # noqa: F401

from support.hostile import BUILT_IN_RULES, BUILT_IN_RECIPIENTS  # noqa: E402
from support.smime_hostile import real_structures, smime_rules  # noqa: E402
from support.smime_keys import pki  # noqa: E402

SENDER = "a@b.example"
TIME_LIMIT = 10             # seconds per run: ample for any input of a few KB
WATCHDOG = 60               # a hang SIGALRM cannot interrupt (inside C code) ends the process
MEMORY_HEADROOM = 1 << 30   # address space allowed above what the harness has at start

CHAINS = {
    "dummy": ('default_filter = ["dummy"]\n', ["c@d.example"]),
    "changing": ('default_filter = ["gate_test_filters:Upcase", "gate_test_filters:Stamp"]\n', ["c@d.example"]),
    "built-in": (BUILT_IN_RULES, BUILT_IN_RECIPIENTS),
    "smime": (smime_rules(pki()), ["c@d.example"]),
}
BY_SMTP = ("built-in",)


class CountingSink:
    """aiosmtpd on a loopback port, recording every transaction it accepts."""

    def __init__(self) -> None:
        import socket

        from aiosmtpd.controller import Controller

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.accepted: list[tuple[str, list[str], bytes]] = []
        self.controller = Controller(self, hostname="127.0.0.1", port=port, decode_data=False,
                                     enable_SMTPUTF8=True, data_size_limit=0)
        self.controller.start()
        self.address = f"127.0.0.1:{port}"
        atexit.register(self.controller.stop)

    async def handle_DATA(self, server, session, envelope):
        self.accepted.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 queued"


def load_configs(sink: CountingSink) -> dict[str, tuple[Config, list[str]]]:
    """Rule files read once, as ``serve`` does: each input costs only its own work."""
    directory = Path(tempfile.mkdtemp(prefix="igfuzz"))
    atexit.register(shutil.rmtree, directory, True)
    (directory / "gnupg").mkdir(mode=0o700)     # an empty key ring: nothing can be decrypted
    configs = {}
    for name, (rules, recipients) in CHAINS.items():
        path = directory / f"{name}.toml"
        head = 'mail_user = "root"\n' if os.geteuid() == 0 else ""
        head += f'tmp_dir = "{directory}"\ntime_limit = {TIME_LIMIT}\nmail_host = "{sink.address}"\n'
        path.write_text(head + rules.replace("{directory}", str(directory)))
        configs[name] = load_config(path), recipients
    return configs


SINK = CountingSink()
CONFIGS = load_configs(SINK)


def _failing_handler(self, record) -> None:
    """A log handler that fails would write logging's own traceback to the MTA's stderr."""
    raise AssertionError(f"log handler {type(self).__name__} failed on {record.msg!r}")


logging.Handler.handleError = _failing_handler


WATCHED: list[Path] = []        # where the input under way is kept, for the watchdog


def one_input(data: bytes) -> None:
    if WATCHED:
        WATCHED[0].write_bytes(data)        # a hang ends the process: this is what caused it
    faulthandler.dump_traceback_later(WATCHDOG, exit=True)
    for name, (config, recipients) in CONFIGS.items():
        SINK.accepted.clear()
        stdout, stderr = io.BytesIO(), io.StringIO()
        request = Request(recipients, SENDER, Path(config.path), to_stdout=name not in BY_SMTP)
        code = Gate(request, Streams(io.BytesIO(data), stdout, stderr), config).run()
        complaint = stderr.getvalue()
        if code not in (0, 69, 75) or any(word in complaint for word in (
                "Traceback", "internal error", "failed", "MemoryError", "time limit")):
            raise AssertionError(f"{name}: exit {code}: {complaint[:2000]}")
        if name in BY_SMTP:
            check_deliveries(name, code, recipients)
        elif code != 0 and stdout.getvalue():
            raise AssertionError(f"{name}: wrote the message to stdout and exited {code}")
        elif name == "dummy" and code == 0 and stdout.getvalue() != data:
            raise AssertionError("dummy chain changed the bytes")
    faulthandler.cancel_dump_traceback_later()


def check_deliveries(name: str, code: int, recipients: list[str]) -> None:
    """Exit 0: each recipient got the message exactly once, or the gate's own report (a
    bounce or a postmaster report, with the null sender) names them.  Any other exit:
    nothing was delivered, so the MTA's retry cannot deliver twice."""
    mail = [rcpts for sender, rcpts, _ in SINK.accepted if sender == SENDER]
    reports = b"".join(content for sender, _, content in SINK.accepted if sender in ("", "<>"))
    if re.search(rb"\nError: +filter \S+ failed: ", reports):     # an exception, reported: a bug
        raise AssertionError(f"{name}: a filter failed: {reports[:2000]!r}")
    if code != 0 and mail:
        raise AssertionError(f"{name}: exit {code} after delivering to {mail}")
    if code != 0:
        return
    for recipient in recipients:
        copies = sum(rcpts.count(recipient + ".ispmailgate") for rcpts in mail)
        if copies > 1 or copies == 0 and recipient.encode() not in reports:
            raise AssertionError(f"{name}: exit 0, {recipient} got {copies} copies: {SINK.accepted!r}"[:3000])


def arm_memory_limit() -> None:
    """An address-space limit, as an MTA or systemd would set one: past it Python raises
    MemoryError, which the gate must turn into a defined exit (and the harness into a crash)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[0])
    limit = pages * os.sysconf("SC_PAGE_SIZE") + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def write_smime_seeds(directory: str) -> None:
    """Real S/MIME (enveloped, GCM, to an EC key, streamed, signed, opaque signed) as seeds."""
    import base64

    for number, der in enumerate(real_structures(pki())):
        seed = Path(directory) / f"smime-seed-{number}"
        if not seed.exists():
            seed.write_bytes(b"From: alice@b.example\nMIME-Version: 1.0\nContent-Type: application/pkcs7-mime;"
                             b" smime-type=enveloped-data\nContent-Transfer-Encoding: base64\n\n"
                             + base64.encodebytes(der))


def main() -> None:
    """libFuzzer's options pass through; new inputs go to the first directory given (a
    temporary one by default); the test corpus is always added as read-only seeds."""
    flags = [a for a in sys.argv[1:] if a.startswith("-")]
    directories = [a for a in sys.argv[1:] if not a.startswith("-")] or [tempfile.mkdtemp(prefix="igfuzz")]
    directories.append(str(HERE.parent / "tests" / "corpus"))
    # libFuzzer's -timeout runs on SIGALRM, which the gate's time_limit needs: the watchdog
    # (faulthandler, a thread of its own) takes its place.
    flags = [flag for flag in flags if not flag.startswith("-timeout=")] + ["-timeout=0"]
    write_smime_seeds(directories[0])
    if not any(flag.startswith("-artifact_prefix=") for flag in flags):
        flags.append(f"-artifact_prefix={directories[0]}/")     # crashing inputs beside the corpus
    WATCHED.append(Path(directories[0]) / "watchdog-input")
    arm_memory_limit()
    atheris.Setup([sys.argv[0], *flags, *directories], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
