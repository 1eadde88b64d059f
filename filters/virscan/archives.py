"""Archives as a virus scanner must see them: every member, within limits, never on disk.

An attachment is hostile input, so it is unpacked in memory with the standard library
(zip; tar plain, gz, bz2, xz; single gz, bz2, xz streams), recognised by its content
(its first bytes, or a zip's end record or a 7z or RAR signature behind a stub), never
by its name; a zip whose local headers and central directory disagree is unscannable
(:mod:`.zips`).  No member name is ever used as a path and nothing is extracted to the
file system: links, devices and directories carry no data and are skipped.  Every read is
bounded before it happens, so a bomb costs at most the configured limits:

- ``depth``: archives inside archives (a compressed stream counts as one level);
- ``members``: entries in one archive (read from the zip's end record before parsing);
- ``member``: bytes of one unpacked member;
- ``ratio``: unpacked size over packed size, checked once a member passes ``RATIO_GRACE``;
- ``unpacked``: bytes unpacked for the whole message; past it unpacking stops everywhere.

Whatever cannot be looked into (a limit, an encrypted member, a corrupt or unknown
archive) is recorded as a problem: the message is then ``unscannable``, a verdict of its
own, while everything that could be read is still handed to the scanner.  A kind left
whole to the scanner (7z) is checked by a lister first (see :mod:`.sevenzip`): what its
listing declares must pass the same limits.  Entries without content (links, devices,
fifos) and hostile member names are recorded as notes, for the log: they are not a verdict.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from ..base import Budget, printable
from ..bounded import read_at_most
from .zips import Inconsistent, is_zip_at_end, members as zip_entries

MiB = 1024 * 1024
RATIO_GRACE = MiB       # small members may compress far better than max_ratio (zeros, logs)

# First bytes -> kind.  7z and RAR are recognised but not unpacked here (see Unpacker).
_MAGIC = ((b"PK\x03\x04", "zip"), (b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"),
          (b"7z\xbc\xaf\x27\x1c", "7z"), (b"Rar!\x1a\x07", "rar"))


@dataclass(frozen=True)
class Limits:
    depth: int = 8
    members: int = 1000
    member: int = 50 * MiB
    ratio: int = 100
    unpacked: int = 200 * MiB


@dataclass(frozen=True)
class Item:
    """One object for the scanner: a label for people (never a path) and its bytes.

    ``extra``: another view of bytes that are scanned another way as well (the whole
    message, an archive whose members are scanned): past the scanner's stream limit it is
    left out, not unscannable."""
    label: str
    data: bytes
    extra: bool = False


@dataclass(frozen=True)
class Declared:
    """A member as the listing of an archive left to the scanner declares it."""
    name: str
    size: int
    encrypted: bool


@dataclass(frozen=True)
class Note:
    """An entry worth a line in the log but no verdict: no content of its own, a hostile name."""
    reason: str


class Unscannable(Exception):
    """Why an archive or a member cannot be looked into."""


class Exhausted(Unscannable):
    """The unpacking budget of the whole message is spent: stop everywhere."""


def sniff(data: bytes) -> str | None:
    """The archive or compression kind of ``data`` from its magic bytes, or None.  An
    archive behind other bytes counts too, as extractors open it there: a zip whose end
    record ends the data, a 7z or RAR archive anywhere (a self-extractor's stub first)."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if data[:3] == b"BZh" and data[4:10] == b"1AY&SY":      # plain text may start with "BZh"
        return "bzip2"
    if data[257:262] == b"ustar":
        return "tar"
    if is_zip_at_end(data):
        return "zip"
    for magic, kind in _MAGIC[3:]:
        if magic in data:
            return kind
    return None


def label_of(parent: str, name: str) -> str:
    return f'{parent} > "{printable(name, 120)}"'


class Unpacker:
    """Yields what the scanner must see of a blob: the blob, or the members of the archive.

    An archive read completely is represented by its members, and an attachment that is
    an archive also by itself, whole (``Item.extra``): the scanner then unpacks it as any
    other extractor would, so bytes this reader does not take for a member are still
    seen; the layers inside go to the scanner as members only.  One the standard library
    cannot read is handed over whole as well.

    ``opaque`` names kinds left whole to the scanner (clamd unpacks 7z itself); other
    recognised kinds this class cannot open are problems.  ``listers`` check an opaque
    kind before it goes: ``lister(unpacker, label, data)`` reports through
    :meth:`declared` or raises Unscannable.  Problems collect in ``problems`` and notes on
    entries in ``notes``, both as (label, reason) pairs, while the items are consumed.
    """

    def __init__(self, limits: Limits, opaque: frozenset[str] = frozenset(),
                 listers: Mapping[str, Lister] | None = None, budget: Budget | None = None) -> None:
        self.limits = limits
        self.opaque = opaque
        self.listers = dict(listers or {})
        self.budget = budget if budget is not None else Budget(10 ** 9, 1 << 62)
        self.unpacked = 0
        self.attachment_room = 0        # what the attachment being unpacked may still give
        self.problems: list[tuple[str, str]] = []
        self.notes: list[tuple[str, str]] = []

    def items(self, label: str, data: bytes, depth: int = 0) -> Iterator[Item]:
        """``data`` or, for an archive, every member inside it, depth first; nothing once
        the message's budget is spent (that is recorded once, where it happened)."""
        if self.budget.spent:
            return
        # max_ratio holds for the attachment as a whole too: a small tar of many small
        # bombs (199 bz2 members of 1 MiB in 2.5 KB) is one bomb
        self.attachment_room = max(RATIO_GRACE, len(data) * self.limits.ratio)
        try:
            yield from self._expand(label, data, depth)
        except Exhausted as reason:
            self.problems.append((label, str(reason)))

    def _expand(self, label: str, data: bytes, depth: int) -> Iterator[Item]:
        """An archive is represented by its members; anything else goes to the scanner whole."""
        kind = sniff(data)
        if kind in self.opaque and kind in self.listers:
            self._list(kind, label, data)
        if kind is None or kind in self.opaque:
            yield Item(label, data)
            return
        if kind not in _READERS:
            self.problems.append((label, f"{kind} archives cannot be unpacked here"))
            yield Item(label, data)     # the scanner may still recognise the whole
            return
        if depth >= self.limits.depth:
            self.problems.append((label, f"archives nested deeper than max_depth ({self.limits.depth})"))
            return
        problems = len(self.problems)
        try:
            for name, member in _READERS[kind](self, data):
                child = label_of(label, name)
                if self.budget.charge(objects=1):
                    raise Exhausted(self.budget.spent)
                if isinstance(member, Unscannable):
                    self.problems.append((child, str(member)))
                elif isinstance(member, Note):
                    self.notes.append((child, member.reason))
                else:
                    yield from self._expand(child, member, depth + 1)
        except Exhausted:
            raise
        except Unscannable as reason:
            self.problems.append((label, str(reason)))
        except Exception as error:  # any library failure on hostile bytes: cannot be read
            self.problems.append((label, f"corrupt {kind}: {printable(str(error), 120) or type(error).__name__}"))
            yield Item(label, data)     # the scanner may read what the standard library could not
            return
        if depth == 0 and len(self.problems) == problems:
            # read completely and clean: whole as well, for the scanner to unpack as another
            # extractor would (one already unscannable gains nothing from that, and a
            # 100,000-member zip would cost the scanner minutes)
            yield Item(label, data, extra=True)

    def _list(self, kind: str, label: str, data: bytes) -> None:
        try:
            self.listers[kind](self, label, data)
        except Unscannable as reason:
            self.problems.append((label, str(reason)))

    def declared(self, label: str, members: list[Declared], packed: int) -> bool:
        """Hold what a listing declares to the limits; False if anything is unscannable.

        The ratio is the whole archive's (solid 7z blocks have no packed size per member);
        the scanner will do the unpacking, so the declared size is charged to the budget.
        """
        limits = self.limits
        if len(members) > limits.members:
            self.problems.append((label, f"{len(members)} members, more than max_members "
                                         f"({limits.members})"))
            return False
        found = [(label_of(label, m.name), "encrypted member") for m in members if m.encrypted]
        found += [(label_of(label, m.name), f"member larger than max_member_size ({limits.member} bytes)")
                  for m in members if m.size > limits.member]
        total = sum(m.size for m in members)
        if total > max(RATIO_GRACE, packed * limits.ratio):
            found.append((label, f"compression ratio above max_ratio ({limits.ratio})"))
        if total > limits.unpacked - self.unpacked:
            found.append((label, f"more than max_unpacked ({limits.unpacked} bytes) unpacked in total"))
        else:
            self.unpacked += total
        if self.budget.charge(objects=len(members), decoded=total):
            found.append((label, self.budget.spent))
        self.problems += found
        return not found

    def bounded(self, read: Callable[[int], bytes], packed: int) -> bytes | Unscannable:
        """Read one member through ``read(n)`` no further than every limit allows, a chunk
        at a time (nothing is allocated for a limit the member never reaches)."""
        limits = self.limits
        remaining = limits.unpacked - self.unpacked
        by_ratio = max(RATIO_GRACE, packed * limits.ratio)
        limit = min(limits.member, by_ratio, remaining, self.attachment_room, self.budget.room())
        data, more = read_at_most(read, limit)
        self.unpacked += len(data) + more       # the work was done, whatever comes of it
        self.attachment_room -= len(data) + more
        if more:
            if limit == self.budget.room():
                raise Exhausted(self.budget.charge(decoded=len(data) + 1))     # one byte past it
            if limit == remaining:
                raise Exhausted(f"more than max_unpacked ({limits.unpacked} bytes) unpacked in total")
            if limit == limits.member:
                return Unscannable(f"member larger than max_member_size ({limits.member} bytes)")
            if limit != by_ratio:
                raise Exhausted(f"compression ratio of the whole above max_ratio ({limits.ratio})")
            return Unscannable(f"compression ratio above max_ratio ({limits.ratio})")
        self.budget.charge(decoded=len(data))
        return data


Members = Iterator[tuple[str, "bytes | Unscannable | Note"]]
Lister = Callable[[Unpacker, str, bytes], None]


def _zip_members(unpacker: Unpacker, data: bytes) -> Members:
    """Every member, read through the central directory once the local headers agree with
    it (see :mod:`.zips`)."""
    try:
        for archive, entry in zip_entries(data, unpacker.limits.members):
            if entry.is_dir():
                continue
            if entry.flag_bits & 0x1:
                yield entry.filename, Unscannable("encrypted member")
                continue
            with archive.open(entry) as stream:
                member = unpacker.bounded(stream.read, entry.compress_size)
            yield entry.filename, member
    except Inconsistent as reason:
        raise Unscannable(str(reason)) from None


def _tar_members(unpacker: Unpacker, data: bytes) -> Members:
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        count = 0
        while (entry := archive.next()) is not None:
            count += 1
            if count > unpacker.limits.members:
                raise Unscannable(f"more than max_members ({unpacker.limits.members}) members")
            if entry.isreg():
                yield entry.name, unpacker.bounded(archive.extractfile(entry).read, entry.size)
            elif entry.size and entry.type not in tarfile.SUPPORTED_TYPES:
                # GNU multi-volume parts and vendor types: data tarfile steps over unread
                yield entry.name, Unscannable(f"tar entry of type {printable(repr(entry.type), 20)} "
                                              f"holds {entry.size} bytes that are not read")
                continue
            note = _tar_note(entry)
            if note:
                yield entry.name, Note(note)
            archive.members.clear()     # keep memory flat over many members
        # Python stops at a damaged header where GNU tar skips ahead: nothing may hide there.
        if data[archive.offset:].strip(b"\0"):
            raise Unscannable("data after the end of the tar archive")


def _tar_note(entry) -> str | None:
    """Why a tar entry deserves a line in the log: no content of its own, or a hostile name."""
    import tarfile

    kinds = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link",
             tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "fifo"}
    notes = []
    if not (entry.isreg() or entry.isdir()):     # links, devices, fifos: no data of their own
        kind = kinds.get(entry.type, f"entry of tar type {printable(repr(entry.type), 20)}")
        target = f' to "{printable(entry.linkname, 120)}"' if entry.issym() or entry.islnk() else ""
        notes.append(f"{kind}{target}: no content, not scanned")
    if entry.name.startswith("/") or ".." in entry.name.split("/"):
        notes.append("absolute or ../ name, used as a label only")
    return "; ".join(notes) or None


def _stream_member(opener: Callable[[io.BytesIO], io.BufferedIOBase], name: str) -> Callable:
    def members(unpacker: Unpacker, data: bytes) -> Members:
        with opener(io.BytesIO(data)) as stream:
            yield name, unpacker.bounded(stream.read, len(data))
    return members


def _gzip(raw: io.BytesIO):
    import gzip
    return gzip.GzipFile(fileobj=raw)


def _bzip2(raw: io.BytesIO):
    import bz2
    return bz2.BZ2File(raw)


def _xz(raw: io.BytesIO):
    import lzma
    return lzma.LZMAFile(raw)


_READERS = {
    "zip": _zip_members,
    "tar": _tar_members,
    "gzip": _stream_member(_gzip, "(gunzipped)"),
    "bzip2": _stream_member(_bzip2, "(bunzipped)"),
    "xz": _stream_member(_xz, "(unxzed)"),
}
