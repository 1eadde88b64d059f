"""packer: pos -> neg gives back every part; bombs, forged records and failing commands are stopped."""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import gzip
import logging
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (CORPUS, assert_documented, config_error, corpus_messages, run_gate,
                      run_inline, without_from_line)
from ispmailgate_filters.base import Context, Envelope, FilterError, Reject, TempFail
from ispmailgate_filters.mime import Message, format_param
from ispmailgate_filters.packer import Packer

IDENTITY = ("", "7bit", "8bit", "binary")


def rules(options: str = "", name: str = "z") -> str:
    return f'default_filter = ["{name}"]\n[filter.{name}]\ntype = "packer"\n{options}\n'


def gate(config_file, options: str, data: bytes, *flags: str):
    config = config_file(rules(options))
    return run_inline(["-c", str(config), "--stdout", *flags, "-f", "a@example.org", "b@example.com"], data)


def context(tmp_path) -> Context:
    return Context(Envelope("a@example.org", ("b@example.com",)), message_id="TEST",
                   log=logging.getLogger("test.packer"), workdir=lambda: tmp_path, postmaster="pm@example.com")


def through(packer: Packer, data: bytes, tmp_path) -> bytes:
    message = Message(data)
    packer.process(message, context(tmp_path))
    return bytes(message.to_bytes())


def assert_same_parts(original: bytes, restored: bytes) -> None:
    """Every leaf: the same header bytes and decoded body; identity-encoded leaves every byte."""
    before, after = Message(original), Message(restored)
    assert after.headers.to_bytes() == before.headers.to_bytes()
    pairs = list(zip(before.leaves(), after.leaves(), strict=True))
    for old, new in pairs:
        assert new.headers.to_bytes() == old.headers.to_bytes()
        assert new.decoded() == old.decoded()
        if old.transfer_encoding in IDENTITY:
            assert new.to_bytes() == old.to_bytes()


def packed_leaves(data: bytes) -> list:
    return [p for p in Message(data).leaves() if "X-ispMailGate-Packed" in p.headers]


# -- options ------------------------------------------------------------------------------

@pytest.mark.parametrize("options, key, words", [
    ('codec = "zstd"', "filter.z.command_pos", "not built in"),
    ('codec = "zstd"\ndirection = "neg"', "filter.z.command_neg", "not built in"),
    ('codec = "Zip Me"', "filter.z.codec", "codec name"),
    ('command_pos = "gzip -c"', "filter.z.command_pos", "list of strings"),
    ("command_neg = []", "filter.z.command_neg", "non-empty list"),
    ("level = 0", "filter.z.level", "1 to 9"),
    ("min_saving = 100", "filter.z.min_saving", "0 to 99"),
    ('max_unpacked = "10X"', "filter.z.max_unpacked", "size like 200M"),
    ('skip_types = ["image"]', "filter.z.skip_types", "not a media type"),
    ('on_unpack_error = "ignore"', "filter.z.on_unpack_error", "error, keep, reject"),
    ('direction = "up"', "filter.z.direction", "pos, neg, auto"),
    ('format = "perl"', "filter.z.format", "ispmailgate, original"),
    ("command_timeout = 0", "filter.z.command_timeout", "seconds above 0"),
])
def test_options_are_checked_at_load_and_name_their_key(tmp_path, options, key, words):
    error = config_error(rules(options), tmp_path)
    assert error.path == key
    assert words in error.message


def test_problems_name_missing_commands():
    assert Packer().problems() == []
    assert Packer(codec="zstd", command_pos=("gzip", "-c"), command_neg=("/nonexistent/unzstd",)).problems() == \
        ["command_neg: /nonexistent/unzstd not found or not executable"]


def test_every_option_is_documented_in_one_line_and_in_the_man_page():
    assert_documented(Packer)


# -- the round trip -----------------------------------------------------------------------

@pytest.mark.parametrize("codec", ["gzip", "bzip2", "xz"])
def test_pos_then_neg_gives_back_every_corpus_part(config_file, codec):
    config = config_file(rules(f'codec = "{codec}"\nmin_saving = 0'))
    args = ["-c", str(config), "--stdout", "-f", "a@example.org", "b@example.com"]
    packed_count = identical = 0
    for path in corpus_messages():
        data = without_from_line(path.read_bytes())
        packed = run_inline(args, data)
        restored = run_inline(args, packed.stdout)
        assert packed.code == restored.code == 0, path.name
        assert packed.stdout.startswith(b"X-ispMailGate-Packer: pos" + Message(data).eol), path.name
        packed_count += len(packed_leaves(packed.stdout))
        assert_same_parts(data, restored.stdout)
        identical += restored.stdout == data
    assert packed_count >= 50
    assert identical >= 40          # base64/qp bodies are re-encoded: decoded identical, lines may differ


def test_through_the_installed_program_and_back(config_file):
    data = (CORPUS / "nested.eml").read_bytes()
    config = config_file(rules("min_saving = 0"))
    args = ["-c", str(config), "--stdout", "-f", "a@example.org", "b@example.com"]
    packed = run_gate(args, data)
    restored = run_gate(args, packed.stdout)
    assert packed.code == restored.code == 0
    assert restored.stdout == data


@st.composite
def messages(draw):
    """A message of 1 to 3 leaf parts with any body, type, transfer encoding, name and line end."""
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    leaves = []
    for _ in range(draw(st.integers(1, 3))):
        body = draw(st.one_of(st.binary(max_size=2000),
                              st.text(max_size=2000).map(lambda t: t.encode("utf-8"))))
        body = body.replace(b"=_hyp", b"")
        kind = draw(st.sampled_from(["text/plain; charset=utf-8", "application/pdf", "text/html", None]))
        encoding = draw(st.sampled_from(["base64", "quoted-printable", "8bit", "binary", "7bit", None]))
        name = draw(st.none() | st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=30))
        fields = [f"Content-Type: {kind}" + (f"; {format_param('name', name)}" if name else "")] if kind else []
        if encoding:
            fields.append(f"Content-Transfer-Encoding: {encoding}")
        if name:
            fields.append(f"Content-Disposition: attachment; {format_param('filename', name)}")
        if encoding == "base64":
            encoded = base64.encodebytes(body).replace(b"\n", eol)
        elif encoding == "quoted-printable":
            encoded = binascii.b2a_qp(body, istext=False).replace(b"\n", eol)
        else:
            encoded = body
        leaves.append(eol.join(f.encode() for f in fields) + eol + eol + encoded)
    head = eol.join([b"From: a@example.org", b"Subject: property", b"MIME-Version: 1.0"]) + eol
    if len(leaves) == 1:
        return head + leaves[0]
    mark = b"--=_hyp"
    return (head + b'Content-Type: multipart/mixed; boundary="=_hyp"' + eol + eol
            + b"".join(mark + eol + leaf + eol for leaf in leaves) + mark + b"--" + eol)


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=messages(), codec=st.sampled_from(["gzip", "bzip2", "xz"]))
def test_property_pos_then_neg_restores_every_part(tmp_path, data, codec):
    packer = Packer(codec=codec, min_saving=0, skip_types=())
    packed = through(packer, data, tmp_path)
    assert Message(packed).header_value("X-ispMailGate-Packer") == "pos"
    assert len(packed_leaves(packed)) == sum(bool(p.body) for p in Message(data).leaves())
    restored = through(packer, packed, tmp_path)
    assert_same_parts(data, restored)


@settings(deadline=None, derandomize=True)
@given(body=st.binary(max_size=5000), codec=st.sampled_from(["gzip", "bzip2", "xz"]), level=st.integers(1, 6))
def test_property_codecs_round_trip_and_honour_their_cap(body, codec, level):
    from ispmailgate_filters.packer.packing import UnpackError, compress, decompress

    packed = compress(codec, body, level)
    assert decompress(codec, packed, len(body)) == body
    if body:
        with pytest.raises(UnpackError, match="more than"):
            decompress(codec, packed, len(body) - 1)


# -- what pos does and leaves --------------------------------------------------------------

def test_a_packed_part_is_an_ordinary_gzip_file_with_its_name(config_file):
    data = (b"From: a@example.org\nSubject: Bericht\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n"
            b"--b\nContent-Type: text/plain\n\nAnbei.\n--b\nContent-Type: application/pdf\n"
            b"Content-Disposition: attachment;\n filename*=utf-8''%C3%9Cbersicht%20M%C3%A4rz.pdf\n"
            b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(b"%PDF-1.4 " * 400) + b"--b--\n")
    run = gate(config_file, "", data)
    stdlib = email.message_from_bytes(run.stdout, policy=email.policy.default)
    [attachment] = [p for p in stdlib.iter_attachments() if p.get_filename() == "Übersicht März.pdf.gz"]
    assert attachment.get_content_type() == "application/gzip"
    assert gzip.decompress(attachment.get_content()) == b"%PDF-1.4 " * 400
    summary = attachment["X-ispMailGate-Packed"]
    assert summary == 'gzip; type="application/pdf"; encoding="base64"; size=3600'
    restored = gate(config_file, "", run.stdout)
    assert restored.stdout == data


def test_skip_types_incompressible_and_tiny_parts_stay_as_they_are(config_file, tmp_path):
    import os

    noise = base64.encodebytes(os.urandom(6000))
    data = (b"From: a@example.org\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b\n"
            b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n" + noise
            + b"--b\nContent-Type: text/plain\n\nhi\n--b--\n")
    run = gate(config_file, "", data)
    assert run.stdout == b"X-ispMailGate-Packer: pos\n" + data
    assert "packed 0 part(s)" in (tmp_path / "gate.log").read_text()
    for name in ("image-only.eml", "same-names.eml"):       # JPEG and GIF: compressed already
        original = (CORPUS / name).read_bytes()
        run = gate(config_file, "min_saving = 0", original)
        assert run.stdout == b"X-ispMailGate-Packer: pos\n" + original


def test_large_incompressible_bodies_are_recognised_without_packing_them_whole():
    import os

    from ispmailgate_filters.packer.packing import incompressible

    import random

    rng = random.Random(7)
    text = " ".join("".join(rng.choices("etaoinshrdlu", k=rng.randint(2, 9))) for _ in range(300_000)).encode()
    assert incompressible(os.urandom(1 << 20))
    assert len(gzip.compress(text)) > 1 << 19 and incompressible(gzip.compress(text))
    assert not incompressible(text)
    assert not incompressible(os.urandom(1000))        # small bodies: just try


def test_signed_or_encrypted_content_is_never_packed(config_file):
    data = (b"From: a@example.org\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=o\n\n--o\n"
            b'Content-Type: multipart/signed; protocol="application/pgp-signature"; boundary=s\n\n--s\n'
            b"Content-Type: text/plain\n\n" + b"signed words " * 200 + b"\n--s\n"
            b"Content-Type: application/pgp-signature\n\nSIG\n--s--\n--o\n"
            b"Content-Type: text/plain\n\n" + b"plain words " * 200 + b"\n--o--\n")
    run = gate(config_file, "", data)
    out = Message(run.stdout)
    signed, plain = out.root.children
    assert signed.to_bytes() == Message(data).root.children[0].to_bytes()
    assert "X-ispMailGate-Packed" in plain.headers


def test_embedded_messages_are_descended_into(config_file):
    data = (CORPUS / "mbox-forward.eml").read_bytes()
    run = gate(config_file, "min_saving = 0", data)
    inner = Message(without_from_line(run.stdout)).root.children[1].children[0]
    assert inner.headers.get("X-ispMailGate-Packed").startswith('gzip; type="text/plain"')
    assert inner.headers.get("MIME-Version") == "1.0"        # the embedded message's own top part
    assert gate(config_file, "min_saving = 0", run.stdout).stdout == data


def test_pos_twice_packs_nothing_twice(config_file):
    data = (CORPUS / "nested.eml").read_bytes()
    once = gate(config_file, 'direction = "pos"\nmin_saving = 0', data)
    twice = gate(config_file, 'direction = "pos"\nmin_saving = 0', once.stdout)
    assert twice.stdout == once.stdout


def test_neg_restores_a_binary_body_with_its_crlf_bytes(tmp_path):
    body = bytes(range(256)) * 20 + b"\r\n\r\nend\n"
    data = (b"From: a@example.org\nMIME-Version: 1.0\nContent-Type: application/x-raw\n"
            b"Content-Transfer-Encoding: binary\n\n" + body)
    packer = Packer(min_saving=0)
    packed = through(packer, data, tmp_path)
    assert body not in packed
    assert through(packer, packed, tmp_path) == data


def test_qp_text_with_crlf_inside_is_restored_exactly(tmp_path):
    decoded = "Zeile eins\r\nZeile zwei mit Umlaut ä\r\n".encode("latin-1") * 30
    data = (b"From: a@example.org\nMIME-Version: 1.0\nContent-Type: text/plain; charset=iso-8859-1\n"
            b"Content-Transfer-Encoding: quoted-printable\n\n" + binascii.b2a_qp(decoded, istext=False))
    packer = Packer(min_saving=0)
    restored = through(packer, through(packer, data, tmp_path), tmp_path)
    assert Message(restored).root.decoded() == decoded


@pytest.mark.parametrize("body", [b"=0D=0A", b"=0A", b"line=0D=0A", b"a\r\n", b"=0D", b"x=0D"])
def test_a_qp_body_ending_in_its_own_line_break_without_a_final_newline_is_restored(tmp_path, body):
    """Found by the property test: the last line break (or CR) was the data, not the layout."""
    data = (b"From: a@example.org\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
            b"--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
            b"\r\n" + body + b"\r\n--b--\r\n")
    packer = Packer(min_saving=0)
    restored = through(packer, through(packer, data, tmp_path), tmp_path)
    [before], [after] = Message(data).leaves(), Message(restored).leaves()
    assert after.decoded() == before.decoded()


# -- neg against hostile input ---------------------------------------------------------------

def packed_message(payload: bytes, fields: bytes = b"Content-Type: application/octet-stream\n",
                   summary: str = "gzip", codec_type: str = "application/gzip") -> bytes:
    return (b"X-ispMailGate-Packer: pos\nFrom: a@example.org\nSubject: packed\nMIME-Version: 1.0\n"
            b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nhello\n--b\n"
            + f"Content-Type: {codec_type}; name=x.gz\nContent-Transfer-Encoding: base64\n"
              f"X-ispMailGate-Packed: {summary}\n".encode()
            + b"X-ispMailGate-Packed-Fields: " + base64.b64encode(fields) + b"\n\n"
            + base64.encodebytes(payload) + b"--b--\n")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A gzip stream of 100 members of 10 MiB of zeros: 1000 MiB unpacked, about 1 MB packed."""
    return gzip.compress(bytes(10 << 20), 9, mtime=0) * 100


def test_a_bomb_stops_at_the_cap_without_growing_memory(tmp_path, bomb):
    import tracemalloc

    data = packed_message(bomb)
    packer = Packer(max_unpacked=1 << 20, on_unpack_error="error")
    message = Message(data)
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(FilterError, match="more than 1048576 bytes"):
            packer.process(message, context(tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 10
    assert peak < 16 << 20                  # well under the 1000 MiB the bomb holds


def test_a_recorded_size_over_the_cap_is_refused_before_unpacking(tmp_path, bomb):
    data = packed_message(bomb, summary=f"gzip; size={1000 << 20}")
    with pytest.raises(Reject, match="would unpack to 1048576000 bytes"):
        Packer(max_unpacked=1 << 20, on_unpack_error="reject").process(Message(data), context(tmp_path))


@pytest.mark.parametrize("action, code", [("error", 75), ("reject", 69), ("keep", 0)])
def test_what_each_unpack_error_action_means_for_the_mta(config_file, tmp_path, bomb, action, code):
    data = packed_message(bomb)
    run = gate(config_file, f'max_unpacked = "1M"\non_unpack_error = "{action}"', data)
    assert run.code == code, run.stderr
    if action == "keep":
        assert run.stdout == data                       # left packed, marker kept for a later try
        assert "left packed (as application/gzip): unpacks to more than 1048576 bytes" in \
            (tmp_path / "gate.log").read_text()
    else:
        assert run.stdout == b""


def test_a_filter_error_sends_the_postmaster_a_report_not_the_recipient(config_file, smtp_sink, bomb):
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\npostmaster = "pm@example.com"\n'
                         + rules('max_unpacked = "1M"'))
    run = run_inline(["-c", str(config), "-f", "a@example.org", "b@example.com"], packed_message(bomb))
    assert run.code == 0, run.stderr
    [report] = smtp_sink.messages
    assert report.rcpt_tos == ["pm@example.com"]
    assert b"cannot unpack" in report.content


@pytest.mark.parametrize("fields, words", [
    (b"Content-Type: text/plain\nBcc: victim@example.net\n", "fields other than"),
    (b"Content-Type: text/plain\nContent-Type: text/html\n", "fields other than"),
    (b"Content-Type: text/plain\rBcc: victim@example.net\n", "control characters"),
    (b"Content-Type: text/plain", "a cut field"),
    (b"Content-Type: multipart/mixed; boundary=x\n", "cannot restore to a multipart"),
    (b"Content-Type: (c) multipart/mixed; boundary=x\n", "cannot restore to a multipart"),   # a comment
    (b"Content-Type: multipart (c)/mixed; boundary=x\n", "cannot restore to a multipart"),
    (b"Content-Type: (a (nested) \\) comment)\n multipart/mixed; boundary=x\n", "cannot restore to a multipart"),
    (b"Content-Type: message/rfc822\n", "cannot restore to a message"),
    (b"MIME-Version: 1.0\n", "fields other than"),         # only a message's top part had one
])
def test_forged_records_are_refused(tmp_path, fields, words):
    data = packed_message(gzip.compress(b"payload"), fields)
    packer = Packer(on_unpack_error="keep")
    assert through(packer, data, tmp_path) == data
    with pytest.raises(FilterError, match=words):
        Packer().process(Message(data), context(tmp_path))


def test_damage_and_unknown_codecs_are_unpack_errors(tmp_path):
    cases = [(packed_message(b"not gzip at all"), "damaged gzip data"),
             (packed_message(gzip.compress(b"x" * 1000)[:-12]), "damaged gzip data"),
             (packed_message(gzip.compress(b"x"), summary="lz4"), "codec 'lz4' is not built in"),
             (packed_message(gzip.compress(b"x"), summary="gzip; size=2"), "unpacked 1 bytes where 2"),
             (packed_message(b"").replace(b"X-ispMailGate-Packed-Fields: ", b"X-ispMailGate-Packed-Fields: *"),
              "not valid base64"),
             (packed_message(gzip.compress(b"x")).replace(b"X-ispMailGate-Packed-Fields: ", b"X-Other: "),
              r"form this filter does not know \(X-ispMailGate-Packed\)")]
    for data, words in cases:
        with pytest.raises(FilterError, match=words):
            Packer().process(Message(data), context(tmp_path))


# -- commands --------------------------------------------------------------------------------

def test_command_codec_round_trips_with_the_real_gzip(config_file, tmp_path):
    options = 'codec = "gzipcmd"\ncommand_pos = ["gzip", "-c", "-n"]\ncommand_neg = ["gzip", "-dc"]\nmin_saving = 0'
    data = (CORPUS / "nested.eml").read_bytes()
    packed = gate(config_file, options, data)
    assert [p.content_type for p in packed_leaves(packed.stdout)] == ["application/octet-stream"] * 4
    assert packed_leaves(packed.stdout)[0].filename == "part.gzipcmd"
    assert gate(config_file, options, packed.stdout).stdout == data


def test_a_gzip_command_is_interchangeable_with_the_built_in_codec(config_file):
    data = (CORPUS / "nested.eml").read_bytes()
    packed = gate(config_file, 'command_pos = ["gzip", "-c", "-n", "-9"]\nmin_saving = 0', data)
    assert packed_leaves(packed.stdout)[0].content_type == "application/gzip"
    assert gate(config_file, "", packed.stdout).stdout == data


def test_a_failing_pack_command_leaves_the_part_as_it_is(config_file, tmp_path):
    data = without_from_line((CORPUS / "plain.eml").read_bytes())
    run = gate(config_file, 'codec = "nope"\ncommand_pos = ["false"]\ncommand_neg = ["true"]\nmin_saving = 0', data)
    assert run.code == 0
    assert run.stdout == b"X-ispMailGate-Packer: pos\n" + data
    assert "part not packed: false exited with status 1" in (tmp_path / "gate.log").read_text()


def test_an_unpack_command_that_floods_is_killed_at_the_cap(tmp_path):
    data = packed_message(b"anything", summary="flood")
    packer = Packer(codec="flood", command_pos=("true",), command_neg=("cat", "/dev/zero"),
                    max_unpacked=1 << 20, on_unpack_error="error")
    started = time.monotonic()
    with pytest.raises(FilterError, match="cat put out more than 1048576 bytes"):
        packer.process(Message(data), context(tmp_path))
    assert time.monotonic() - started < 20


def test_an_unpack_command_that_hangs_is_killed_after_its_time(tmp_path):
    data = packed_message(b"anything", summary="slow")
    packer = Packer(codec="slow", command_pos=("true",), command_neg=("sleep", "60"), command_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(FilterError, match="sleep ran longer than 1 s"):
        packer.process(Message(data), context(tmp_path))
    assert time.monotonic() - started < 30


def test_an_unpack_command_that_cannot_start_defers_the_mail(config_file, tmp_path):
    data = packed_message(b"anything", summary="gone")
    with pytest.raises(TempFail, match="cannot run /nonexistent/unpack"):
        Packer(codec="gone", command_pos=("true",), command_neg=("/nonexistent/unpack",)).process(
            Message(data), context(tmp_path))
    run = gate(config_file, 'codec = "gone"\ncommand_pos = ["true"]\ncommand_neg = ["/nonexistent/unpack"]', data)
    assert run.code == 75


# -- direction and marker ---------------------------------------------------------------------

def test_auto_packs_unmarked_mail_and_unpacks_marked_mail(tmp_path):
    data = without_from_line((CORPUS / "plain.eml").read_bytes())
    packed = through(Packer(min_saving=0), data, tmp_path)
    assert packed.startswith(b"X-ispMailGate-Packer: pos\n")
    assert through(Packer(direction="neg"), packed, tmp_path) == data
    assert through(Packer(direction="neg"), data, tmp_path) == data       # nothing to undo: unchanged


def test_modules_import_no_codec_or_tokenizer_until_used():
    import subprocess
    import sys

    probe = ("import sys, ispmailgate_filters.packer, ispmailgate_filters.banner\n"
             "print(sorted(m for m in ('gzip', 'bz2', 'lzma', 'subprocess', 'html.parser', 'hashlib',"
             " 'email.header', 'base64') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- a small message never unpacks into a large one (attack review 1, finding 3) -----------------

def test_a_compression_ratio_above_max_ratio_is_not_unpacked(tmp_path):
    """The review's message: 569 bytes of bzip2/base64 delivered as 143 MB."""
    import bz2

    payload = bz2.compress(bytes(20 << 20), 9)
    assert len(payload) < 1000
    with pytest.raises(FilterError, match=r"compression ratio above max_ratio \(1000\)"):
        Packer(on_unpack_error="error").process(Message(packed_message(payload, summary="bzip2")),
                                                context(tmp_path))
    restored = through(Packer(max_ratio=1_000_000), packed_message(payload, summary="bzip2"), tmp_path)
    assert len(restored) > 20 << 20          # a higher max_ratio lets it through


def test_unpacking_stops_at_max_message_size_and_charges_the_budget(tmp_path):
    """Several parts, each within the ratio, together no more than the largest message the
    gate accepts: a step never makes the message larger than the gate would take in."""
    import os
    from ispmailgate_filters.base import Budget

    member = gzip.compress(os.urandom(3 << 20), 1, mtime=0)
    data = packed_message(member)
    data = data.replace(b"--b--\n", data[data.index(b"--b\nContent-Type: application/gzip"):])
    ctx, budget = context(tmp_path), Budget(output=5 << 20)
    ctx.budget = budget
    with pytest.raises(FilterError, match=r"max_message_size \(5242880 bytes\)"):
        Packer(on_unpack_error="error").process(Message(data), ctx)
    assert budget.decoded >= 3 << 20         # the work done is charged to the message


def test_gzip_is_read_a_chunk_at_a_time(tmp_path):
    """It read ``limit + 1`` in one call: about three times the output at the peak, and a
    buffer of the whole limit allocated up front whatever the data."""
    import tracemalloc

    payload = gzip.compress(bytes(8 << 20), 9, mtime=0)
    message = Message(packed_message(payload, summary=f"gzip; size={8 << 20}"))
    tracemalloc.start()
    try:
        Packer(max_ratio=1_000_000, max_unpacked=1 << 36).process(message, context(tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2.5 * (8 << 20), peak
