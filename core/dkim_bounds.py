"""What checking DKIM signatures and ARC chains may cost: bounded before dkimpy does any work.

dkimpy checks whatever a message brings, and every part of that is the sender's choice: its
header parser is quadratic in a field's folded lines; its RSA is pure Python, so a key with
an 8192-bit public exponent costs seconds in one ``pow()`` the time limit cannot interrupt,
and a long ``b=`` is turned into a number by a quadratic loop; it validates every ARC
instance, each over the whole message.  So the gateway hands dkimpy a message parsed here in
linear time, refuses keys and signatures no legitimate signer uses before any arithmetic,
and gives each message a work budget: a fixed amount, and at least a few passes over a
message of any size.

What is refused stays honest: a key or signature beyond the limits makes that signature a
``permerror`` (an ARC chain carrying one fails, as RFC 8617 says of an invalid seal or of
more than 50 sets); a spent budget is ``temperror``, and an ARC chain it cannot pay for gets
no new set, as one DNS could not decide.  Never a pass or fail the signature did not earn.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

MAX_KEY_BITS = 8192         # RFC 8301 3.2: verifiers must handle 1024 to 4096; nobody signs above 8192
MAX_EXPONENT_BITS = 64      # 65537 in practice; OpenSSL refuses exponents above 64 bits for large keys
MAX_KEY_RECORD = MAX_KEY_BITS // 8 + 128        # bytes of DER: the modulus, the exponent, the wrapping
MAX_SIGNATURE_CHARS = (MAX_KEY_BITS // 8 + 2) // 3 * 4      # base64 of a signature as long as the modulus
MAX_ARC_INSTANCES = 50      # RFC 8617 4.2.1: i= is 1 to 50

WORK_UNITS = 64 << 20       # every message may cost this much (a unit: about one byte canonicalised)
MIN_PASSES = 4              # and at least this many passes over itself, however large it is
FIELD_WEIGHT = 100          # a header field costs dkimpy about what 100 bytes cost (a Python loop each)

_LINE_END = re.compile(rb"\r?\n")
_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")
_SPACE = re.compile(rb"\s+")


def parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's ``rfc822_parse`` in linear time: its header fields as ``[name, value]`` with the
    value's lines ending in CRLF, and its body with CRLF line ends.  dkimpy appends each folded
    line to the value it has so far (a copy per line: quadratic); here a field's lines are
    joined once.  A line that is neither a field nor folded is dkimpy's MessageFormatError."""
    import dkim

    headers: list[list[Any]] = []
    start = 0
    while True:
        match = _LINE_END.search(message, start)
        line = message[start:match.start() if match else len(message)]
        if not line:
            body = _LINE_END.sub(b"\r\n", message[match.end():]) if match else b""
            break
        if line[0] in (0x09, 0x20):
            if not headers:
                raise dkim.MessageFormatError("a folded line before the first header field")
            headers[-1][1].append(line + b"\r\n")
        elif (name := _FIELD_NAME.match(line)) is not None:
            headers.append([name.group(1), [line[name.end():] + b"\r\n"]])
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError(f"unexpected characters in a header line: {line[:60]!r}")
        if match is None:
            body = b""
            break
        start = match.end()
    return [[name, b"".join(lines)] for name, lines in headers], body


def prepared(kind: type, parsed: tuple[list[list[bytes]], bytes], **options: Any) -> Any:
    """A dkimpy DKIM or ARC object for a message :func:`parse` parsed (never its own parse)."""
    signer = kind(None, **options)
    signer.headers, signer.body = list(parsed[0]), parsed[1]
    return signer


def refused_key(record: bytes) -> str | None:
    """Why dkimpy must not compute with this DKIM key record; None if it may.

    Only RSA keys are judged (ed25519 keys have one size); a record dkimpy cannot read is
    left to dkimpy, which calls it what it is."""
    from dkim.crypto import UnparsableKeyError, parse_public_key

    found = tags(record)
    if found.get(b"k", b"rsa") != b"rsa" or b"p" not in found:
        return None
    try:
        der = base64.b64decode(_SPACE.sub(b"", found[b"p"]))
    except (binascii.Error, ValueError):
        return None
    if len(der) > MAX_KEY_RECORD:       # before dkimpy's parser, whose loop is quadratic in it
        return f"a public key of {len(der)} bytes (at most {MAX_KEY_BITS}-bit keys are checked)"
    try:
        key = parse_public_key(der)
    except (UnparsableKeyError, IndexError, ValueError):
        return None
    if key["modulus"].bit_length() > MAX_KEY_BITS:
        return f"a {key['modulus'].bit_length()}-bit key (at most {MAX_KEY_BITS} bits are checked)"
    if key["publicExponent"].bit_length() > MAX_EXPONENT_BITS:
        return (f"a {key['publicExponent'].bit_length()}-bit public exponent "
                f"(no signer uses more than {MAX_EXPONENT_BITS} bits)")
    return None


def overlong_signature(field_value: bytes) -> bool:
    """Does this DKIM-Signature, ARC-Message-Signature or ARC-Seal carry a ``b=`` longer than
    any key dkimpy may use?  Such a signature cannot be valid (RFC 8017 8.2.2: it is as long as
    the modulus); dkimpy's conversion of it to a number is quadratic in its length, and its
    base64 check backtracks quadratically over a long run of white space in it."""
    signature = tags(field_value).get(b"b", b"")
    return len(signature) > 2 * MAX_SIGNATURE_CHARS or len(_SPACE.sub(b"", signature)) > MAX_SIGNATURE_CHARS


def passes(field_value: bytes) -> int:
    """What checking this signature costs, in passes over the message: one, and one more for
    each 32 distinct field names its ``h=`` lists (dkimpy looks for each one from the last
    header field up, a loop over the fields a name at a time)."""
    names = {name.strip().lower() for name in tags(field_value).get(b"h", b"").split(b":")}
    return 1 + len(names) // 32


def tags(field_value: bytes) -> dict[bytes, bytes]:
    """A signature's (or key record's) tags as dkimpy reads them; none if dkimpy cannot (it then refuses it)."""
    from dkim.util import InvalidTagValueList, parse_tag_value

    try:
        return parse_tag_value(field_value)
    except (InvalidTagValueList, ValueError):
        return {}


class Work:
    """The verification budget of one message, in passes over it.

    A pass costs what dkimpy spends to check one signature over this message: canonicalising
    its header fields and body and hashing them.  A message may have ``WORK_UNITS`` of it, and
    at least ``MIN_PASSES`` passes whatever its size, so the work stays linear in the message.
    """

    def __init__(self, parsed: tuple[list[list[bytes]], bytes]) -> None:
        headers, body = parsed
        self.pass_cost = max(1, len(body) + sum(len(name) + len(value) + FIELD_WEIGHT for name, value in headers))
        self.left = max(WORK_UNITS, MIN_PASSES * self.pass_cost)

    def take(self, passes: int) -> bool:
        """Pay for ``passes`` passes; False (and nothing paid) if the budget cannot."""
        cost = passes * self.pass_cost
        if cost > self.left:
            return False
        self.left -= cost
        return True
