"""The unpacker on its own: every member found, every attack stopped within its limits."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import resource
import sys
import tarfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.attacks import (MiB, corrupt_seven_zip, encrypted_zip, high_ratio_gzip, hostile_tar, many_member_zip,
                     nested_zip, nested_zip_bomb, overlapping_zip, seven_zip, tar_of, zip_of)
from support.clamav import EICAR
from ispmailgate_filters.virscan.archives import Limits, Unpacker, sniff
from ispmailgate_filters.base import printable
from ispmailgate_filters.virscan.scanners import ScannerError
from ispmailgate_filters.virscan.sevenzip import SevenZip, listing, sevenzip_problems


def unpack(data: bytes, **limits) -> tuple[dict[str, bytes], list[tuple[str, str]], Unpacker]:
    """The members found (the archive itself, handed over whole as well, left out: see
    test_an_archive_goes_to_the_scanner_whole_as_well)."""
    unpacker = Unpacker(Limits(**limits))
    items = {item.label: item.data for item in unpacker.items("part", data) if not item.extra}
    return items, unpacker.problems, unpacker


def test_plain_data_is_one_item():
    items, problems, _ = unpack(b"just text, BZh91AY&SY is not at the start\n")
    assert items == {"part": b"just text, BZh91AY&SY is not at the start\n"}
    assert problems == []


def test_text_that_starts_like_bzip2_is_not_an_archive():
    assert sniff(b"BZh9 is how a bzip2 file starts, but this is prose\n") is None


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_members_in_every_compression(mode):
    items, problems, _ = unpack(tar_of({"docs/a.txt": b"alpha", "b.com": EICAR}, mode))
    assert problems == []
    assert list(items.values())[-2:] == [b"alpha", EICAR]
    assert any(label.endswith('"b.com"') for label in items)


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_single_compressed_streams(compress):
    items, problems, _ = unpack(compress(EICAR))
    assert problems == []
    assert list(items.values()) == [EICAR]


def test_zip_in_zip_in_zip_is_unpacked_to_the_bottom():
    items, problems, _ = unpack(nested_zip(EICAR, ["eicar.com", "inner.zip", "middle.zip", "outer.zip"]))
    assert problems == []
    assert items == {'part > "outer.zip" > "middle.zip" > "inner.zip" > "eicar.com"': EICAR}


def test_nesting_past_max_depth_is_unscannable():
    data = nested_zip(b"deep", ["f"] + [f"{n}.zip" for n in range(5)])
    items, problems, _ = unpack(data, depth=3)
    assert b"deep" not in items.values()
    assert [reason for _, reason in problems] == ["archives nested deeper than max_depth (3)"]


def test_nested_zip_bomb_stops_within_the_budget():
    bomb = nested_zip_bomb()        # 16 KB that unpack to 256 GiB
    started = time.monotonic()
    items, problems, unpacker = unpack(bomb, unpacked=64 * MiB)
    assert time.monotonic() - started < 30
    assert unpacker.unpacked <= max(MiB, 100 * len(bomb)) + 1      # the whole's ratio (finding 16)
    reasons = {reason for _, reason in problems}
    assert "compression ratio of the whole above max_ratio (100)" in reasons
    assert sum(map(len, items.values())) < 64 * MiB


def test_high_ratio_gzip_is_read_no_further_than_the_ratio_allows():
    data = high_ratio_gzip(128 * MiB)
    items, problems, unpacker = unpack(data)
    assert problems == [('part > "(gunzipped)"', "compression ratio above max_ratio (100)")]
    assert unpacker.unpacked <= 100 * len(data) + 1
    assert items == {}


def test_member_size_limit():
    items, problems, _ = unpack(zip_of({"big": os.urandom(3 * MiB), "small": b"ok"}), member=2 * MiB)
    assert problems == [('part > "big"', f"member larger than max_member_size ({2 * MiB} bytes)")]
    assert items == {'part > "small"': b"ok"}


def test_hundred_thousand_member_zip_is_refused_before_parsing():
    data = many_member_zip(100_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    items, problems, _ = unpack(data)
    assert time.monotonic() - started < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024    # KiB
    assert problems == [("part", "100000 members, more than max_members (1000)")]
    assert items == {}


def test_overlapping_zip_entries_are_refused():
    items, problems, unpacker = unpack(overlapping_zip())
    assert problems == [("part", "overlapping or misplaced members (zip bomb construction)")]
    assert items == {} and unpacker.unpacked == 0


def test_encrypted_zip_member_is_unscannable():
    items, problems, _ = unpack(encrypted_zip())
    assert problems == [('part > "secret.com"', "encrypted member")]
    assert items == {}


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_archives_are_unscannable_and_go_to_the_scanner_whole(damage):
    archive = zip_of({"a.txt": b"x" * 10_000})
    data = archive[:len(archive) // 2] if damage == "truncated" else b"PK\x03\x04" + b"\xff" * 200
    items, problems, _ = unpack(data)
    assert [label for label, _ in problems] == ["part"]
    assert problems[0][1].startswith("corrupt zip")
    assert items == {"part": data}


def test_truncated_gzip_is_corrupt():
    data = gzip.compress(b"y" * 100_000)[:-20]
    _, problems, _ = unpack(data)
    assert problems[0][1].startswith("corrupt gzip")


def test_tar_data_hidden_behind_a_damaged_header_is_unscannable():
    archive = bytearray(tar_of({"first": b"a" * 600, "second.com": EICAR}, "w"))
    archive[1536:1536 + 100] = b"\xff" * 100        # the second header: Python's tarfile stops here
    _, problems, _ = unpack(bytes(archive))
    assert ("part", "data after the end of the tar archive") in problems


@pytest.mark.parametrize("kind", [b"M", b"Q"])
def test_tar_entries_of_a_type_that_carries_unread_data_are_unscannable(kind):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        info = tarfile.TarInfo("continued.com")
        info.type, info.size = kind, len(EICAR)
        archive.addfile(info, io.BytesIO(EICAR))
    items, problems, _ = unpack(buffer.getvalue())
    assert items == {}
    assert problems == [('part > "continued.com"', f"tar entry of type {printable(repr(kind), 20)} "
                                                   f"holds {len(EICAR)} bytes that are not read")]


def test_hostile_tar_names_are_labels_and_links_devices_are_skipped_with_a_note(tmp_path):
    escape = tmp_path / "escape"
    items, problems, unpacker = unpack(hostile_tar(escape))
    assert problems == []
    assert list(items.values()) == [EICAR, b"absolute path\n"]
    assert all(label.startswith('part > "') for label in items)
    assert not escape.exists()
    notes = {label.removeprefix("part > "): reason for label, reason in unpacker.notes}
    climb = "../" * 12 + str(escape).lstrip("/")
    assert notes == {
        f'"(gunzipped)" > "{climb}/dotdot.com"': "absolute or ../ name, used as a label only",
        f'"(gunzipped)" > "{escape}/absolute.txt"': "absolute or ../ name, used as a label only",
        '"(gunzipped)" > "link-out"': f'symbolic link to "{escape}/symlink-target": no content, not scanned',
        '"(gunzipped)" > "link-up"': f'symbolic link to "{"../" * 12}etc/passwd": no content, not scanned',
        '"(gunzipped)" > "hard"': 'hard link to "/etc/passwd": no content, not scanned',
        f'"(gunzipped)" > "{escape}/chr"': "character device: no content, not scanned; "
                                          "absolute or ../ name, used as a label only",
        f'"(gunzipped)" > "{escape}/blk"': "block device: no content, not scanned; "
                                          "absolute or ../ name, used as a label only",
        f'"(gunzipped)" > "{escape}/fifo"': "fifo: no content, not scanned; "
                                           "absolute or ../ name, used as a label only",
        f'"(gunzipped)" > "{climb}/dir"': "absolute or ../ name, used as a label only",
    }


def test_note_names_stay_printable():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("evil\r\nX-Injected: yes\x1b[31m")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/\npasswd\u202e"
        archive.addfile(info)
    _, problems, unpacker = unpack(buffer.getvalue())
    assert problems == []
    assert unpacker.notes == [('part > "evil??X-Injected: yes?[31m"',
                               'symbolic link to "/etc/?passwd?": no content, not scanned')]


def test_rar_and_7z_are_unscannable_unless_left_to_the_scanner():
    rar = b"Rar!\x1a\x07\x01\x00" + b"\0" * 40
    seven = b"7z\xbc\xaf\x27\x1c" + b"\0" * 40
    for kind, data in (("rar", rar), ("7z", seven)):
        items, problems, _ = unpack(data)
        assert problems == [("part", f"{kind} archives cannot be unpacked here")] and items == {"part": data}
    unpacker = Unpacker(Limits(), frozenset({"rar"}))
    assert [item.data for item in unpacker.items("part", rar)] == [rar] and unpacker.problems == []


# -- 7z: left whole to the scanner, after 7-Zip listed and tested it ------------------------------

def unpack_7z(data: bytes, tmp_path, binary: str = "/usr/bin/7z", timeout: float = 30, **limits):
    lister = SevenZip(binary, timeout=timeout, directory=lambda: tmp_path)
    unpacker = Unpacker(Limits(**limits), frozenset({"7z"}), {"7z": lister})
    items = {item.label: item.data for item in unpacker.items("part", data) if not item.extra}
    assert list((tmp_path / "7z").iterdir()) == []        # the copy for 7-Zip is gone
    return items, unpacker.problems, unpacker


def test_plain_7z_goes_to_the_scanner_whole(tmp_path):
    data = seven_zip({"eicar.com": EICAR, "docs/readme.txt": b"hello\n"})
    items, problems, unpacker = unpack_7z(data, tmp_path)
    assert problems == [] and items == {"part": data}
    assert unpacker.unpacked == len(EICAR) + 6       # the scanner's work, charged to the budget


@pytest.mark.parametrize("switches, expected", [
    (["-pSecret"], [('part > "eicar.com"', "encrypted member"), ('part > "readme.txt"', "encrypted member")]),
    (["-pSecret", "-mhe=on"], [("part", "encrypted 7z headers (cannot be listed without the password)")]),
], ids=["encrypted members", "encrypted headers"])
def test_encrypted_7z_is_unscannable(switches, expected, tmp_path):
    data = seven_zip({"eicar.com": EICAR, "readme.txt": b"hello\n"}, *switches)
    items, problems, _ = unpack_7z(data, tmp_path)
    assert problems == expected
    assert items == {"part": data}      # the scanner still sees what it can


@pytest.mark.parametrize("damage, reasons", [
    ("data", {"corrupt 7z: Data Error : eicar.com", "corrupt 7z: CRC Failed : eicar.com"}),
    ("truncated", {"corrupt 7z: Unexpected end of archive"}),
    ("tail", {"corrupt 7z: There are data after the end of archive"}),
])
def test_corrupt_7z_is_unscannable(damage, reasons, tmp_path):
    whole = seven_zip({"eicar.com": EICAR})
    data = {"data": corrupt_seven_zip(), "truncated": whole[:-20], "tail": whole + b"hidden"}[damage]
    _, problems, _ = unpack_7z(data, tmp_path)
    [(label, reason)] = problems
    assert label == "part" and reason in reasons


def test_7z_limits_are_held_to_what_the_listing_declares(tmp_path):
    members = {f"{n}.txt": b"x" for n in range(4)}
    _, problems, _ = unpack_7z(seven_zip(members), tmp_path, members=3)
    assert problems == [("part", "4 members, more than max_members (3)")]
    zeros = seven_zip({"zeros.bin": bytes(3 * MiB)})
    _, problems, unpacker = unpack_7z(zeros, tmp_path)
    assert problems == [("part", "compression ratio above max_ratio (100)")]
    _, problems, _ = unpack_7z(zeros, tmp_path, member=2 * MiB, ratio=10_000)
    assert problems == [('part > "zeros.bin"', f"member larger than max_member_size ({2 * MiB} bytes)")]
    _, problems, unpacker = unpack_7z(zeros, tmp_path, unpacked=2 * MiB, ratio=10_000)
    assert problems == [("part", f"more than max_unpacked ({2 * MiB} bytes) unpacked in total")]
    assert unpacker.unpacked == 0


def test_7z_inside_a_zip_is_listed_too(tmp_path):
    inner = seven_zip({"eicar.com": EICAR}, "-pSecret", "-mhe=on")
    items, problems, _ = unpack_7z(zip_of({"inner.7z": inner}), tmp_path)
    assert items == {'part > "inner.7z"': inner}
    assert problems == [('part > "inner.7z"', "encrypted 7z headers (cannot be listed without the password)")]


def test_7z_without_7zip_is_unscannable(tmp_path):
    data = seven_zip({"a.txt": b"a"})
    items, problems, _ = unpack_7z(data, tmp_path, binary=str(tmp_path / "no-7z"))
    assert problems == [("part", f"cannot run 7-Zip ({tmp_path / 'no-7z'}): No such file or directory")]
    assert items == {"part": data}
    assert sevenzip_problems(str(tmp_path / "no-7z")) == [
        f"sevenzip {tmp_path / 'no-7z'} is not an executable (install p7zip-full): every 7z left to the "
        "scanner is unscannable"]
    assert sevenzip_problems("/usr/bin/7z") == []


def test_7z_that_cannot_be_copied_for_7zip_is_a_scanner_error(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    lister = SevenZip("/usr/bin/7z", timeout=30, directory=lambda: blocker)
    unpacker = Unpacker(Limits(), frozenset({"7z"}), {"7z": lister})
    with pytest.raises(ScannerError, match="cannot write .* for 7-Zip: Not a directory"):
        list(unpacker.items("part", seven_zip({"a.txt": b"a"})))


@pytest.mark.parametrize("behaviour, reason", [
    ("import time; time.sleep(30)", "7-Zip took longer than 1 s"),
    ("import sys\nwhile True: sys.stdout.write('Path = x\\n' * 1000)",
     "7-Zip said more than 1032192 bytes about it (too many members or overlong names)"),
    ("print('----------')\nprint('Path = a')\nprint('Size = 1e9')",
     "corrupt 7z: 7-Zip listed a size that is not a number"),
], ids=["hangs", "talks forever", "nonsense"])
def test_a_misbehaving_7zip_makes_the_7z_unscannable_quickly(behaviour, reason, tmp_path):
    fake = tmp_path / "fake7z"
    fake.write_text(f"#!{sys.executable}\n{behaviour}\n")
    fake.chmod(0o755)
    started = time.monotonic()
    _, problems, _ = unpack_7z(seven_zip({"a.txt": b"a"}), tmp_path, binary=str(fake), timeout=1)
    assert problems == [("part", reason)]
    assert time.monotonic() - started < 10


def test_7z_listing_read_so_that_names_hide_nothing():
    output = ("Path = x.7z\nType = 7z\n\n----------\nPath = a\nSize = 5\nEncrypted = -\n\n"
              "Path = b\nSize = 7\n\nSize = 9\nEncrypted = +\n\n")
    members = listing(output)
    assert [(m.name, m.size, m.encrypted) for m in members] == [("a", 5, False), ("b", 7, False),
                                                                ("?", 9, True)]


def test_member_names_are_neutralised_in_labels():
    items, _, _ = unpack(zip_of({"evil\r\nX-Injected:\u202e yes\x00.com": b"x"}))
    [label] = items
    assert "\r" not in label and "\n" not in label and "\x00" not in label and "\u202e" not in label
    assert label == 'part > "evil??X-Injected:? yes"'        # zip names end at NUL


def test_printable_neutralises_controls_surrogates_and_length():
    assert printable("a\rb\nc\x00d\x1be\u2028f\udcff") == "a?b?c?d?e?f\ufffd"
    assert printable("x" * 500, 20) == "x" * 17 + "..."


# -- hostile bytes: the unpacker is total --------------------------------------------------------

PROPERTY = settings(max_examples=300, deadline=5000, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SAMPLES = [zip_of({"a.txt": b"alpha" * 50, "dir/b.com": EICAR}), tar_of({"a": b"x" * 700, "b": EICAR}),
           tar_of({"a": b"y" * 100}, "w:bz2"), tar_of({"a": b"z" * 100}, "w:xz"), gzip.compress(EICAR),
           nested_zip(b"deep", ["f", "a.zip", "b.zip"])]


@PROPERTY
@given(sample=st.sampled_from(SAMPLES), damage=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                           max_size=8), cut=st.integers(0, 10_000))
def test_damaged_archives_never_raise(sample, damage, cut):
    data = bytearray(sample)
    for position, value in damage:
        data[position % len(data)] = value
    data = bytes(data[:max(cut, 4)]) if cut < len(data) else bytes(data)
    items, problems, unpacker = unpack(data)
    assert all(isinstance(label, str) and isinstance(reason, str) for label, reason in problems)
    assert unpacker.unpacked <= Limits().unpacked + 1


# -- what any extractor could extract (attack review 1, finding 6) -------------------------------

def sfx(archive: bytes, stub: bytes = b"MZ" + b"\0" * 62) -> bytes:
    """``archive`` behind a program stub with every offset moved, as ``zip -A`` makes a
    self-extractor."""
    import struct

    data = bytearray(stub + archive)
    end = data.rfind(b"PK\x05\x06")
    central = struct.unpack_from("<I", data, end + 16)[0] + len(stub)
    struct.pack_into("<I", data, end + 16, central)
    while data[central:central + 4] == b"PK\x01\x02":
        offset = struct.unpack_from("<I", data, central + 42)[0]
        struct.pack_into("<I", data, central + 42, offset + len(stub))
        name, extra, comment = struct.unpack_from("<HHH", data, central + 28)
        central += 46 + name + extra + comment
    return bytes(data)


def test_an_archive_goes_to_the_scanner_whole_as_well():
    """The scanner unpacks it as another extractor would; the layers inside go as members."""
    archive = nested_zip(EICAR, ["eicar.com", "inner.zip"])
    items = list(Unpacker(Limits()).items("part", archive))
    assert [(item.label, item.extra) for item in items] == [('part > "inner.zip" > "eicar.com"', False), ("part", True)]
    assert items[1].data == archive
    unscannable = list(Unpacker(Limits()).items("part", encrypted_zip()))    # unscannable already:
    assert [item for item in unscannable if item.extra] == []                # not whole as well


@pytest.mark.parametrize("stub", [b"MZ" + b"\0" * 62, b"#!/bin/sh\nexit 0\n"])
def test_a_zip_behind_a_stub_is_read_as_a_zip(stub):
    assert sniff(sfx(zip_of({"a.txt": b"x"}), stub)) == "zip"
    items, problems, _ = unpack(sfx(encrypted_zip(), stub))
    assert [reason for _, reason in problems] == ["encrypted member"]
    items, problems, _ = unpack(sfx(zip_of({"e.com": EICAR}), stub))
    assert problems == [] and list(items.values()) == [EICAR]


def test_a_7z_behind_a_stub_is_recognised(tmp_path):
    data = b"MZ" + b"\0" * 100 + seven_zip({"eicar.com": EICAR}, "-pSecret", "-mhe=on")
    assert sniff(data) == "7z"


def mismatch_zip() -> bytes:
    """EICAR under the local name invoice.exe, listed centrally as the directory invoice.ex/."""
    data = bytearray(zip_of({"invoice.exe": EICAR}))
    name = data.rfind(b"PK\x01\x02") + 46
    data[name + 10] = ord("/")
    return bytes(data)


def hidden_local_entry_zip() -> bytes:
    """A harmless zip with a second local entry (EICAR) between its member and its central
    directory, which lists only the harmless one."""
    import struct

    harmless, hidden = zip_of({"readme.txt": b"hello\n"}), zip_of({"invoice.exe": EICAR})
    local = hidden[:hidden.rfind(b"PK\x01\x02")]
    central, end = harmless.rfind(b"PK\x01\x02"), harmless.rfind(b"PK\x05\x06")
    record = bytearray(harmless[end:])
    struct.pack_into("<I", record, 16, central + len(local))
    return harmless[:central] + local + harmless[central:end] + bytes(record)


def directory_with_data_zip() -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo("eicar.com/"), EICAR)
    return buffer.getvalue()


@pytest.mark.parametrize("archive, reason", [
    (mismatch_zip(), "a member named differently in its local header and in the central directory"),
    (hidden_local_entry_zip(), "a local entry outside the central directory (content some extractors "
                               "take and this one does not)"),
    (b"PK\x03\x04" + b"\0" * 26 + zip_of({"a.txt": b"x"}), "a local entry outside the central directory "
     "(content some extractors take and this one does not)"),
    (directory_with_data_zip(), "a directory entry that holds data"),
])
def test_a_zip_whose_local_headers_and_central_directory_disagree_is_unscannable(archive, reason):
    """The review's zips: each hid EICAR from a reader of the central directory alone."""
    items, problems, _ = unpack(archive)
    assert problems == [("part", reason)]
    assert EICAR not in items.values()


def test_zips_as_common_tools_write_them_are_consistent(tmp_path):
    import subprocess
    import zipfile

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_bytes(b"alpha\n" * 1000)
    (tmp_path / "d" / "e.com").write_bytes(EICAR)
    subprocess.run(["7z", "a", "-tzip", str(tmp_path / "7z.zip"), str(tmp_path / "d")], check=True,
                   capture_output=True)
    streamed = io.BytesIO()             # data descriptors after each member (bit 3)
    with zipfile.ZipFile(streamed, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("s.txt", "w", force_zip64=True) as member:
            member.write(b"streamed\n" * 100)
        archive.mkdir("empty") if hasattr(archive, "mkdir") else archive.writestr("empty/", b"")
    for data in ((tmp_path / "7z.zip").read_bytes(), streamed.getvalue(), zip_of({"x": b""})):
        items, problems, _ = unpack(data)
        assert problems == [], problems


def test_many_small_bombs_in_one_archive_are_one_bomb():
    """Attack review 1, finding 16: a 2.5 KB tgz of 199 bz2 members of 1 MiB each unpacked
    200 MB (each member within the ratio's grace): the ratio holds for the whole too."""
    import bz2
    import tarfile

    member = bz2.compress(bytes(1 << 20), 9)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for i in range(199):
            info = tarfile.TarInfo(f"m{i}.bz2")
            info.size = len(member)
            archive.addfile(info, io.BytesIO(member))
    data = buffer.getvalue()
    assert len(data) < 10_000
    items, problems, unpacker = unpack(data)
    assert problems == [("part", "compression ratio of the whole above max_ratio (100)")]
    assert unpacker.unpacked <= 2 << 20 + 1
