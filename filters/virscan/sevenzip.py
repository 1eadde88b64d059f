"""7z archives, looked at with the 7-Zip command line before the scanner gets them whole.

clamd unpacks 7z itself, but answers OK for one it cannot open: an encrypted archive
(with or without encrypted headers) or a damaged one.  So a 7z left to the scanner is
first listed (``7z l -slt``) and tested (``7z t``) here: an encrypted member, headers that
need a password, a listing or test that fails, or declared sizes past the unpacker's
limits make it unscannable.  7-Zip runs from an argv list, never a shell, on a private
copy in the message's work directory, with stdin closed, an empty password (``-p``: it
never prompts), a timeout, and no more output read than the member limit explains.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .archives import Declared, Unpacker, Unscannable
from ..base import printable
from .scanners import ScannerError, bounded_run, write_private

SEPARATOR = "----------"        # between the archive's properties and its members in -slt


class SevenZip:
    """A lister for :class:`~.archives.Unpacker`: ``SevenZip(...)(unpacker, label, data)``."""

    LINE = 1024                 # output allowed per member (name, size, dates, method ...)

    def __init__(self, binary: str, *, timeout: float, directory: Callable[[], Path]) -> None:
        self.binary, self.timeout, self.directory = binary, timeout, directory
        self.count = 0

    def __call__(self, unpacker: Unpacker, label: str, data: bytes) -> None:
        """Record in ``unpacker`` whatever keeps the scanner from seeing all of ``data``."""
        folder = self.directory() / "7z"
        self.count += 1
        name = f"{self.count:06d}.7z"       # relative, so 7-Zip's messages never name our paths
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            write_private(folder / name, data)
        except OSError as error:        # a full or unwritable tmp_dir: defer, as for the scanner
            raise ScannerError(f"cannot write {folder / name} for 7-Zip: {error.strerror or error}") from None
        try:
            most = max(64 * 1024, (unpacker.limits.members + 8) * self.LINE)
            members = listing(self.run(["l", "-slt"], name, folder, most))
            if unpacker.declared(label, members, len(data)):
                self.run(["t", "-bd"], name, folder, most)    # unpacks no more than just allowed
        finally:
            os.unlink(folder / name)

    def run(self, command: list[str], name: str, folder: Path, most: int) -> str:
        """7-Zip's output for ``command`` on ``name``; any complaint raises Unscannable."""
        argv = [self.binary, *command, "-t7z", "-p", "-sccUTF-8", "--", name]
        code, output = bounded_run(argv, folder, self.timeout, most, "7-Zip", Unscannable,
                                   " about it (too many members or overlong names)")
        lines = [line.strip() for line in output.splitlines()]
        if code != 0 and any("Wrong password" in line for line in lines):
            raise Unscannable("encrypted member" if command[0] == "t" else
                              "encrypted 7z headers (cannot be listed without the password)")
        if code != 0 or "WARNINGS:" in lines:
            raise Unscannable(f"corrupt 7z: {complaint(lines, code)}")
        return output


def sevenzip_problems(binary: str) -> list[str]:
    """For ``ispmailgate check``: without 7-Zip every 7z is unscannable."""
    import shutil

    if shutil.which(binary):
        return []
    return [f"sevenzip {binary} is not an executable (install p7zip-full): every 7z left to "
            "the scanner is unscannable"]


def listing(output: str) -> list[Declared]:
    """The members of ``7z l -slt`` output.

    Read so that a member name cannot hide anything: every block after the separator
    counts as a member, all its sizes count, and it is encrypted if any of its lines says so.
    """
    lines = output.splitlines()
    if SEPARATOR not in lines:
        raise Unscannable("corrupt 7z: 7-Zip listed no members")
    members = []
    for block in "\n".join(lines[lines.index(SEPARATOR) + 1:]).split("\n\n"):
        fields = [line.partition(" = ") for line in block.splitlines() if line.strip()]
        if not fields:
            continue
        sizes = [value for key, _, value in fields if key == "Size"]
        if not all(size.isdigit() or size == "" for size in sizes):
            raise Unscannable("corrupt 7z: 7-Zip listed a size that is not a number")
        path = next((value for key, _, value in fields if key == "Path"), "?")
        members.append(Declared(path, sum(int(size or 0) for size in sizes),
                                any(key == "Encrypted" and value != "-" for key, _, value in fields)))
    return members


def complaint(lines: list[str], code: int) -> str:
    """The line of 7-Zip's output that says what is wrong."""
    for marker in ("ERRORS:", "WARNINGS:"):
        if marker in lines and lines.index(marker) + 1 < len(lines) and lines[lines.index(marker) + 1]:
            return printable(lines[lines.index(marker) + 1], 160)
    for line in lines:
        if line.startswith(("Open ERROR:", "ERROR:")):
            return printable(line.partition(":")[2].strip(), 160)
    return f"7-Zip exited {code}"
