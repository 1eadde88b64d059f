"""packer: compresses the parts of a message ("pos") and restores them ("neg").

As the original's Packer, for two gateways that agree: one packs, the other unpacks,
and ``direction = "auto"`` decides from the message's own marker header
``X-ispMailGate-Packer`` (unmarked mail is packed, mail marked "pos" is unpacked, and so
is mail naming the original's packer in ``X-IspMailGate-Packer-Type``).

neg reads both forms a part can be packed in: this program's (below) and the original's
(``original.py``), which pos writes with ``format = "original"`` for a peer still running
the Perl gateway.  A part neg takes for packed but cannot restore is never delivered
under its old label: on_unpack_error decides, and "keep" labels it as packed data.

pos (this program's form, the default) packs leaf parts one by one: the decoded body is
compressed and sent as base64 under a new ``Content-Type`` (``application/gzip`` ...) with
a file name ending in the codec's suffix, so a reader without the gateway can still open it.  The header fields
it replaces (Content-Type, Content-Transfer-Encoding, Content-Disposition, and
MIME-Version of a message's top part) are recorded byte for byte in
``X-ispMailGate-Packed-Fields`` (base64), a readable summary in ``X-ispMailGate-Packed``.
neg puts those fields back where they stood, decompresses with a cap on the output,
and re-encodes the body in its original Content-Transfer-Encoding.

Left alone by pos: multipart containers (their leaves are packed), everything inside
multipart/signed, multipart/encrypted or S/MIME, parts already packed, parts in
``skip_types`` (already compressed formats), parts with an unknown transfer encoding
or duplicate Content-* fields, and parts that would not shrink by ``min_saving``.
An embedded message (message/rfc822) is descended into like a multipart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..base import (Context, Filter, FilterError, OptionError, Reject, TempFail, argv, choice, count,
                   marked_direction, option, parse_size, seconds)
from ..mime import Headers, Message, ParseError, Part, encode_body, format_param, printable
from . import original
from .original import PACKER_TYPE, PENCODING
from .packing import BUILTIN_CODECS, TooLarge, UnpackError, compress, decompress, incompressible
from .form import (MARKER, PACKED, PACKED_FIELDS, PROTECTED, REPLACED, Found, label,
                   leaves_outside_protected, packed_form, packed_parts, recorded_fields,
                   refuse_delimiters, restored_body, without_last_eol)

_ENCODINGS = frozenset({"", "7bit", "8bit", "binary", "base64", "quoted-printable"})
RATIO_GRACE = 1 << 20      # small parts may compress far better than max_ratio (zeros, logs)
_IDENTITY = frozenset({"", "7bit", "8bit", "binary"})
_CODEC_NAME = re.compile(r"[a-z0-9][a-z0-9.+-]*\Z")
_MEDIA_RANGE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/(\*|[a-z0-9][a-z0-9!#$&^_.+-]*)\Z")
_PACKED_TYPES = frozenset({"application/octet-stream", "application/x-gzip",
                           *(media_type for _, media_type in BUILTIN_CODECS.values())})


COMPRESSED_TYPES = (
    "application/gzip", "application/x-gzip", "application/zip", "application/x-zip-compressed",
    "application/x-bzip2", "application/x-xz", "application/zstd", "application/x-7z-compressed",
    "application/vnd.rar", "application/x-rar-compressed", "image/jpeg", "image/png", "image/gif",
    "image/webp", "audio/*", "video/*",
)


def _media_ranges(value) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of media types like \"image/jpeg\" or \"video/*\"")
    ranges = tuple(v.strip().lower() for v in value)
    bad = [v for v in ranges if not _MEDIA_RANGE.match(v)]
    if bad:
        raise ValueError(f"not a media type or type/*: {', '.join(map(repr, bad))}")
    return ranges


@dataclass(frozen=True)
class Packer(Filter):
    """Compresses each leaf part (pos) or restores packed parts (neg)."""

    name = "packer"
    description = "compress message parts (pos) or restore them (neg)"
    lazy_modules = ("base64", "binascii", "bz2", "gzip", "lzma", "shutil", "subprocess", "threading",
                    "zlib", "ispmailgate_filters.bounded", "ispmailgate_filters.processes")
    unparsed_mail = "process"       # pos packs nothing of it; neg: see _unparsed

    direction: str = option("auto", "pos: pack; neg: unpack; auto: unpack mail whose X-ispMailGate-Packer "
                                    "header says pos or that names the original's packer, pack all other mail",
                            convert=choice("pos", "neg", "auto"))
    codec: str = option("gzip", "gzip | bzip2 | xz (built in), or a name of your own for "
                                "command_pos/command_neg; recorded in each packed part")
    format: str = option("ispmailgate", "how pos writes packed parts: ispmailgate (labelled application/gzip, "
                                        "file name .gz) or original (as Mail::IspMailGate did, for a Perl "
                                        "peer); neg reads both", convert=choice("ispmailgate", "original"))
    level: int = option(6, "compression level of the built-in codecs, 1 (fast) to 9 (small; xz at 7 to 9 "
                           "needs 200 to 700 MB of memory)")
    command_pos: tuple = option((), "compress command as an argv list (no shell): body on stdin, "
                                    "packed data on stdout, exit 0", convert=argv)
    command_neg: tuple = option((), "decompress command as an argv list (no shell): packed data on "
                                    "stdin, body on stdout, exit 0", convert=argv)
    command_timeout: float = option(60.0, "seconds a command may run for one part", convert=seconds())
    min_saving: int = option(10, "pack a part only if that makes it at least this many percent "
                                 "smaller on the wire (0: pack every eligible part; format original: "
                                 "the whole message)")
    skip_types: tuple = option(COMPRESSED_TYPES, "media types (type/subtype or type/*) pos leaves "
                                                 "alone, e.g. formats that are compressed already",
                               convert=_media_ranges)
    max_unpacked: int = option(100 * 1024 ** 2, "most bytes neg may unpack for one message, all parts "
                                                "together (e.g. \"100M\"; never more than max_message_size "
                                                "nor what max_decoded has left); past it: on_unpack_error",
                               convert=parse_size)
    max_ratio: int = option(1000, "unpacked/packed size above which neg does not unpack a part (over "
                                  "1M unpacked); past it: on_unpack_error", convert=count(1, 1_000_000))
    on_unpack_error: str = option("error", "for a packed part past max_unpacked, damaged, or in a codec "
                                           "or form this filter cannot undo: error (a filter error, see "
                                           "on_filter_error), keep (deliver it packed, labelled as packed "
                                           "data, log it), reject (5.6.0)",
                                  convert=choice("error", "keep", "reject"))

    def __post_init__(self) -> None:
        if not _CODEC_NAME.match(self.codec):
            raise OptionError("codec", f"expected a codec name like gzip (lower case), got {self.codec!r}")
        if self.codec not in BUILTIN_CODECS:
            for key, wanted in (("command_pos", ("pos", "auto")), ("command_neg", ("neg", "auto"))):
                if self.direction in wanted and not getattr(self, key):
                    raise OptionError(key, f"codec {self.codec!r} is not built in (gzip, bzip2, xz): "
                                           f"give {key} as an argv list")
        if not 1 <= self.level <= 9:
            raise OptionError("level", f"expected 1 to 9, got {self.level}")
        if not 0 <= self.min_saving <= 99:
            raise OptionError("min_saving", f"expected a percentage from 0 to 99, got {self.min_saving}")
        if self.command_timeout <= 0:
            raise OptionError("command_timeout", "expected a positive number of seconds")

    def breaks_dkim(self) -> bool:
        return True         # packing and unpacking both rewrite the body

    def trusted_files(self) -> dict[str, str]:
        return {f"{key}[0]": command[0] for key, command in (("command_pos", self.command_pos),
                                                            ("command_neg", self.command_neg)) if command}

    def problems(self) -> list[str]:
        import shutil

        return [f"{key}: {command[0]} not found or not executable"
                for key, command in (("command_pos", self.command_pos), ("command_neg", self.command_neg))
                if command and shutil.which(command[0]) is None]

    def process(self, message: Message, ctx: Context) -> None:
        direction = marked_direction(message, MARKER, self.direction)
        if self.direction == "auto" and message.header_value(PACKER_TYPE) is not None:
            direction = "neg"       # the original named its packer before it marked the message
        if direction == "neg":
            self.unpack(message, ctx)
        elif message.unparsed is not None:      # packing is an optimisation: it goes as it is
            ctx.log.info("%s: the message cannot be parsed: nothing packed", self.title)
            _mark(message.headers)
        elif self.format == "original":
            self.pack_original(message, ctx)
        else:
            self.pack(message, ctx)

    # -- pos ---------------------------------------------------------------------------

    def pack(self, message: Message, ctx: Context) -> None:
        before = after = count = 0
        for part, top in leaves_outside_protected(message.root):
            if not self._packable(part):
                continue
            size = len(part.body)
            if self._pack_part(part, top, ctx):
                before, after, count = before + size, after + len(part.body), count + 1
        # Marked even when nothing shrank: the peer's "auto" must unpack, not pack again.
        _mark(message.headers)
        ctx.log.info("%s: packed %d part(s) with %s: %d -> %d bytes", self.title, count, self.codec,
                     before, after)

    def _packable(self, part: Part) -> bool:
        content_type = part.content_type
        return (bool(part.body) and part.separator != b"" and packed_form(part.headers) is None
                and not content_type.startswith(("multipart/", "message/"))
                and part.transfer_encoding in _ENCODINGS
                and not any(_matches(content_type, media) for media in self.skip_types)
                and all(len(part.headers.get_all(name)) <= 1 for name in (*REPLACED, "MIME-Version")))

    def _pack_part(self, part: Part, top: bool, ctx: Context) -> bool:
        data = part.decoded()
        if self.min_saving and incompressible(data):
            return False
        try:
            packed = compress(self.codec, data, self.level, self.command_pos, self._run_options(ctx))
        except UnpackError as error:        # packing is an optimisation: the part goes as it is
            ctx.log.warning("%s: %s part not packed: %s", self.title, part.content_type, error)
            return False
        encoded = _ending_like(encode_body(packed, "base64", part.headers.eol), part.body)
        if self.min_saving and len(encoded) * 100 > len(part.body) * (100 - self.min_saving):
            return False
        replaced = (*REPLACED, "MIME-Version") if top else REPLACED
        recorded = b"".join(part.headers.raw(name) or b"" for name in replaced)
        summary = (f'{self.codec}; type="{part.content_type}"; encoding="{part.transfer_encoding or "7bit"}"; '
                   f"size={len(data)}")
        label(part, top, self.codec, summary, recorded)
        part.body = encoded
        return True

    def pack_original(self, message: Message, ctx: Context) -> None:
        """Every leaf packed the original's way, or none (its neg unpacks every leaf of a
        message that names its packer, and fails on one that is not packed)."""
        root = message.root
        why = original.cannot_pack(root, encodings=_ENCODINGS | original.UUENCODE, protected=PROTECTED,
                                   packed=lambda part: packed_form(part.headers) is not None)
        leaves = [] if why else list(root.leaves())
        try:
            bodies = [self._packed_body(part, ctx) for part in leaves]
        except UnpackError as error:
            why, bodies = f"packing failed: {error}", []
        before, after = sum(len(part.body) for part in leaves), sum(map(len, bodies))
        if not why and self.min_saving and after * 100 > before * (100 - self.min_saving):
            why = f"it would not shrink by {self.min_saving} % ({before} -> {after} bytes)"
        if why:     # marked without naming a packer: the original's neg leaves it alone
            ctx.log.info("%s: not packed in the original's form: %s", self.title, why)
            _mark(message.headers)
            return
        message.headers.add(PACKER_TYPE, self.codec, top=False)
        for part, body in zip(leaves, bodies):
            original.mark_part(part)
            part.body = body
        _mark(message.headers, top=False)
        ctx.log.info("%s: packed %d part(s) in the original's form with %s: %d -> %d bytes", self.title,
                     len(leaves), self.codec, before, after)

    def _packed_body(self, part: Part, ctx: Context) -> bytes:
        packed = compress(self.codec, part.decoded(), self.level, self.command_pos, self._run_options(ctx))
        return _ending_like(encode_body(packed, "base64", part.headers.eol), part.body)

    # -- neg ---------------------------------------------------------------------------

    def unpack(self, message: Message, ctx: Context) -> None:
        if message.unparsed is not None:
            return self._unparsed(message, ctx)
        produced, count, kept = 0, 0, 0
        for found in packed_parts(message.root):
            try:
                restored, size = self._restore(found, produced, ctx)
            except UnpackError as error:
                self._failed(found, error, ctx)
                kept += 1
                continue
            produced += size
            count += 1
            if found.parent is None:
                message.root = restored
            else:
                found.parent.children[found.index] = restored
        # every part in the original's form is restored or relabelled by now
        message.headers.remove(PACKER_TYPE)
        if not kept:
            message.headers.remove(MARKER)
        if count:
            ctx.log.info("%s: unpacked %d part(s), %d bytes", self.title, count, produced)

    def _unparsed(self, message: Message, ctx: Context) -> None:
        """Packed parts inside a message the parser gave up on cannot be found, so none is
        restored; packed data must not reach a reader under its old label (the original's
        form keeps it): on_unpack_error decides, and "keep" delivers only this program's
        form, whose parts say they are packed."""
        why = f"the message cannot be parsed ({message.unparsed}): its packed parts cannot be restored"
        if self.on_unpack_error == "reject":
            raise Reject(why, "5.6.0")
        if self.on_unpack_error != "keep" or message.header_value(PACKER_TYPE) is not None:
            raise FilterError(why)
        ctx.log.warning("%s: %s; delivered packed (on_unpack_error = keep)", self.title, why)

    def _restore(self, found: Found, produced: int, ctx: Context) -> tuple[Part, int]:
        """The part restored, and the bytes unpacked for it: within max_unpacked for the
        message, the message's budget (max_decoded), max_message_size, and max_ratio."""
        part = found.part
        limit = ctx.budget.allowance(produced, (self.max_unpacked - produced,
                                                f"more than max_unpacked ({self.max_unpacked} bytes) "
                                                "for one message"))
        codec, size, header = self._record(found, limit)
        try:
            restored = Part.from_bytes(header + (part.separator or part.headers.eol))
        except ParseError as error:
            raise UnpackError(f"the restored header does not parse: {error}") from None
        restored.default_type = part.default_type
        encoding = restored.transfer_encoding
        if encoding not in _IDENTITY and encoding not in original.RESTORABLE:
            raise UnpackError(f"recorded Content-Transfer-Encoding {printable(encoding, 40)!r} "
                              "cannot be restored")
        data = self._decompress(codec, part, limit, size, ctx)
        if size is not None and len(data) != size:
            raise UnpackError(f"unpacked {len(data)} bytes where {size} were recorded")
        restored.body = restored_body(data, encoding, part.headers.eol, filename=restored.filename,
                                      final_eol=part.body.endswith(b"\n"), lf_text=found.form == "original")
        refuse_delimiters(restored.body, found.delimiters)
        return restored, len(data)

    def _record(self, found: Found, limit: tuple[int, str]) -> tuple[str, int | None, bytes]:
        """(codec, unpacked size if recorded, restored header) from what the packed part says;
        a recorded size past ``limit`` ((bytes, why)) is refused before anything is unpacked."""
        part = found.part
        if found.form == "original":
            return original.packer_name(found.packer), None, original.restored_header(part)
        if found.form != "ispmailgate":
            names = sorted(n for n in part.headers.names() if n.lower().startswith("x-ispmailgate-pack"))
            raise UnpackError(f"packed in a form this filter does not know ({', '.join(names)})")
        codec, size = _summary(part.headers.get(PACKED) or "")
        if size is not None and size > limit[0]:
            raise UnpackError(f"it would unpack to {size} bytes: {limit[1]}")
        return codec, size, _restored_header(part, recorded_fields(part, found.top), found.top)

    def _decompress(self, codec: str, part: Part, limit: tuple[int, str], size: int | None,
                    ctx: Context) -> bytes:
        """The part's data unpacked within ``limit`` and max_ratio; the work is charged to the
        message's budget whatever comes of it."""
        command = self.command_neg if codec == self.codec else ()
        if codec not in BUILTIN_CODECS and not command:
            raise UnpackError(f"codec {printable(codec, 40)!r} is not built in and not this filter's "
                              "command codec")
        packed = part.decoded()
        ratio = (max(RATIO_GRACE, len(packed) * self.max_ratio),
                 f"compression ratio above max_ratio ({self.max_ratio})")
        most, why = min(limit, ratio, key=lambda cap: cap[0])
        if size is not None and size > most:
            raise UnpackError(f"it would unpack to {size} bytes: {why}")
        try:
            data = decompress(codec, packed, most, command, self._run_options(ctx), why)
        except TooLarge:
            ctx.budget.charge(decoded=most)
            raise
        ctx.budget.charge(decoded=len(data))
        return data

    def _failed(self, found: Found, error: UnpackError, ctx: Context) -> None:
        part = found.part
        name = printable(part.filename or part.content_type)
        if error.environment:           # this machine's fault, not the message's: retry later
            raise TempFail(f"cannot unpack {name}: {error}")
        if self.on_unpack_error == "reject":
            raise Reject(f"packed part {name}: {error}", "5.6.0")
        if self.on_unpack_error != "keep":
            raise FilterError(f"cannot unpack {name}: {error}")
        if found.form == "original":    # packed data under the part's old label: label it as packed
            self._relabel(found)
        elif part.content_type not in _PACKED_TYPES:
            _label_opaque(part)
        ctx.log.warning("%s: %s left packed (as %s): %s", self.title, name, part.content_type, error)

    def _relabel(self, found: Found) -> None:
        """A part left packed the original's way, put in this program's labelled form (as
        application/gzip ... with its old fields recorded), so a reader sees packed data and
        a later neg that can unpack it restores it."""
        part = found.part
        try:
            codec = original.packer_name(found.packer)
        except UnpackError:
            codec = "unknown"
        try:
            encoding = original.recorded_encoding(part.headers).lower()
        except UnpackError:
            encoding = "x-unknown"
        summary = f'{codec}; type="{part.content_type}"; encoding="{encoding}"'
        recorded = original.recorded_fields(part, found.top)
        label(part, found.top, codec, summary, recorded, transfer_encoding=None)     # the body stays
        part.headers.remove(PENCODING)

    def _run_options(self, ctx: Context) -> dict:
        return {"timeout": self.command_timeout, "cwd": ctx.workdir}


def _mark(headers: Headers, *, top: bool = True) -> None:
    """``X-ispMailGate-Packer: pos``, once: at the top of the header, or at its end (where
    the original put it)."""
    if headers.get(MARKER) != "pos" or len(headers.get_all(MARKER)) > 1:
        headers.remove(MARKER)
        headers.add(MARKER, "pos", top=top)


def _label_opaque(part: Part) -> None:
    """A part in a packed form nobody here knows, under a label that is not a packed
    type: delivered as an opaque file rather than as what it was before packing."""
    filename = printable(part.filename or "part") + ".bin"
    part.headers.set("Content-Type", f"application/octet-stream; {format_param('name', filename)}")
    part.headers.set("Content-Disposition", f"attachment; {format_param('filename', filename)}")


def _ending_like(encoded: bytes, body: bytes) -> bytes:
    """``encoded`` without its last line end when ``body`` had none (the boundary line has it)."""
    return encoded if body.endswith(b"\n") else without_last_eol(encoded)


def _matches(content_type: str, media: str) -> bool:
    return content_type == media or (media.endswith("/*") and content_type.startswith(media[:-1]))


def _restored_header(part: Part, original: list[tuple[str, bytes]], top: bool) -> bytes:
    """The packed part's header with the recorded fields back where they stood."""
    replaced = {name.lower() for name in ((*REPLACED, "MIME-Version") if top else REPLACED)}
    dropped = {PACKED.lower(), PACKED_FIELDS.lower()}
    waiting = {name.lower(): raw for name, raw in original}
    pieces = []
    for name, raw in part.headers.fields():
        key = name.lower()
        if key in replaced:
            if key in waiting:
                pieces.append(waiting.pop(key))
        elif key not in dropped:
            pieces.append(raw)
    return b"".join(pieces) + b"".join(waiting.values())


def _summary(value: str) -> tuple[str, int | None]:
    """The codec and recorded size from an X-ispMailGate-Packed value."""
    codec = value.split(";", 1)[0].strip().lower()
    size = re.search(r";\s*size\s*=\s*\"?(\d{1,15})\b", value)
    return codec, int(size.group(1)) if size else None
