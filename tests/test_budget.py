"""One work budget per message, shared by every filter (issue 14, class 4).

A few KB of nested tar.gz unpack to 389,017 empty files; base64 message/rfc822 parts each
brought a fresh 10,000 parts.  Past the budget (max_objects, max_decoded, and
max_mime_parts / max_mime_depth counting inner messages too) virscan stops and says
unscannable, after a bounded number of objects: counted here, never timed.
"""

from __future__ import annotations

import base64

import pytest

from support import costly
from conftest import config_error, run_inline

SENDER, RECIPIENT = "a@b.example", "c@d.example"


@pytest.fixture
def scans(monkeypatch):
    """How many objects virscan handed to clamd."""
    from ispmailgate_filters.virscan.scanners import Clamd

    count = [0]
    real = Clamd.instream

    def counting(self, data):
        count[0] += 1
        return real(self, data)

    monkeypatch.setattr(Clamd, "instream", counting)
    return count


@pytest.fixture
def virscan(config_file, smtp_sink, clamd):
    """Run a message through virscan with top-level settings: -> (exit, delivered bytes)."""
    def run(data: bytes, settings: str = "") -> tuple[int, list[bytes]]:
        config = config_file(f'mail_host = "{smtp_sink.address}"\n{settings}default_filter = ["av"]\n'
                             f'[filter.av]\ntype = "virscan"\nsocket = "{clamd.socket}"\nclamd_config = ""\n')
        before = len(smtp_sink.messages)
        result = run_inline(["-c", str(config), "-f", SENDER, RECIPIENT], data)
        return result.code, [m.content for m in smtp_sink.messages[before:] if m.mail_from == SENDER]
    return run


def verdict(delivered: list[bytes]) -> str:
    from ispmailgate_filters.mime import Message

    [content] = delivered
    return Message(content).headers.get("X-ispMailGate-VirScan")


def test_nested_tar_gz_of_empty_files_stops_at_max_objects(virscan, scans):
    data = costly.with_attachment("t.tar.gz", costly.nested_tar_gz(3, 73))      # 389,017 files in 3 KB
    code, delivered = virscan(data, "max_objects = 300\n")
    assert code == 0
    assert verdict(delivered).startswith("unscannable (more than max_objects (300) objects")
    assert scans[0] <= 300


def test_the_default_limits_bound_the_same_message(virscan, scans):
    """By default virscan's max_ratio for the attachment as a whole (3 KB may unpack to
    1 MiB, its grace) stops it first, before max_objects (10000)."""
    code, delivered = virscan(costly.with_attachment("t.tar.gz", costly.nested_tar_gz(3, 73)))
    assert code == 0 and verdict(delivered) == "unscannable (compression ratio of the whole above max_ratio (100))"
    assert scans[0] <= 10_000


def test_attached_messages_share_max_mime_parts(virscan, scans):
    data = costly.base64_messages(3, 300)        # 3 inner messages of 300 parts: 900 in all
    code, delivered = virscan(data, "max_mime_parts = 500\n")
    assert code == 0
    assert verdict(delivered) == "unscannable (MIME nesting beyond the parser's limits)"
    assert scans[0] <= 500 + 1                   # and the whole message, for clamd to look at
    code, delivered = virscan(data, "max_mime_parts = 2000\n")
    assert verdict(delivered) == "scanned"


def test_attached_messages_continue_max_mime_depth(virscan):
    data = costly.nested_base64_rfc822(3, 100)   # 3 levels of base64 message/rfc822
    code, delivered = virscan(data, "max_mime_depth = 4\n")
    assert code == 0
    assert verdict(delivered) == "unscannable (MIME nesting beyond the parser's limits)"
    code, delivered = virscan(data, "max_mime_depth = 8\n")
    assert verdict(delivered) == "scanned"


def test_decoded_bytes_past_max_decoded_are_unscannable(virscan):
    data = costly.with_attachment("a.bin", bytes(range(256)) * 8192)      # 2 MiB decoded
    code, delivered = virscan(data, 'max_decoded = "1M"\n')
    assert code == 0
    assert verdict(delivered).startswith("unscannable (more than max_decoded (1048576 bytes)")


def test_packer_unpacks_within_max_decoded(config_file, smtp_sink):
    payload = b"all work and no play\n" * 100_000           # 2.1 MB, packs to a few KB
    data = costly.with_attachment("a.txt", payload)
    pack = config_file('default_filter = ["zip"]\n[filter.zip]\ntype = "packer"\ndirection = "pos"\n'
                       'codec = "gzip"\n', name="pack.toml")
    packed = run_inline(["-c", str(pack), "--stdout", "-f", SENDER, RECIPIENT], data)
    assert packed.code == 0 and b"X-ispMailGate-Packed" in packed.stdout
    unpack = config_file('max_decoded = "1M"\ndefault_filter = ["unzip"]\n[filter.unzip]\ntype = "packer"\n'
                         'direction = "neg"\non_unpack_error = "keep"\n', name="unpack.toml")
    kept = run_inline(["-c", str(unpack), "--stdout", "-f", SENDER, RECIPIENT], packed.stdout)
    assert kept.code == 0 and b"X-ispMailGate-Packed" in kept.stdout      # left packed
    unpack.write_text(unpack.read_text().replace('max_decoded = "1M"', 'max_decoded = "4M"'))
    restored = run_inline(["-c", str(unpack), "--stdout", "-f", SENDER, RECIPIENT], packed.stdout)
    assert restored.code == 0 and base64.encodebytes(payload)[:1000] in restored.stdout


def test_an_inner_parse_counts_toward_the_message_it_is_in():
    from ispmailgate_filters.mime import Message

    message = Message(costly.many_parts(5), max_parts=20)
    assert len(list(message.walk())) == 6
    inner = message.parse_inner(costly.many_parts(30), 1)
    assert inner.is_leaf and len(inner.children) == 0            # kept opaque: 6 + 30 > 20
    assert any("more than 20 parts" in defect for defect in message.defects)
    assert message.parse_inner(costly.many_parts(5), 1).is_multipart    # 6 + 1 + 6 <= 20
    deep = message.parse_inner(costly.many_parts(1), 64)
    assert deep.is_leaf and deep.depth == 64


def test_the_budget_counts_objects_and_bytes_once_spent_for_good():
    from ispmailgate_filters.base import Budget

    budget = Budget(objects=3, decoded=100)
    assert budget.charge(objects=3, decoded=60) is None and budget.room() == 40
    assert budget.charge(decoded=41) == "more than max_decoded (100 bytes) decoded and unpacked in one message"
    assert budget.room() == 0
    assert budget.charge(objects=1) == budget.spent      # the first reason stays


@pytest.mark.parametrize("text, path, message", [
    ("max_objects = 0\n", "max_objects", "integer from 1 to"),
    ('max_objects = "many"\n', "max_objects", "integer from 1 to"),
    ('max_decoded = "lots"\n', "max_decoded", "size like 200M"),
])
def test_budget_settings_are_checked(tmp_path, text, path, message):
    error = config_error(text, tmp_path)
    assert error.path == path and message in error.message
