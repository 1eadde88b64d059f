"""What a filter did not change goes out byte for byte: over the corpus, for banner, packer
and virscan, through the whole gate; and over generated multiparts with empty parts.

The check does not trust the serialiser it tests: it takes the input's parts, marks the
spans of those the filter changed (a leaf whose bytes differ, the header block of a
container whose header differs, a part whose structure differs), and requires every byte
outside those spans (delimiter lines, preambles, epilogues, untouched siblings, the
line ends between them) to appear in the output unchanged, in order.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.clamav import clamd  # noqa: F401  (fixture)
from conftest import corpus_messages, run_inline, without_from_line
from ispmailgate_filters.mime import Message, Part

ARGS = ["--stdout", "-f", "a@example.org", "b@example.com"]


def changed_spans(old: Part, new: Part | None) -> list[tuple[int, int]]:
    """Spans of the input (offsets into the buffer ``old`` was cut from) the filter rewrote."""
    whole = [(old._start, old._end)]
    if (new is None or old.kind != new.kind or len(old.children) != len(new.children)
            or old.content_type != new.content_type or old.param("boundary") != new.param("boundary")):
        return whole        # restructured (a banner wrapping the message ...): all of it is new
    header = [] if new.headers.to_bytes() + new.separator == old.headers.to_bytes() + old.separator \
        else [(old._start, old._body_start)]
    if old.is_leaf:
        return header if new.body_bytes() == old.body_bytes() else whole
    spans = header
    for before, after in zip(old.children, new.children):
        spans += changed_spans(before, after)
    return spans


def kept_pieces(data: bytes, spans: list[tuple[int, int]]) -> list[bytes]:
    """The bytes of ``data`` outside ``spans``, one piece per gap, in order."""
    pieces, position = [], 0
    for start, end in sorted(spans):
        pieces.append(data[position:max(position, start)])
        position = max(position, end)
    return pieces + [data[position:]]


def assert_unchanged_parts_kept(data: bytes, out: bytes) -> int:
    """Every byte outside the changed spans is in ``out``, in order; the number of spans."""
    spans = changed_spans(Message(data).root, Message(out).root)
    pieces = kept_pieces(data, spans)
    if len(pieces) == 1:
        assert out == data
        return 0
    first, *middle, last = pieces
    assert out.startswith(first)
    position = len(first)
    for piece in middle:
        found = out.find(piece, position)
        assert found >= 0, f"lost or altered between changed parts: {piece[:200]!r}"
        position = found + len(piece)
    assert out.endswith(last) and len(out) - len(last) >= position, f"tail altered: {last[-200:]!r}"
    return len(spans)


def shape(part: Part) -> tuple:
    """The tree as a reader cuts it: kinds and children, nothing else."""
    return part.kind, tuple(shape(child) for child in part.children)


def assert_same_shape(data: bytes, out: bytes) -> None:
    """For filters that only rewrite parts in place: the output has the input's parts."""
    assert shape(Message(out).root) == shape(Message(data).root)


def test_the_check_sees_a_blank_line_slipped_between_two_delimiters():
    data = (b"Content-Type: multipart/mixed; boundary=b\n\n--b\n--b\nContent-Type: text/plain\n\nhi\n"
            b"--b\n--b--\n")
    assert assert_unchanged_parts_kept(data, data.replace(b"hi", b"HI")) == 1
    with pytest.raises(AssertionError):
        assert_unchanged_parts_kept(data, data.replace(b"hi", b"HI").replace(b"--b\n--b\n", b"--b\n\n--b\n"))
    with pytest.raises(AssertionError):
        assert_unchanged_parts_kept(data, data.replace(b"hi", b"HI").replace(b"\n--b--", b"\n\n--b--"))


# -- the corpus through the gate -------------------------------------------------------------

FILTERS = {
    "banner": 'type = "banner"\ntext = "Diese Nachricht ist vertraulich."\nhtml = "<p>vertraulich</p>"',
    "packer-pos": 'type = "packer"\ndirection = "pos"\nmin_saving = 0',
    "packer-original": 'type = "packer"\ndirection = "pos"\nformat = "original"\nmin_saving = 0',
}


def through(config_file, table: str, data: bytes) -> bytes:
    config = config_file(f'default_filter = ["f"]\n[filter.f]\n{table}\n')
    run = run_inline(["-c", str(config), *ARGS], data)
    assert run.code == 0, run.stderr
    return run.stdout


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_parts_a_filter_did_not_change_keep_their_bytes_over_the_corpus(config_file, name):
    changed = 0
    for path in corpus_messages():
        data = without_from_line(path.read_bytes())
        out = through(config_file, FILTERS[name], data)
        changed += assert_unchanged_parts_kept(data, out) > 1
        if name != "banner":            # the banner may put a message under itself
            assert_same_shape(data, out)
    assert changed >= 10            # the check ran on messages the filter really changed inside


@pytest.mark.parametrize("name", ["packer-pos", "packer-original"])
def test_parts_packer_neg_did_not_restore_keep_their_bytes_over_the_corpus(config_file, name):
    restored = 0
    for path in corpus_messages():
        packed = through(config_file, FILTERS[name], without_from_line(path.read_bytes()))
        out = through(config_file, 'type = "packer"\ndirection = "neg"', packed)
        restored += assert_unchanged_parts_kept(packed, out) > 1
        assert_same_shape(packed, out)
    assert restored >= 10


def test_parts_virscan_did_not_change_keep_their_bytes_over_the_corpus(config_file, clamd, tmp_path):
    table = f'type = "virscan"\nsocket = "{clamd.socket}"\nquarantine_dir = "{tmp_path / "q"}"'
    for path in corpus_messages():
        data = without_from_line(path.read_bytes())
        out = through(config_file, table, data)
        assert assert_unchanged_parts_kept(data, out) == 1      # its header at the top, nothing else
        assert_same_shape(data, out)


# -- generated multiparts with empty parts -------------------------------------------------------

@st.composite
def multiparts(draw, depth: int = 0):
    """A multipart whose parts are often empty (delimiter lines back to back), with text a
    filter changes, and sometimes a nested multipart; LF or CRLF; a last line end or none."""
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    mark = b"--=_p%d" % depth
    kinds = st.sampled_from(["empty", "blank", "text", "attachment", "nested"] if depth < 2 else
                            ["empty", "blank", "text", "attachment"])
    body = b"Content-Type: multipart/" + draw(st.sampled_from([b"mixed", b"alternative"]))
    body += b'; boundary="' + mark[2:] + b'"' + eol + eol + draw(st.sampled_from([b"", b"preamble" + eol]))
    for kind in draw(st.lists(kinds, min_size=1, max_size=5)):
        body += mark + eol
        if kind == "blank":
            body += eol
        elif kind == "text":
            body += b"Content-Type: text/plain; charset=us-ascii" + eol + eol + b"words " * 40 + eol
        elif kind == "attachment":
            body += (b"Content-Type: application/octet-stream" + eol + b"Content-Transfer-Encoding: base64"
                     + eol + eol + b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=" * 2 + eol)
        elif kind == "nested":
            body += draw(multiparts(depth + 1)) + eol
    body += mark + b"--" + draw(st.sampled_from([eol, b"", eol + b"epilogue" + eol]))
    if depth:
        return body.removesuffix(eol) if body.endswith(eol) else body
    return b"From: a@example.org" + eol + b"MIME-Version: 1.0" + eol + body


GENERATED = {
    "banner": {"type": "banner", "text": "vertraulich"},
    "packer-pos": {"type": "packer", "direction": "pos", "min_saving": 0},
    "packer-original": {"type": "packer", "direction": "pos", "format": "original", "min_saving": 0},
}


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=multiparts(), name=st.sampled_from(sorted(GENERATED)))
def test_property_empty_parts_keep_their_bytes_beside_changed_ones(tmp_path, data, name):
    import logging

    from ispmailgate_filters.banner import Banner
    from ispmailgate_filters.base import Context, Envelope
    from ispmailgate_filters.packer import Packer

    options = dict(GENERATED[name])
    kind = {"banner": Banner, "packer": Packer}[options.pop("type")]
    ctx = Context(Envelope("a@example.org", ("b@example.com",)), message_id="T", log=logging.getLogger("t"),
                  workdir=lambda: tmp_path, postmaster="pm@example.com")
    message = Message(data)
    kind(**options).process(message, ctx)
    out = bytes(message.to_bytes())
    assert_unchanged_parts_kept(data, out)
    if kind is Packer:          # parts packed in place, and the way back
        assert_same_shape(data, out)
        restored = Message(out)
        Packer(direction="neg").process(restored, ctx)
        assert_unchanged_parts_kept(out, bytes(restored.to_bytes()))
        assert_same_shape(data, bytes(restored.to_bytes()))
