"""packer and the original's wire format (Mail::IspMailGate 1.1013): read by neg and auto,
written by pos with format = "original", and never delivered as if restored when it cannot be.

The messages here are built as the original's pos wrote them (see ``as_the_original``): the
top header gains ``X-IspMailGate-Packer-Type: gzip`` and then ``X-ispMailGate-Packer: pos``
at its end; each leaf keeps its Content-Type, its Content-Transfer-Encoding becomes base64 in
place (appended after the record when it had none), ``X-ispMailGate-Packer-PEncoding`` records
the old one (base64 when none), and the body is ``gzip -c``'s output (file name and time in
its header) in base64 lines of 60, followed by the blank line MIME-tools puts before a delimiter.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import gzip
import io
import logging
import re
import subprocess

import pytest

from conftest import CORPUS, corpus_messages, run_inline, without_from_line
from ispmailgate_filters.base import Context, Envelope, FilterError, Reject
from ispmailgate_filters.mime import Message
from ispmailgate_filters.packer import Packer, packed_form

TOP = ["From: Ada <ada@example.org>", "To: charles@example.net", "Subject: Notes", "MIME-Version: 1.0"]
PDF = b"%PDF-1.4 a report that compresses well " * 40
LEAVES = [
    (["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: quoted-printable"],
     "Grüße aus München, der Käse ist gut.\n".encode() * 8),
    (["Content-Type: text/plain"], b"A part without a transfer encoding.\n"),
    ([], b""),                                                  # neither header nor body
    (["Content-Type: application/pdf; name=report.pdf", "Content-Transfer-Encoding: base64",
      "Content-Disposition: attachment; filename=report.pdf"], PDF),
    (["Content-Type: text/plain; charset=iso-8859-1", "Content-Transfer-Encoding: 8bit"],
     "Käse und Brötchen\n".encode("latin-1") * 5),
]
MARKS = ("x-ispmailgate-packer-type", "x-ispmailgate-packer", "x-ispmailgate-packer-pencoding")


def gzip_command_output(data: bytes, name: str) -> bytes:
    """What ``gzip -c FILE`` writes: the file's name and a time in the gzip header."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename=name, mode="wb", fileobj=buffer, mtime=1_700_000_000) as stream:
        stream.write(data)
    return buffer.getvalue()


def packed_leaf(fields: list[str], data: bytes, number: int, payload: bytes | None = None) -> tuple[list[str], bytes]:
    """(header lines, body lines) of one leaf as the original's pos wrote it."""
    old = next((f for f in fields if f.lower().startswith("content-transfer-encoding:")), None)
    lines = ["Content-Transfer-Encoding: base64" if f is old else f for f in fields]
    if old is not None:
        lines.append("X-ispMailGate-Packer-PEncoding: " + old.split(":", 1)[1].strip())
    else:
        lines += ["X-ispMailGate-Packer-PEncoding: base64", "Content-Transfer-Encoding: base64"]
    text = base64.b64encode(gzip_command_output(data, f"msg-4711-{number}.txt") if payload is None else payload)
    return lines, [text[i:i + 60] for i in range(0, len(text), 60)]


def as_the_original(leaves=LEAVES, *, top=TOP, eol: bytes = b"\n", payloads: dict | None = None) -> bytes:
    """A message the original's pos wrote: one leaf as the whole message, or a multipart/mixed."""
    def lines(items) -> bytes:
        return b"".join((item.encode() if isinstance(item, str) else item) + eol for item in items)
    payloads = payloads or {}
    if len(leaves) == 1:
        header, body = packed_leaf(top + ["X-IspMailGate-Packer-Type: gzip"] + leaves[0][0], leaves[0][1], 1,
                                   payloads.get(0))
        return lines(header + ["X-ispMailGate-Packer: pos", ""] + body)
    out = lines(top + ['Content-Type: multipart/mixed; boundary="b"', "X-IspMailGate-Packer-Type: gzip",
                       "X-ispMailGate-Packer: pos", ""])
    for number, (fields, data) in enumerate(leaves):
        header, body = packed_leaf(fields, data, number + 1, payloads.get(number))
        out += lines(["--b", *header, "", *body, ""])
    return out + lines(["--b--"])


def context(tmp_path) -> Context:
    return Context(Envelope("a@example.org", ("b@example.com",)), message_id="TEST",
                   log=logging.getLogger("test.packer.original"), workdir=lambda: tmp_path,
                   postmaster="pm@example.com")


def through(packer: Packer, data: bytes, tmp_path) -> bytes:
    message = Message(data)
    packer.process(message, context(tmp_path))
    return bytes(message.to_bytes())


def marks_in(data: bytes) -> list[str]:
    return [name for part in Message(data).walk() for name in part.headers.names() if name.lower() in MARKS]


def rules(options: str = "") -> str:
    return f'default_filter = ["z"]\n[filter.z]\ntype = "packer"\n{options}\n'


def gate(config_file, options: str, data: bytes):
    config = config_file(rules(options))
    return run_inline(["-c", str(config), "--stdout", "-f", "a@example.org", "b@example.com"], data)


# -- reading the original's form (item 1) ----------------------------------------------------

@pytest.mark.parametrize("direction", ["neg", "auto"])
def test_neg_and_auto_restore_every_part_the_original_packed(tmp_path, direction):
    data = as_the_original()
    out = Message(through(Packer(direction=direction), data, tmp_path))
    assert marks_in(out.to_bytes()) == []
    assert out.headers.names() == ["From", "To", "Subject", "MIME-Version", "Content-Type"]
    for (fields, decoded), part in zip(LEAVES, out.root.children, strict=True):
        assert part.decoded() == decoded
        encoding = next((f for f in fields if f.startswith("Content-Transfer-Encoding")), None)
        # the transfer encoding goes back where it stood; a part that had none gets base64, as the
        # original's neg gave it (its record says base64: nobody can tell it had none)
        expected = fields if encoding else fields + ["Content-Transfer-Encoding: base64"]
        assert part.headers.to_bytes().decode().splitlines() == expected


def test_8bit_and_quoted_printable_parts_come_back_in_their_encoding(tmp_path):
    out = Message(through(Packer(), as_the_original(), tmp_path))
    qp, _, _, pdf, latin = out.root.children
    assert qp.transfer_encoding == "quoted-printable" and b"Gr=C3=BC=C3=9Fe" in qp.body
    assert latin.transfer_encoding == "8bit" and latin.body == LEAVES[4][1]
    assert pdf.transfer_encoding == "base64" and base64.b64decode(pdf.body) == PDF


def test_a_single_part_message_is_restored_at_the_top(tmp_path):
    leaf = (["Content-Type: text/plain; charset=us-ascii", "Content-Transfer-Encoding: 7bit"], b"Just text.\n" * 9)
    out = through(Packer(), as_the_original([leaf]), tmp_path)
    assert out == "\n".join(TOP + leaf[0]).encode() + b"\n\n" + leaf[1]


def test_header_names_compare_without_case(tmp_path):
    data = as_the_original()
    for name in (b"X-IspMailGate-Packer-Type", b"X-ispMailGate-Packer-PEncoding", b"X-ispMailGate-Packer:"):
        data = data.replace(name, name.upper())
    assert through(Packer(), data, tmp_path) == through(Packer(), as_the_original(), tmp_path)


def test_auto_unpacks_mail_that_names_the_packer_even_without_the_marker(tmp_path):
    data = as_the_original().replace(b"X-ispMailGate-Packer: pos\n", b"")
    out = through(Packer(direction="auto"), data, tmp_path)
    assert marks_in(out) == [] and Message(out).root.children[3].decoded() == PDF


def test_crlf_mail_gets_its_text_back_with_crlf_line_ends(tmp_path):
    out = through(Packer(), as_the_original(eol=b"\r\n"), tmp_path)
    assert b"\n" not in out.replace(b"\r\n", b"")
    latin = Message(out).root.children[4]
    assert latin.body == LEAVES[4][1].replace(b"\n", b"\r\n")


def test_the_real_gzip_commands_output_is_read(tmp_path):
    source = tmp_path / "msg-1-1.txt"
    source.write_bytes(PDF)
    payload = subprocess.run(["gzip", "-c", str(source)], capture_output=True, check=True).stdout
    data = as_the_original([LEAVES[3]], payloads={0: payload})
    assert Message(through(Packer(), data, tmp_path)).root.decoded() == PDF


def test_a_uuencoded_part_comes_back_uuencoded(tmp_path):
    fields = ["Content-Type: text/csv; name=table.csv", "Content-Transfer-Encoding: x-uuencode"]
    table = b"name,count\n" + b"".join(b"row%d,%d\n" % (i, i * i) for i in range(60))
    out = Message(through(Packer(), as_the_original([(fields, table), LEAVES[1]]), tmp_path))
    part = out.root.children[0]
    assert part.transfer_encoding == "x-uuencode" and part.body.startswith(b"begin 644 table.csv\n")
    assert part.decoded() == table


def test_through_the_gate_with_the_log_line(config_file, tmp_path):
    run = gate(config_file, 'direction = "neg"', as_the_original())
    assert run.code == 0, run.stderr
    assert marks_in(run.stdout) == []
    assert "unpacked 5 part(s)" in (tmp_path / "gate.log").read_text()


# -- never delivered as if restored (item 3) ---------------------------------------------------------

def with_leaf(fields: list[str], data: bytes = PDF, payload: bytes | None = None, top=TOP) -> bytes:
    """The original's form with a good first part and ``fields``/``data`` as the second."""
    return as_the_original([LEAVES[0], (fields, data)], top=top, payloads={1: payload} if payload else None)


REPORT = ["Content-Type: text/plain; name=report.txt", "Content-Transfer-Encoding: 7bit"]
FAILURES = {
    "packer it lacks": (with_leaf(REPORT).replace(b"Packer-Type: gzip", b"Packer-Type: lzop"),
                        "codec 'lzop' is not built in"),
    "no packer named": (with_leaf(REPORT).replace(b"X-IspMailGate-Packer-Type: gzip\n", b""),
                        "X-IspMailGate-Packer-Type is missing"),
    "packers disagree": (with_leaf(REPORT).replace(b"Packer-Type: gzip\n", b"Packer-Type: gzip\n"
                                                   b"X-IspMailGate-Packer-Type: bzip2\n"), "disagree"),
    "a record it refuses": (with_leaf(["Content-Type: text/plain", "Content-Transfer-Encoding: x-binhex"]),
                            "'x-binhex' is not a transfer encoding it can restore"),
    "two records": (with_leaf(REPORT).replace(b"PEncoding: 7bit\n", b"PEncoding: 7bit\n"
                                              b"X-ispMailGate-Packer-PEncoding: base64\n"),
                    "2 X-ispMailGate-Packer-PEncoding fields"),
    "damaged data": (with_leaf(REPORT, payload=b"this was never gzip data"), "damaged gzip data"),
    "truncated gzip": (with_leaf(REPORT, payload=gzip_command_output(PDF, "x")[:-6]), "damaged gzip data"),
    "truncated base64": (None, "damaged gzip data"),        # built below: the body cut in half
    "a multipart label": (with_leaf(['Content-Type: multipart/mixed; boundary="x"']),
                          "a packed multipart part cannot be restored"),
    "a delimiter inside": (with_leaf(REPORT, b"first line\n--b\nContent-Type: text/html\n\n<script>\n"),
                           "holds a delimiter line of the multipart around it"),
    "an unknown marker": (with_leaf(REPORT).replace(b"X-ispMailGate-Packer-PEncoding: 7bit",
                                                    b"X-ispMailGate-Packer-Encoding: 7bit"),
                          r"form this filter does not know \(X-ispMailGate-Packer-Encoding\)"),
    "both forms on one part": (with_leaf(REPORT).replace(b"PEncoding: 7bit\n", b"PEncoding: 7bit\n"
                                                         b"X-ispMailGate-Packed: gzip\n"), "does not know"),
}


def failure(case: str) -> bytes:
    if case == "truncated base64":
        data = with_leaf(REPORT)
        body = data.split(b"report.txt\n", 1)[1].split(b"\n\n", 1)[1].split(b"\n\n--b--")[0]
        return data.replace(body, body[:len(body) // 2])
    return FAILURES[case][0]


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_each_failure_is_a_filter_error_by_default(tmp_path, case):
    with pytest.raises(FilterError, match=FAILURES[case][1]):
        Packer().process(Message(failure(case)), context(tmp_path))


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_each_failure_is_a_rejection_when_asked(tmp_path, case):
    with pytest.raises(Reject, match=FAILURES[case][1]) as caught:
        Packer(on_unpack_error="reject").process(Message(failure(case)), context(tmp_path))
    assert caught.value.status == "5.6.0"


MESSAGE_WIDE = {"packer it lacks", "no packer named", "packers disagree"}     # every part fails


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_keep_delivers_it_labelled_as_packed_data_and_logs_it(tmp_path, case, caplog):
    with caplog.at_level(logging.WARNING, logger="test.packer.original"):
        out = Message(through(Packer(on_unpack_error="keep"), failure(case), tmp_path))
    first, second = out.root.children
    kept = [first, second] if case in MESSAGE_WIDE else [second]
    if case not in MESSAGE_WIDE:
        assert first.decoded() == LEAVES[0][1]              # the part that could be restored was
    assert out.headers.get("X-ispMailGate-Packer") == "pos"     # kept for a later try
    assert out.headers.get("X-IspMailGate-Packer-Type") is None
    for part in kept:       # never under its old label: a reader sees a packed file
        assert part.content_type in ("application/gzip", "application/octet-stream")
        assert part.is_attachment and part.filename.endswith((".gz", ".lzop", ".unknown", ".bin"))
        assert packed_form(part.headers) != "original"
    warnings = [r.getMessage() for r in caplog.records if "left packed" in r.getMessage()]
    assert len(warnings) == len(kept)
    assert re.search(FAILURES[case][1], warnings[-1])


def test_a_part_kept_for_a_packer_it_lacked_is_restored_by_one_that_has_it(tmp_path):
    kept = through(Packer(on_unpack_error="keep"), FAILURES["packer it lacks"][0], tmp_path)
    assert Message(kept).root.children[1].headers.get("X-ispMailGate-Packed").startswith(
        'lzop; type="text/plain"; encoding="7bit"')
    lzop = Packer(codec="lzop", direction="neg", command_neg=("gzip", "-dc"))     # stands in for lzop -dc
    out = Message(through(lzop, kept, tmp_path))
    assert marks_in(out.to_bytes()) == [] and "X-ispMailGate-Packed" not in out.root.children[1].headers
    report = out.root.children[1]
    assert report.headers.to_bytes().decode().splitlines() == REPORT
    assert report.decoded() == PDF


@pytest.mark.parametrize("action, code", [("error", 75), ("reject", 69), ("keep", 0)])
def test_what_each_action_means_for_the_mta(config_file, tmp_path, action, code):
    run = gate(config_file, f'on_unpack_error = "{action}"', FAILURES["damaged data"][0])
    assert run.code == code, run.stderr
    assert (run.stdout != b"") == (action == "keep")
    assert "damaged gzip data" in (tmp_path / "gate.log").read_text()


def test_over_max_unpacked_is_an_unpack_error_too(tmp_path):
    with pytest.raises(FilterError, match="report.pdf: unpacks to more than 6[0-9][0-9] bytes"):
        Packer(max_unpacked=1000).process(Message(as_the_original()), context(tmp_path))


# -- writing it (item 2) -----------------------------------------------------------------------

def plain_message(leaves=LEAVES) -> bytes:
    """The message LEAVES come from, before anybody packed it."""
    out = "".join(line + "\n" for line in TOP + ['Content-Type: multipart/mixed; boundary="b"', ""]).encode()
    for fields, data in leaves:
        encoding = next((f.split(": ")[1] for f in fields if f.startswith("Content-Transfer-Encoding")), "")
        body = {"base64": base64.encodebytes, "quoted-printable": lambda d: binascii.b2a_qp(d) + b"\n"}.get(
            encoding, lambda d: d)(data)
        out += b"--b\n" + "".join(f + "\n" for f in fields).encode() + b"\n" + body
    return out + b"--b--\n"


ORIGINAL = Packer(direction="pos", format="original", min_saving=0)


def test_format_original_writes_what_the_original_wrote(tmp_path):
    data = plain_message()
    out = through(ORIGINAL, data, tmp_path)
    top = Message(out).headers
    assert top.names()[-2:] == ["X-IspMailGate-Packer-Type", "X-ispMailGate-Packer"]
    assert (top.get("X-IspMailGate-Packer-Type"), top.get("X-ispMailGate-Packer")) == ("gzip", "pos")
    decoded_before = [part.decoded() for part in Message(data).leaves()]
    for (fields, _), decoded, part in zip(LEAVES, decoded_before, Message(out).root.children, strict=True):
        old = next((f for f in fields if f.startswith("Content-Transfer-Encoding")), None)
        if old:
            expected = [("Content-Transfer-Encoding: base64" if f is old else f) for f in fields]
            expected.append("X-ispMailGate-Packer-PEncoding: " + old.split(": ")[1])
        else:
            expected = fields + ["X-ispMailGate-Packer-PEncoding: base64", "Content-Transfer-Encoding: base64"]
        assert part.headers.to_bytes().decode().splitlines() == expected
        # the original's neg ran gzip -cd on the decoded body
        unpacked = subprocess.run(["gzip", "-cd"], input=part.decoded(), capture_output=True, check=True).stdout
        assert unpacked == decoded


def test_format_original_then_neg_gives_back_every_part(tmp_path):
    data = plain_message()
    restored = Message(through(Packer(), through(ORIGINAL, data, tmp_path), tmp_path))
    for before, after in zip(Message(data).leaves(), restored.leaves(), strict=True):
        assert after.decoded() == before.decoded() and after.content_type == before.content_type
    assert marks_in(restored.to_bytes()) == []


def test_format_original_over_the_corpus_is_the_original_form_and_comes_back(config_file):
    args = ["--stdout", "-f", "a@example.org", "b@example.com"]
    pos = ["-c", str(config_file(rules('direction = "pos"\nformat = "original"\nmin_saving = 0'), name="pos.toml"))]
    neg = ["-c", str(config_file(rules('direction = "neg"'), name="neg.toml"))]
    packed_messages = 0
    for path in corpus_messages():
        data = without_from_line(path.read_bytes())
        packed = run_inline(pos + args, data)
        assert packed.code == 0, path.name
        if b"X-IspMailGate-Packer-Type: gzip" in packed.stdout:
            packed_messages += 1
            assert_the_original_form(data, packed.stdout)
        else:           # left whole, only marked (the original's neg leaves such mail alone)
            assert packed.stdout == b"X-ispMailGate-Packer: pos" + Message(data).eol + data, path.name
        restored = run_inline(neg + args, packed.stdout)
        assert restored.code == 0, path.name
        for before, after in zip(Message(data).leaves(), Message(restored.stdout).leaves(), strict=True):
            assert (after.decoded(), after.content_type) == (before.decoded(), before.content_type), path.name
    assert packed_messages >= 30


def assert_the_original_form(data: bytes, packed: bytes) -> None:
    """Read with the standard library's parser: every leaf is base64 over gzip of its old
    decoded body, under its old Content-Type, its old encoding recorded."""
    parsed = email.message_from_bytes(packed, policy=email.policy.default)
    leaves = [part for part in parsed.walk() if not part.is_multipart()]
    for before, after in zip(Message(data).leaves(), leaves, strict=True):
        assert after["Content-Transfer-Encoding"] == "base64"
        assert after["X-ispMailGate-Packer-PEncoding"] == (before.headers.get("Content-Transfer-Encoding") or "base64")
        assert gzip.decompress(after.get_payload(decode=True)) == before.decoded()


@pytest.mark.parametrize("name, why", [
    ("mbox-forward.eml", "embedded message"), ("pgp-signed.eml", "signed or encrypted"),
    ("smime-encrypted.eml", "signed or encrypted"), ("empty-parts.eml", "could not be taken apart"),
])
def test_what_the_original_cannot_take_is_left_whole_and_only_marked(config_file, tmp_path, name, why):
    data = without_from_line((CORPUS / name).read_bytes())
    run = gate(config_file, 'direction = "pos"\nformat = "original"\nmin_saving = 0', data)
    assert marks_in(run.stdout) == ["X-ispMailGate-Packer"]     # no packer named: its neg passes it
    assert run.stdout == b"X-ispMailGate-Packer: pos\n" + data
    assert "not packed in the original's form: " in (tmp_path / "gate.log").read_text()
    assert why in (tmp_path / "gate.log").read_text()


def test_min_saving_weighs_the_whole_message(tmp_path):
    data = without_from_line((CORPUS / "image-only.eml").read_bytes())      # a PNG: gzip cannot shrink it
    out = through(Packer(direction="pos", format="original"), data, tmp_path)
    assert marks_in(out) == ["X-ispMailGate-Packer"]
    assert len(marks_in(through(ORIGINAL, data, tmp_path))) == 3       # with min_saving = 0 it goes


def test_packed_mail_is_not_packed_again_in_either_form(tmp_path):
    once = through(ORIGINAL, plain_message(), tmp_path)
    assert through(ORIGINAL, once, tmp_path) == once
    assert through(Packer(direction="pos", min_saving=0), as_the_original(), tmp_path) == as_the_original()


# -- linear in what the sender controls ------------------------------------------------------------

def many_leaves_the_original_packed(count: int) -> bytes:
    return as_the_original([(["Content-Type: text/plain", "Content-Transfer-Encoding: 7bit"], b"x\n")] * count)


def deep_leaf_with_lookalike_lines(lines: int) -> bytes:
    """60 nested multiparts, at the bottom a leaf packed the original's way whose text has
    every level's delimiter in lines that only begin like one: each restored line is
    checked against all 60 delimiters."""
    marks = [b"lvl%02d" % level for level in range(60)]
    head = b"".join(b"Content-Type: multipart/mixed; boundary=%s\n\n--%s\n" % (m, m) for m in marks)
    tail = b"".join(b"\n--%s--\n" % m for m in reversed(marks))
    text = b"".join(b"--%sX and more\n" % m for m in marks) * (lines // 60 + 1)
    leaf_header, body = packed_leaf(["Content-Type: text/plain", "Content-Transfer-Encoding: 7bit"], text, 1)
    leaf = "".join(f + "\n" for f in leaf_header).encode() + b"\n" + b"\n".join(body)
    return b"X-IspMailGate-Packer-Type: gzip\nX-ispMailGate-Packer: pos\n" + head + leaf + tail


def neg(data: bytes) -> None:
    ctx = Context(Envelope("a@example.org", ("b@example.com",)), message_id="T", log=logging.getLogger("t"),
                  workdir=lambda: None, postmaster="pm@example.com")
    message = Message(data, max_parts=10 ** 7)
    Packer(max_unpacked=1 << 40).process(message, ctx)
    message.to_bytes()


def pos_original(data: bytes) -> None:
    ctx = Context(Envelope("a@example.org", ("b@example.com",)), message_id="T", log=logging.getLogger("t"),
                  workdir=lambda: None, postmaster="pm@example.com")
    message = Message(data, max_parts=10 ** 7)
    ORIGINAL.process(message, ctx)
    message.to_bytes()


@pytest.mark.parametrize("action, build, n", [
    (neg, many_leaves_the_original_packed, 200),
    (neg, deep_leaf_with_lookalike_lines, 2_000),
    (pos_original, lambda n: plain_message([(["Content-Type: text/plain"], b"words\n")] * n), 200),
], ids=["neg, many parts", "neg, 60 levels of delimiters", "pos original, many parts"])
def test_four_times_the_parts_or_lines_cost_about_four_times_as_much(action, build, n):
    from support.costly import cpu_seconds

    small = cpu_seconds(action, build(n))
    while small < 0.02 and n < 10 ** 6:
        n *= 4
        small = cpu_seconds(action, build(n))
    large = cpu_seconds(action, build(4 * n))
    assert large / small <= 8.0, f"n={n} took {small:.4f} s, 4n {large:.4f} s"
