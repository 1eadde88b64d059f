"""Hostile archives and messages for the virscan tests, built in memory by the tests."""

from __future__ import annotations

import base64
import functools
import io
import shutil
import struct
import subprocess
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

from support.clamav import EICAR

MiB = 1024 * 1024


def zip_of(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def nested_zip(data: bytes, names: list[str]) -> bytes:
    """``data`` as the innermost member, each name one more zip around it (outermost last)."""
    for name in names:
        data = zip_of({name: data})
    return data


def tar_of(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zeros_member(size: int) -> bytes:
    """A zip with one member of ``size`` zero bytes (compressed about 1000:1)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        with archive.open("zeros.bin", "w", force_zip64=size > 0x7FFFFFFF) as stream:
            chunk = bytes(MiB)
            for _ in range(size // MiB):
                stream.write(chunk)
    return buffer.getvalue()


@functools.cache
def nested_zip_bomb(fan_out: int = 16, levels: int = 3, leaf: int = 64 * MiB) -> bytes:
    """42.zip's shape: each level holds ``fan_out`` copies of the level below (here 256 GiB)."""
    data = zeros_member(leaf)
    for level in range(levels):
        data = zip_of({f"level{level}-{i}.zip": data for i in range(fan_out)})
    return data


@functools.cache
def high_ratio_gzip(size: int = 256 * MiB) -> bytes:
    """A gzip stream of ``size`` zero bytes (about 250 KB for 256 MiB)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    chunk = bytes(MiB)
    return b"".join(compressor.compress(chunk) for _ in range(size // MiB)) + compressor.flush()


@functools.cache
def many_member_zip(count: int = 100_000) -> bytes:
    """A zip with ``count`` empty stored members (about 9 MB for 100,000)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for number in range(count):
            archive.writestr(f"{number}", b"")
    return buffer.getvalue()


@functools.cache
def overlapping_zip(copies: int = 3, size: int = 16 * MiB) -> bytes:
    """Directory entries that all point at one member's bytes (the trick of flat zip bombs).

    Each entry is a complete, valid copy (name, sizes, CRC), so a reader that does not
    check the layout unpacks ``copies`` times ``size`` bytes from one stored member.
    """
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        warnings.simplefilter("ignore")         # "Duplicate name": that is the point
        for _ in range(copies):
            archive.writestr("bomb", bytes(size))
    data = bytearray(buffer.getvalue())
    position = data.find(b"PK\x01\x02")
    while position >= 0:
        struct.pack_into("<L", data, position + 42, 0)      # every entry -> the first member
        name_length, extra, comment = struct.unpack_from("<3H", data, position + 28)
        position = data.find(b"PK\x01\x02", position + 46 + name_length + extra + comment)
    return bytes(data)


def encrypted_zip(data: bytes = EICAR, name: str = "secret.com") -> bytes:
    """A ZipCrypto-encrypted zip made by Info-ZIP's real ``zip`` (tools/debian-packages)."""
    assert shutil.which("zip"), "zip is missing: install it (tools/debian-packages)"
    with tempfile.TemporaryDirectory(dir="/tmp") as work:
        (Path(work) / name).write_bytes(data)
        subprocess.run(["zip", "-q", "-P", "s3cret", "out.zip", name], cwd=work, check=True)
        return (Path(work) / "out.zip").read_bytes()


def seven_zip(members: dict[str, bytes], *switches: str) -> bytes:
    """A 7z made by the real 7-Zip (p7zip-full, tools/debian-packages); ``switches`` such as
    ``-pSecret`` (encrypted members) and ``-mhe=on`` (encrypted headers too)."""
    assert shutil.which("7z"), "7z is missing: install p7zip-full (tools/debian-packages)"
    with tempfile.TemporaryDirectory(dir="/tmp") as work:
        for name, data in members.items():
            (Path(work) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(work) / name).write_bytes(data)
        subprocess.run(["7z", "a", "-bd", "-bso0", *switches, "--", "out.7z", *members], cwd=work,
                       stdin=subprocess.DEVNULL, check=True)
        return (Path(work) / "out.7z").read_bytes()


def corrupt_seven_zip() -> bytes:
    """A 7z whose headers are intact but whose packed data is damaged (CRC errors)."""
    data = bytearray(seven_zip({"eicar.com": EICAR, "readme.txt": b"hello\n" * 50}))
    data[40:60] = b"\xff" * 20
    return bytes(data)


def hostile_tar(escape: Path, payload: bytes = EICAR) -> bytes:
    """``../`` and absolute names aimed at ``escape``, symlinks, hard links, devices, a fifo."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.GNU_FORMAT) as archive:
        def add(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", target: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname = kind, len(data), target
            info.devmajor, info.devminor = (1, 3) if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE) else (0, 0)
            archive.addfile(info, io.BytesIO(data) if data else None)

        add("../" * 12 + str(escape).lstrip("/") + "/dotdot.com", data=payload)
        add(str(escape / "absolute.txt"), data=b"absolute path\n")
        add("link-out", tarfile.SYMTYPE, target=str(escape / "symlink-target"))
        add("link-up", tarfile.SYMTYPE, target="../" * 12 + "etc/passwd")
        add("hard", tarfile.LNKTYPE, target="/etc/passwd")
        add(str(escape / "chr"), tarfile.CHRTYPE)
        add(str(escape / "blk"), tarfile.BLKTYPE)
        add(str(escape / "fifo"), tarfile.FIFOTYPE)
        add("../" * 12 + str(escape).lstrip("/") + "/dir", tarfile.DIRTYPE)
    return buffer.getvalue()


def message(*parts: tuple[str, str, bytes], subject: str = "test", eol: bytes = b"\n") -> bytes:
    """A multipart/mixed message: a text part, then each (filename, type, data) in base64."""
    lines = [b"From: Alice <alice@example.org>", b"To: bob@example.com", b"Subject: " + subject.encode(),
             b"Message-ID: <virscan-test@example.org>", b"MIME-Version: 1.0",
             b'Content-Type: multipart/mixed; boundary="b1"', b"", b"--b1",
             b"Content-Type: text/plain; charset=us-ascii", b"", b"Hello, see the attachment.", b""]
    for filename, content_type, data in parts:
        lines += [b"--b1", f'Content-Type: {content_type}; name="{filename}"'.encode(),
                  f'Content-Disposition: attachment; filename="{filename}"'.encode(),
                  b"Content-Transfer-Encoding: base64", b"", base64.encodebytes(data).rstrip(b"\n"), b""]
    lines.append(b"--b1--")
    return eol.join(lines) + eol
