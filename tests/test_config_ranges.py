"""Every number in a rule file is finite and in a range the code can work with.

Issue 14, finding 8: time_limit / delivery_timeout of inf, nan or 1e300 passed ``check``
and broke every message (OverflowError); virscan ``timeout = nan`` sent every message to
the postmaster; max_mime_depth above ~300 ran into RecursionError.  Each is refused when
the file is read, by a run (75, the key named) and by ``check`` (78) alike, and the
largest depth allowed is shown to work with every built-in filter.
"""

from __future__ import annotations

import base64
import gzip

import pytest

from ispmailgate_core import rules, settings
from conftest import config_error, run_gate, run_inline

SIMPLE = b"From: a@example.org\nTo: b@example.net\nSubject: ranges\n\nbody\n"

BAD = [
    ("time_limit = inf", "time_limit"), ("time_limit = nan", "time_limit"),
    ("time_limit = 1e300", "time_limit"), ("time_limit = 0", "time_limit"),
    ("time_limit = -5", "time_limit"), ("time_limit = true", "time_limit"),
    ("delivery_timeout = inf", "delivery_timeout"), ("delivery_timeout = nan", "delivery_timeout"),
    ("delivery_timeout = 1e300", "delivery_timeout"),
    ("max_mime_depth = 101", "max_mime_depth"), ("max_mime_depth = 1000", "max_mime_depth"),
    ("max_mime_depth = 0", "max_mime_depth"), ("max_mime_parts = 10000000", "max_mime_parts"),
    ('max_message_size = "2T"', "max_message_size"), ("max_message_size = 99999999999999999", "max_message_size"),
    ('max_message_size = "\uff15\uff10M"', "max_message_size"),
    ('[filter.v]\ntype = "virscan"\ntimeout = nan', "filter.v.timeout"),
    ('[filter.v]\ntype = "virscan"\ntimeout = inf', "filter.v.timeout"),
    ('[filter.v]\ntype = "virscan"\nmax_depth = 33', "filter.v.max_depth"),
    ('[filter.v]\ntype = "virscan"\nmax_unpacked = "5T"', "filter.v.max_unpacked"),
    ('[filter.p]\ntype = "packer"\ncommand_timeout = nan', "filter.p.command_timeout"),
    ('[filter.g]\ntype = "pgp"\ntimeout = 1e300', "filter.g.timeout"),
    ('[serve]\nread_timeout = nan', "serve.read_timeout"), ('[serve]\nworkers = 100000', "serve.workers"),
    ('[serve]\nworker_timeout = inf', "serve.worker_timeout"),
    # strings the gate writes into SMTP commands and report headers
    ('postmaster = "pm@x\\nBcc: evil@x"', "postmaster"), ('postmaster = ""', "postmaster"),
    ('loop_suffix = ".x> y"', "loop_suffix"), ('helo_name = "gw example"', "helo_name"),
    ('unqualified_domain = "a@b"', "unqualified_domain"),
]


@pytest.mark.parametrize("line, key", BAD)
def test_an_insane_number_is_refused_by_a_run_and_by_check_alike(config_file, line, key):
    config = config_file(line + "\n")
    run = run_gate(["-c", str(config), "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 75 and run.first_line.startswith(f"4.3.5 config error: {config}: {key}: ")
    check = run_gate(["check", "-c", str(config)], b"")
    assert check.code == 78
    assert run.first_line[len("4.3.5 config error: "):] in check.stdout.decode().splitlines()


@pytest.mark.parametrize("line", ["time_limit = 86400", "delivery_timeout = 0.5", "max_mime_depth = 100",
                                  'max_message_size = "1T"', '[filter.v]\ntype = "virscan"\nmax_depth = 32'])
def test_the_bounds_themselves_are_accepted(tmp_path, line):
    path = tmp_path / "rules.toml"
    path.write_text(line + "\n" + ('mail_user = "root"\n' if "[" not in line else ""))
    assert rules.load_config(path) is not None


def test_a_float_option_of_a_third_party_filter_must_be_finite(tmp_path):
    error = config_error('[filter.s]\ntype = "gate_test_filters:Sleeper"\nseconds = nan\n', tmp_path)
    assert error.path == "filter.s.seconds" and "finite" in error.message


# -- the deepest nesting allowed works with every built-in filter ---------------------------

def nested_multipart(levels: int) -> bytes:
    body = b"Content-Type: text/plain\n\nthe innermost text\n"
    for level in range(levels):
        boundary = b"b%d" % level
        body = (b"Content-Type: multipart/mixed; boundary=" + boundary + b"\n\n--" + boundary + b"\n"
                + body + b"\n--" + boundary + b"--\n")
    return b"From: a@example.org\nTo: b@example.net\nSubject: deep\nMIME-Version: 1.0\n" + body


def nested_messages(levels: int) -> bytes:
    body = b"Content-Type: text/plain\n\nthe innermost text\n"
    for level in range(levels):
        body = b"Content-Type: message/rfc822\n\nSubject: level %d\n" % level + body
    return b"From: a@example.org\nTo: b@example.net\nSubject: deep\nMIME-Version: 1.0\n" + body


FILTERS = """
max_mime_depth = 100
[filter.banner]
type = "banner"
text = "BANNER TEXT"
subject_prefix = "[tag] "
[filter.pack]
type = "packer"
direction = "pos"
min_saving = 0
[filter.unpack]
type = "packer"
direction = "neg"
[filter.scan]
type = "virscan"
scanner = "command"
command = ["/bin/true", "{paths}"]
scanner_unpacks = []
[filter.pgp]
type = "pgp"
direction = "neg"
gnupghome = "GNUPGHOME"
"""

CHAINS = [["banner"], ["scan", "banner"], ["pack"], ["pack", "unpack", "banner"], ["pgp", "banner"],
          ["scan", "pack", "unpack"]]


@pytest.mark.parametrize("shape", [nested_multipart, nested_messages])
@pytest.mark.parametrize("chain", CHAINS, ids=lambda chain: "+".join(chain))
def test_the_deepest_nesting_allowed_works_with_every_built_in_filter(config_file, tmp_path, shape, chain):
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    config = config_file(FILTERS.replace("GNUPGHOME", str(home))
                         + f'[[recipients]]\nfilters = {chain!r}\n'.replace("'", '"'))
    message = shape(settings.MAX_MIME_DEPTH - 1)
    run = run_inline(["-c", str(config), "--stdout", "-f", "a@example.org", "b@example.net"], message)
    assert run.code == 0, run.stderr
    log = (tmp_path / "gate.log").read_text()
    assert "RecursionError" not in log and "cannot parse" not in log
    if "banner" in chain and shape is nested_multipart:
        assert run.stdout.count(b"BANNER TEXT") == 1        # reached the innermost text part
    assert run.stdout.count(b"\nSubject: ") == 1 + (shape is nested_messages) * (settings.MAX_MIME_DEPTH - 1)


def test_the_deepest_archive_nesting_allowed_is_scanned(config_file, tmp_path):
    data = b"the innermost file\n"
    for _ in range(32):
        data = gzip.compress(data)
    message = (b"From: a@example.org\nSubject: deep archive\nMIME-Version: 1.0\n"
               b"Content-Type: application/gzip\nContent-Transfer-Encoding: base64\n\n"
               + base64.encodebytes(data))
    config = config_file('[filter.scan]\ntype = "virscan"\nscanner = "command"\nmax_depth = 32\n'
                         'command = ["/bin/true", "{paths}"]\nscanner_unpacks = []\n'
                         '[[recipients]]\nfilters = ["scan"]\n')
    run = run_inline(["-c", str(config), "--stdout", "-f", "a@example.org", "b@example.net"], message)
    assert run.code == 0, run.stderr
    assert b"X-ispMailGate-VirScan: scanned" in run.stdout
