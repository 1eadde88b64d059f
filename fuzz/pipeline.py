#!/usr/bin/env python3
"""Coverage-guided fuzzing of the whole pipeline (parse, route, every filter, serialise).

    .venv/bin/python fuzz/pipeline.py -max_total_time=3600 fuzz/work   # the long run (see README)
    .venv/bin/python fuzz/pipeline.py -runs=15000                       # what the tests run

Each input is one message through ``ispmailgate --stdout`` in this process, four times:
the dummy chain, two changing test filters, the built-in filters that need no outside
service (banner, packer both ways, pgp) routed by a rule to two recipients, and smime both
ways with real keys (tests/smime_keys.py makes them with openssl).  A crash is:
an exit status other than 0, 69 or 75; a traceback on stderr; an internal error or a
filter failure (both exit 75, so no mail is lost, but each is a bug); or, for the dummy
chain, output that differs from the input.  Seeds: the shared corpus, and S/MIME messages
made by openssl (written to the first directory given).
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))       # the test filters

with atheris.instrument_imports():
    import ispmailgate
    import ispmailgate_delivery  # noqa: F401
    import ispmailgate_filters.mime  # noqa: F401
    import gate_test_filters  # noqa: F401

from hostile import BUILT_IN_RULES, BUILT_IN_RECIPIENTS  # noqa: E402
from smime_hostile import real_structures, smime_rules  # noqa: E402
from smime_keys import pki  # noqa: E402

CHAINS = {
    "dummy": ('default_filter = ["dummy"]\n', ["c@d.example"]),
    "changing": ('default_filter = ["gate_test_filters:Upcase", "gate_test_filters:Stamp"]\n', ["c@d.example"]),
    "built-in": (BUILT_IN_RULES, BUILT_IN_RECIPIENTS),
    "smime": (smime_rules(pki()), ["c@d.example"]),
}


def load_configs() -> dict[str, tuple[ispmailgate.Config, list[str]]]:
    """Rule files read once, as ``serve`` does: each input costs only its own work."""
    directory = Path(tempfile.mkdtemp(prefix="igfuzz"))
    atexit.register(shutil.rmtree, directory, True)
    (directory / "gnupg").mkdir(mode=0o700)     # an empty key ring: nothing can be decrypted
    configs = {}
    for name, (rules, recipients) in CHAINS.items():
        path = directory / f"{name}.toml"
        user = 'mail_user = "root"\n' if os.geteuid() == 0 else ""
        path.write_text(f'{user}tmp_dir = "{directory}"\n' + rules.replace("{directory}", str(directory)))
        configs[name] = ispmailgate.load_config(path), recipients
    return configs


CONFIGS = load_configs()


def _failing_handler(self, record) -> None:
    """A log handler that fails would write logging's own traceback to the MTA's stderr."""
    raise AssertionError(f"log handler {type(self).__name__} failed on {record.msg!r}")


logging.Handler.handleError = _failing_handler


def one_input(data: bytes) -> None:
    for name, (config, recipients) in CONFIGS.items():
        stdout, stderr = io.BytesIO(), io.StringIO()
        request = ispmailgate.Request(recipients, "a@b.example", Path(config.path), to_stdout=True)
        code = ispmailgate.Gate(request, ispmailgate.Streams(io.BytesIO(data), stdout, stderr), config).run()
        complaint = stderr.getvalue()
        if code not in (0, 69, 75) or "Traceback" in complaint or "internal error" in complaint \
                or "failed" in complaint:
            raise AssertionError(f"{name}: exit {code}: {complaint[:2000]}")
        if name == "dummy" and stdout.getvalue() != data:
            raise AssertionError("dummy chain changed the bytes")


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
    temporary one by default); the shared corpus is always added as read-only seeds."""
    flags = [a for a in sys.argv[1:] if a.startswith("-")]
    directories = [a for a in sys.argv[1:] if not a.startswith("-")] or [tempfile.mkdtemp(prefix="igfuzz")]
    seeds = HERE.parent.parent / "shared" / "corpus" / "mime-tools"
    if seeds.is_dir():
        directories.append(str(seeds))
    write_smime_seeds(directories[0])
    if not any(flag.startswith("-timeout=") for flag in flags):
        flags.append("-timeout=20")       # one input may take 20 s at most: a hang is a crash
    if not any(flag.startswith("-artifact_prefix=") for flag in flags):
        flags.append(f"-artifact_prefix={directories[0]}/")     # crashing inputs beside the corpus
    atheris.Setup([sys.argv[0], *flags, *directories], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
