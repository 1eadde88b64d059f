"""What DKIM signing and ARC sealing cost on hostile input: linear in the message (dkimpy's
parser and body canonicalization replaced, proved equal to dkimpy's own), and header blocks
past the bounds never handed to dkimpy.  Scaling checks compare n with 4n, never wall time.
"""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support.costly import cpu_seconds
from support.mailauth import make_key

from ispmailgate_core import dkim_linear

PIECES = [b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b"a", b"X-A", b"From ", b"From:", b" x:", b"\x00", b"\xff"]
messages = st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    from ispmailgate_core.signing import load_section

    key, _ = make_key(tmp_path_factory.mktemp("dkimcost"), "sel", "gate.example")
    [settings_] = load_section([{"domain": "gate.example", "selector": "sel",
                                 "private_key_file": str(key.path)}], "dkim")
    return settings_


def outcome(function, data: bytes):
    """What ``function(data)`` returns, or the exception it raises (type and text)."""
    try:
        return function(data)
    except Exception as error:      # noqa: BLE001 -- the two must fail alike too
        return type(error).__name__, str(error)


@settings(max_examples=1500, deadline=None)
@given(messages)
def test_the_linear_parser_returns_exactly_what_dkimpy_s_returns(message):
    dkim_linear.install()
    assert outcome(dkim_linear.rfc822_parse, message) == \
        outcome(dkim_linear.originals["rfc822_parse"], message)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b" \r\n"]), max_size=40).map(b"".join))
def test_the_linear_blank_strip_returns_exactly_what_dkimpy_s_returns(body):
    dkim_linear.install()
    assert dkim_linear.strip_trailing_whitespace(body) == \
        dkim_linear.originals["strip_trailing_whitespace"](body)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"a", b" "]), max_size=30).map(b"".join))
def test_the_linear_empty_line_strip_returns_exactly_what_dkimpy_s_returns(body):
    dkim_linear.install()
    assert dkim_linear.strip_trailing_lines(body) == dkim_linear.originals["strip_trailing_lines"](body)


def test_dkimpy_is_patched_once_it_signs(table):
    import dkim
    import dkim.canonicalization

    from ispmailgate_core.signing import signature

    signature(table, b"From: a@gate.example\r\n\r\nhi\r\n")
    assert dkim.rfc822_parse is dkim_linear.rfc822_parse
    assert dkim.canonicalization.strip_trailing_whitespace is dkim_linear.strip_trailing_whitespace
    assert dkim.canonicalization.strip_trailing_lines is dkim_linear.strip_trailing_lines


def scales_linearly(action, build, n: int) -> None:
    small, large = cpu_seconds(action, build(n)), cpu_seconds(action, build(4 * n))
    assert large < 8 * max(small, 0.005), (small, large)      # quadratic would be 16 times


def test_a_line_of_blanks_costs_signing_linear_time(table):
    """dkimpy's relaxed body canonicalization backtracked through a run of blanks: 52 s
    for one line of 200,000 (t_dkim_redos.py)."""
    from ispmailgate_core.signing import signature

    scales_linearly(lambda wire: signature(table, wire),
                    lambda n: b"From: a@gate.example\r\n\r\n" + b" " * n + b"x\r\n", 20_000)


def test_a_field_of_many_continuation_lines_costs_the_parser_linear_time():
    dkim_linear.install()
    import dkim

    scales_linearly(dkim.rfc822_parse, lambda n: b"From: a\r\nTo: b\r\n" + b" c\r\n" * n + b"\r\nhi\r\n", 20_000)


def test_signing_a_message_of_empty_lines_costs_a_few_bytes_per_byte(table):
    """dkimpy's parser made one bytes object per line: ~100 bytes per message byte."""
    from ispmailgate_core.signing import signature

    wire = b"From: a@gate.example\r\n\r\n" + b"\r\n" * (1 << 19)      # 1 MiB
    signature(table, b"From: a@gate.example\r\n\r\nwarm up\r\n")
    tracemalloc.start()
    try:
        signature(table, wire)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * len(wire), peak
