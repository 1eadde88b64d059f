"""Hostile input through the whole pipeline: parse, route, every filter, serialise.

Every run ends with delivery or a defined exit status, in bounded time, without a
traceback; bytes that no filter changed come out as they went in.
"""

from __future__ import annotations

import base64
import functools
import re
import resource

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_gate, run_inline
from support.hostile import BUILT_IN_RECIPIENTS, BUILT_IN_RULES, message
from support.smime_hostile import smime_message

DEFINED = {0, 69, 75}
PROPERTY = settings(max_examples=150, deadline=5000, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def changing_config(tmp_path_factory):
    """A chain of filters that read and change every part they understand."""
    path = tmp_path_factory.mktemp("hostile") / "rules.toml"
    path.write_text('mail_user = "root"\n'
                    'default_filter = ["gate_test_filters:Upcase", "gate_test_filters:Stamp"]\n')
    return path


@pytest.fixture(scope="module")
def dummy_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "rules.toml"
    path.write_text('mail_user = "root"\ndefault_filter = ["dummy"]\n')
    return path


@PROPERTY
@given(data=message())
def test_the_parser_is_total_and_exact(data):
    from ispmailgate_filters.mime import Message

    parsed = Message(data)
    for part in parsed.walk():
        part._dirty = True
        part.content_type, part.filename, part.charset       # decoding never raises
        if part.is_leaf:
            part.decoded()
            part.text()
    assert parsed.to_bytes() == data


@PROPERTY
@given(data=message())
def test_the_dummy_chain_gives_back_any_bytes(dummy_config, data):
    run = run_inline(["-c", str(dummy_config), "--stdout", "-f", "a@b.example", "c@d.example"], data)
    assert run.code == 0
    assert run.stdout == data


@PROPERTY
@given(data=message())
def test_changing_filters_end_in_a_defined_state(changing_config, data):
    run = run_inline(["-c", str(changing_config), "--stdout", "-f", "a@b.example", "c@d.example"], data)
    assert run.code in DEFINED, run.stderr
    if run.code == 0:
        assert run.stdout.startswith(b"X-Stamp: yes")


@pytest.fixture(scope="module")
def built_in_config(tmp_path_factory):
    """banner, packer both ways and pgp (an empty key ring), routed by a rule: two groups."""
    directory = tmp_path_factory.mktemp("hostile")
    (directory / "gnupg").mkdir(mode=0o700)
    path = directory / "rules.toml"
    path.write_text(f'mail_user = "root"\ntmp_dir = "{directory}"\n'
                    + BUILT_IN_RULES.replace("{directory}", str(directory)))
    return path


@PROPERTY
@given(data=message())
def test_the_built_in_filters_end_in_a_defined_state(built_in_config, data):
    run = run_inline(["-c", str(built_in_config), "--stdout", "-f", "a@b.example", *BUILT_IN_RECIPIENTS], data)
    assert run.code in DEFINED, run.stderr
    assert "failed" not in run.stderr and "internal error" not in run.stderr, run.stderr
    if run.code == 0:
        assert run.stdout                               # one result, or an mbox of two


def nested(depth: int) -> bytes:
    head = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i) for i in range(depth))
    return b"Subject: deep\n" + head + b"Content-Type: text/plain\n\nthe bottom\n"


@pytest.mark.parametrize("name, data", [
    ("10,000-deep nesting", nested(10_000)),
    ("1 MB header line", b"Subject: " + b"x" * (1 << 20) + b"\nTo: a@b\n\nbody\n"),
    ("1 MB folded header", b"Subject: x" + b"\n x" * (1 << 18) + b"\n\nbody\n"),
    ("NUL and bare CR", b"Subject: a\0b\rc\n\nline\0one\rline two\r\r\n"),
    ("empty input", b""),
    ("only a header", b"Subject: no body, no blank line"),
    ("truncated base64", b"Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\nSGVsbG8gV29y"),
    ("20,000 parts", b"Content-Type: multipart/mixed; boundary=z\n\n"
                     + b"--z\nContent-Type: text/plain\n\nx\n" * 20_000 + b"--z--\n"),
    ("boundary everywhere", b"Content-Type: multipart/mixed; boundary=\"\"\n\n--\n--\n----\n"),
], ids=lambda value: value if isinstance(value, str) else "")   # no megabyte in PYTEST_CURRENT_TEST
def test_extreme_inputs_end_in_bounded_time_and_memory(changing_config, dummy_config, name, data):
    for config, same in ((dummy_config, True), (changing_config, False)):
        run = run_gate(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], data,
                       timeout=60)
        assert run.code in DEFINED, (name, run.stderr)
        if same:
            assert run.stdout == data, name
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kib < 600 * 1024, f"{name}: a child used {peak_kib} KiB"


# -- hostile S/MIME ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smime_config(tmp_path_factory):
    """smime both ways (decrypt and verify, then sign and encrypt), with real keys."""
    from support.smime_hostile import smime_rules
    from support.smime_keys import pki

    directory = tmp_path_factory.mktemp("hostile-smime")
    path = directory / "rules.toml"
    path.write_text(f'mail_user = "root"\ntmp_dir = "{directory}"\n' + smime_rules(pki()))
    return path


@functools.cache
def real_smime() -> list[bytes]:
    from support.smime_hostile import real_structures
    from support.smime_keys import pki

    return real_structures(pki())


@PROPERTY
@given(data=st.deferred(lambda: smime_message(real_smime())))
def test_hostile_smime_gets_a_verdict_and_is_delivered(smime_config, data):
    """Lying lengths, wrong content types, damaged real structures: every one is delivered
    with a verdict (undecryptable, bad ...), never deferred, never a filter failure."""
    run = run_inline(["-c", str(smime_config), "--stdout", "-f", "a@b.example", "c@d.example"], data)
    assert run.code == 0, run.stderr
    assert not re.search(r"filter \S+ failed|internal error", run.stderr), run.stderr
    # smime-out encrypted the result, or passed what smime-in could not decrypt as it came (its
    # verdict fields removed by smime-out, as from any message: the last step's fields count)
    assert b"\nX-ispMailGate-SMIME: pos\n" in b"\n" + run.stdout or run.stdout == data


def smime_bomb(declared: int, size: int) -> bytes:
    der = b"\x30\x84" + declared.to_bytes(4, "big") + b"\x06\x09" + bytes.fromhex("2a864886f70d010703") + \
        b"\xa0\x80" + bytes(size)
    return (b"From: x@y.example\nMIME-Version: 1.0\nContent-Type: application/pkcs7-mime; "
            b"smime-type=enveloped-data\nContent-Transfer-Encoding: base64\n\n" + base64.encodebytes(der))


def signed_tower(depth: int) -> bytes:
    head = b"".join(b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary=s%d\n\n--s%d\n'
                    % (i, i) for i in range(depth))
    return b"Subject: tower\n" + head + b"Content-Type: text/plain\n\nthe bottom\n"


@pytest.mark.parametrize("name, data", [
    ("4 GiB declared", smime_bomb((1 << 32) - 1, 1000)),
    ("800 KB of zeros declared as 1 GiB", smime_bomb(1 << 30, 800_000)),
    ("30 MB in an enveloped part (max_size 1M)", smime_bomb(30 << 20, 30 << 20)),
    ("1,000 signed layers", signed_tower(1000)),
    ("500 enveloped parts", b"Content-Type: multipart/mixed; boundary=z\n\n"
     + b"".join(b"--z\n" + smime_bomb(100, 60).split(b"\n", 2)[2] + b"\n" for _ in range(500)) + b"--z--\n"),
], ids=lambda value: value if isinstance(value, str) else "")   # no megabyte in PYTEST_CURRENT_TEST
def test_extreme_smime_ends_in_bounded_time_and_memory(smime_config, name, data):
    run = run_gate(["-c", str(smime_config), "--stdout", "-f", "a@b.example", "c@d.example"], data, timeout=120)
    assert run.code == 0, (name, run.stderr)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kib < 600 * 1024, f"{name}: a child used {peak_kib} KiB"


# -- deeply nested comments in address fields (leftovers: RecursionError in getaddresses) ------

def test_deeply_nested_comments_in_address_fields_are_read_without_recursion():
    from ispmailgate_core.envelope import envelope_from_headers
    from ispmailgate_filters.mime import Message, addresses

    nested = "(" * 5000 + "x" + ")" * 5000
    from email.utils import getaddresses

    ordinary = 'a@b.example (a "(" comment)'
    assert addresses([f"Eve {nested} <eve@x.example>", ordinary]) == [("Eve", "eve@x.example"),
                                                                      *getaddresses([ordinary])]
    message = Message(f"From: Eve {nested} <eve@x.example>\nTo: {nested} bob@y.example\n\nhi\n".encode())
    assert envelope_from_headers(message, None) == ("eve@x.example", ["bob@y.example"])
