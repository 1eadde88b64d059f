"""The pgp filter's direction ``neg``: decrypt what the gateway can, verify every signature.

PGP/MIME parts are replaced by the entity they carry, inline ``BEGIN PGP MESSAGE``
blocks by their text, armored and binary (``.pgp``/``.gpg``) attachments by their file.
Signatures are checked on the raw bytes they cover, before anything changes, and recorded in
``X-ispMailGate-PGP-Signature`` header fields; the gateway's own result fields are
removed from incoming mail first, so a sender cannot forge them.  What cannot be
decrypted follows ``on_undecryptable``; nothing is ever dropped.
"""

from __future__ import annotations

import re
from typing import Protocol

from ..base import Context, marked_direction
from ..mime import Message, ParseError, Part, decode_text, python_codec, without_surrogates
from .gpg import Keyring, NoSecretKey, Signature, TooLarge, Undecryptable
from .parts import (MARKER, MESSAGE_ARMOR, RESULT, SIGNATURE, SIGNED_ARMOR, Malformed,
                       encrypted_payload, has_armor, is_binary_pgp_file, is_pgp_encrypted, is_pgp_signed,
                       may_render_as_markup, merge_decrypted, native, signed_content)
from ..secure_mime import follow_undecryptable

MAX_LAYERS = 4          # encrypted inside signed inside encrypted ... deeper is left as it is
MAX_GPG_CALLS = 32      # decryptions and verifications per message: each one runs gpg
_CHARSET = re.compile(r"^Charset:[ \t]*([\w.:-]+)", re.M | re.I)
_ARMOR_SUFFIX = re.compile(r"\.(asc|pgp|gpg)$", re.I)


class Options(Protocol):
    """What this direction reads of its pgp step (the step itself: a Pgp, which imports
    this module, so this module does not import it back)."""
    direction: str
    max_size: int
    on_undecryptable: str


class Incoming:
    """One message through the decrypting direction."""

    def __init__(self, pgp: Options, ctx: Context, keyring: Keyring) -> None:
        self.pgp, self.ctx, self.keyring = pgp, ctx, keyring
        self.signatures: list[tuple[str, Signature]] = []     # (scope, signature)
        self.decrypted: list[str] = []                        # scopes
        self.failures: list[str] = []
        self.foreign_only = True        # every failure so far was "no secret key here"
        self.gpg_calls = 0
        self.markup: int | None = None  # parts a reader may render as markup, counted once per tree
        self.output = 0                 # bytes decrypted into the message so far

    def run(self, message: Message) -> None:
        self.message = message
        marked = marked_direction(message, MARKER, "auto") == "neg"     # a gateway encrypted it
        self._scan(message.root, None, 0)
        if (self.pgp.direction == "auto" and not marked and self.failures and self.foreign_only
                and not self.decrypted):
            # Encrypted to somebody else's key and not by a peer gateway: outgoing mail
            # that is encrypted already, which pos leaves alone too.
            self.ctx.log.info("encrypted to keys this gateway does not hold: passed as it is")
            return
        self._record(message)

    # -- walking the tree ----------------------------------------------------------------

    def _scan(self, part: Part, parent: Part | None, depth: int) -> None:
        if depth > MAX_LAYERS:
            self._fail(Undecryptable(f"more than {MAX_LAYERS} layers of encryption and signing"))
        elif is_pgp_encrypted(part):
            self._decrypt_mime(part, parent, depth)
        elif part.is_leaf:
            if has_armor(part):
                self._inline(part, parent)
            elif is_binary_pgp_file(part):
                self._binary_file(part, parent)
        elif not part.is_message:           # a forwarded message is a document: left alone
            if is_pgp_signed(part):
                self._verify_mime(part, parent)
            for child in list(part.children):
                self._scan(child, part, depth)

    def _decrypt_mime(self, part: Part, parent: Part | None, depth: int) -> None:
        eol = self.message.eol
        try:
            self._not_beside_html(part, parent)
            plain, found = self._decrypt(encrypted_payload(part))
            inner = self.message.parse_inner(native(plain, eol), part.depth + 1)   # within its limits
        except Malformed as error:
            return self._fail(Undecryptable(f"malformed PGP/MIME: {error}"))
        except ParseError as error:
            return self._fail(Undecryptable(f"the decrypted entity cannot be parsed: {error}"))
        except Undecryptable as error:
            return self._fail(error)
        scope = _scope(parent)
        self._found(scope, found)
        if parent is None:
            self.message.root = inner = merge_decrypted(part.headers, inner, eol)
        else:
            parent.replace(part, inner)
        self._scan(inner, parent, depth + 1)

    def _verify_mime(self, part: Part, parent: Part | None) -> None:
        try:
            data, signature = signed_content(part)
        except Malformed as error:
            self.signatures.append((_scope(parent), Signature("error", note=str(error))))
            return
        self._verify(_scope(parent), data, signature)

    def _inline(self, part: Part, parent: Part | None) -> None:
        data = part.decoded()
        for block in SIGNED_ARMOR.finditer(data):
            self._verify("inline", native(block.group(0), b"\n"), None)
        if b"-----BEGIN PGP MESSAGE-----" not in data:
            return
        try:
            self._not_beside_html(part, parent)
        except Undecryptable as error:
            return self._fail(error)
        whole = data.strip()
        if (part.filename or not part.content_type.startswith("text/")) and \
                MESSAGE_ARMOR.fullmatch(whole.decode("ascii", "replace")):
            self._inline_file(part, whole)
        elif part.content_type == "text/plain":
            self._inline_text(part)

    def _binary_file(self, part: Part, parent: Part | None) -> None:
        try:
            self._not_beside_html(part, parent)
        except Undecryptable as error:
            return self._fail(error)
        self._inline_file(part, part.decoded())

    def _inline_text(self, part: Part) -> None:
        text, pieces, last = part.text(), [], 0
        for block in MESSAGE_ARMOR.finditer(text):
            armor = block.group(0)
            try:
                plain, found = self._decrypt(armor.encode("ascii", "replace"))
            except Undecryptable as error:
                self._fail(error)
                continue
            self._found("inline", found)
            pieces += [text[last:block.start()], _as_text(plain, armor, part.charset)]
            last = block.end()
        if pieces:
            part.set_text("".join(pieces) + text[last:])

    def _inline_file(self, part: Part, armor: bytes) -> None:
        try:
            plain, found = self._decrypt(armor)
        except Undecryptable as error:
            return self._fail(error)
        self._found("inline", found)
        import mimetypes

        name = _ARMOR_SUFFIX.sub("", part.filename or "decrypted")
        part.headers.set("Content-Type", mimetypes.guess_type(name)[0] or "application/octet-stream")
        part.set_param("name", name)
        if "Content-Disposition" in part.headers:
            part.set_param("filename", name, "Content-Disposition")
        part.set_decoded(plain, "base64")

    def _not_beside_html(self, part: Part, parent: Part | None) -> None:
        """Plaintext never joins markup the sender wrapped around it (EFAIL direct exfiltration):
        HTML, XHTML, SVG and whatever else a reader may render as markup."""
        if parent is None:
            return
        if self.markup is None:         # counted again only after a decryption changed the tree
            self.markup = sum(1 for leaf in self.message.leaves() if may_render_as_markup(leaf))
        inside = sum(1 for leaf in part.leaves() if may_render_as_markup(leaf))
        if self.markup > inside:        # one outside this part: linear, not parts times leaves
            raise Undecryptable("an encrypted part beside a part a reader may render as markup "
                                "(HTML, XHTML, SVG ...) is not decrypted (EFAIL)")

    # -- gpg, within a budget ----------------------------------------------------------------

    def _decrypt(self, armor: bytes) -> tuple[bytes, list[Signature]]:
        """One block decrypted within max_size, the message's budget (max_decoded) and
        max_message_size for all this step puts into the message: compressed plaintext
        cannot make a small message large."""
        self._spend()
        budget = self.ctx.budget
        limit, why = budget.allowance(self.output, (self.pgp.max_size, f"max_size ({self.pgp.max_size} bytes)"))
        if limit <= 0:
            raise Undecryptable(f"not decrypted: {why}")
        try:
            plain, found = self.keyring.decrypt(armor, limit)
        except TooLarge:
            budget.charge(decoded=limit)        # gpg did that much work before it stopped
            raise Undecryptable(f"decrypted data larger than {limit} bytes: {why}") from None
        budget.charge(decoded=len(plain))
        self.output += len(plain)
        return plain, found

    def _verify(self, scope: str, data: bytes, signature: bytes | None) -> None:
        try:
            self._spend()
        except Undecryptable as error:
            self.signatures.append((scope, Signature("error", note=f"not checked: {error}")))
            return
        found = self.keyring.verify(data, signature, str(self.ctx.workdir()))
        self.signatures += [(scope, sig) for sig in found]

    def _spend(self) -> None:
        self.gpg_calls += 1
        if self.gpg_calls > MAX_GPG_CALLS:
            raise Undecryptable(f"more than {MAX_GPG_CALLS} encrypted or signed parts")

    # -- outcome --------------------------------------------------------------------------

    def _found(self, scope: str, signatures: list[Signature]) -> None:
        self.markup = None              # the plaintext took the encrypted part's place
        self.decrypted.append(scope)
        self.signatures += [(scope, sig) for sig in signatures]

    def _fail(self, error: Undecryptable) -> None:
        self.failures.append(str(error))
        self.foreign_only = self.foreign_only and isinstance(error, NoSecretKey)

    def _record(self, message: Message) -> None:
        """The result header fields, after removing any the message brought along."""
        headers = message.headers
        for name in (RESULT, SIGNATURE):
            if name in headers:
                self.ctx.log.warning("removed %s header fields the message brought along", name)
                headers.remove(name)
        if self.failures:
            follow_undecryptable(self.pgp.on_undecryptable, "; ".join(dict.fromkeys(self.failures)),
                                 message, self.ctx, RESULT)
        if self.decrypted:
            headers.remove(MARKER)
            headers.add(MARKER, "neg")
            headers.add(RESULT, "decrypted; scope=" + ",".join(dict.fromkeys(self.decrypted)))
        for scope, signature in reversed(self.signatures):
            headers.add(SIGNATURE, f"{signature.describe()}; scope={scope}")
        self.ctx.log.info("decrypted %d, %d signature(s): %s", len(self.decrypted), len(self.signatures),
                          ", ".join(sig.describe() for _, sig in self.signatures) or "-")


def _scope(parent: Part | None) -> str:
    return "message" if parent is None else "part"


def _as_text(plain: bytes, armor: str, charset: str | None) -> str:
    """Decrypted inline text: in the armor's Charset, else UTF-8, else the part's charset."""
    declared = _CHARSET.search(armor.split("\n\n", 1)[0])
    plain = plain.replace(b"\r\n", b"\n")
    if not plain.endswith(b"\n") and armor.endswith("\n"):
        plain += b"\n"             # what follows the block stays on a line of its own
    for codec in ([python_codec(declared.group(1))] if declared else []) + ["utf-8"]:
        try:
            return without_surrogates(plain.decode(codec))     # UTF-7 decodes to lone ones
        except UnicodeError:
            continue
    return decode_text(plain, charset)
