"""The smime filter's direction ``neg``: decrypt what the gateway can, verify every signature.

Enveloped data (the whole message, or a part such as one beside a mailing list footer)
is replaced by the entity it carries; opaque signed data is verified and, with
``unwrap_opaque``, replaced by its content; a ``multipart/signed`` is verified against
the raw bytes between its boundaries and left as it is.  Layers inside (signed inside
encrypted) are handled in turn.  The outcome goes into ``X-ispMailGate-SMIME-Result`` and
one ``X-ispMailGate-SMIME-Signature`` per signature; what cannot be decrypted follows
``on_undecryptable``.  Nothing is ever dropped.
"""

from __future__ import annotations

from typing import Protocol

from ..base import Context, marked_direction
from ..mime import Message, ParseError, Part, addresses
from ..secure_mime import ENVELOPED, follow_undecryptable, may_render_as_markup, merge_decrypted, native
from .cms import NotForUs, Openssl, Signature, Undecryptable, decrypt, verify
from .credentials import Identity
from .parts import MARKER, RESULT, SIGNATURE, Malformed, signed_content, smime_kind

MAX_LAYERS = 4          # encrypted inside signed inside encrypted ... deeper is left as it is
MAX_CALLS = 32          # decryptions and verifications per message


class Options(Protocol):
    """What this direction reads of its smime step (the step itself: a Smime, which imports
    this module, so this module does not import it back)."""
    direction: str
    max_size: int
    on_undecryptable: str
    trust_store: str
    unwrap_opaque: bool


class Incoming:
    """One message through the decrypting and verifying direction."""

    def __init__(self, smime: Options, ctx: Context, keys: list[Identity], openssl: Openssl) -> None:
        self.smime, self.ctx, self.keys, self.openssl = smime, ctx, keys, openssl
        self.signatures: list[tuple[str, Signature]] = []     # (scope, signature)
        self.decrypted: list[str] = []                        # scopes
        self.failures: list[str] = []
        self.foreign_only = True        # every failure so far was "not for our keys"
        self.calls = 0
        self.markup: int | None = None  # parts a reader may render as markup, counted once per tree
        self.output = 0                 # bytes decrypted or unwrapped into the message so far

    def run(self, message: Message) -> None:
        self.message = message
        marked = marked_direction(message, MARKER, "auto") == "neg"     # a gateway encrypted it
        self._scan(message.root, None, 0)
        if (self.smime.direction == "auto" and not marked and self.failures and self.foreign_only
                and not self.decrypted):
            # Encrypted to somebody else's certificate and not by a peer gateway: outgoing
            # mail that is encrypted already, which pos leaves alone too.
            self.ctx.log.info("encrypted to certificates this gateway does not hold: passed as it is")
            return
        self._record(message)

    # -- walking the tree ----------------------------------------------------------------

    def _scan(self, part: Part, parent: Part | None, depth: int) -> None:
        kind = smime_kind(part)
        if kind is not None and depth > MAX_LAYERS:
            self._fail(Undecryptable(f"more than {MAX_LAYERS} layers of encryption and signing"))
        elif kind in ENVELOPED:
            self._decrypt(part, parent, depth)
        elif kind == "signed-data":
            self._verify_opaque(part, parent, depth)
        elif not part.is_leaf and not part.is_message:     # a forwarded message is a document
            if kind == "multipart/signed":
                self._verify_detached(part, parent)
            for child in list(part.children):
                self._scan(child, part, depth)

    def _decrypt(self, part: Part, parent: Part | None, depth: int) -> None:
        try:
            self._not_beside_markup(part, parent)
            self._spend()
            plain = self._charged(decrypt(self._data(part), self.keys, self.openssl))
            inner = self._parsed(part, plain)
        except Undecryptable as error:
            return self._fail(error)
        self.markup = None              # the plaintext takes the encrypted part's place
        self.decrypted.append(_scope(parent))
        self._replace(part, parent, inner, depth)

    def _verify_opaque(self, part: Part, parent: Part | None, depth: int) -> None:
        try:
            self._spend()
            data = self._data(part)
        except Undecryptable as error:
            return self._signed(parent, Signature("bad", reason=f"not checked: {error}"))
        signature, content = verify(data, None, self.smime.trust_store, self.openssl, self._scratch())
        self._signed(parent, signature)
        if content is not None and self.smime.unwrap_opaque:
            try:
                inner = self._parsed(part, self._charged(content))
            except Undecryptable as error:      # left as it is: the reader's own S/MIME can open it
                self.ctx.log.warning("signed content left wrapped: %s", error)
                return
            self._replace(part, parent, inner, depth)

    def _verify_detached(self, part: Part, parent: Part | None) -> None:
        try:
            self._spend()
            content, data = signed_content(part)
        except (Malformed, Undecryptable) as error:
            return self._signed(parent, Signature("bad", reason=str(error)))
        signature, _ = verify(data, content, self.smime.trust_store, self.openssl, self._scratch())
        self._signed(parent, signature)

    def _parsed(self, part: Part, plain: bytes) -> Part:
        """The entity ``plain`` (decrypted, or unwrapped) parsed within the message's limits."""
        try:
            return self.message.parse_inner(native(plain, self.message.eol), part.depth + 1)
        except ParseError as error:
            raise Undecryptable(f"the decrypted entity cannot be parsed: {error}") from None

    def _charged(self, plain: bytes) -> bytes:
        """Content put into the message, charged to its budget (max_decoded) and within
        max_message_size for all this step puts in."""
        budget = self.ctx.budget
        limit, why = budget.allowance(self.output)
        budget.charge(decoded=len(plain))
        if len(plain) > limit:
            raise Undecryptable(f"decrypted data of {len(plain)} bytes: {why}")
        self.output += len(plain)
        return plain

    def _replace(self, part: Part, parent: Part | None, inner: Part, depth: int) -> None:
        """The entity ``inner`` (decrypted, or unwrapped) takes ``part``'s place, and is scanned."""
        eol = self.message.eol
        if parent is None:
            self.message.root = inner = merge_decrypted(part.headers, inner, eol)
        else:
            parent.replace(part, inner)
        self._scan(inner, parent, depth + 1)

    def _data(self, part: Part) -> bytes:
        """The DER of a part; larger than max_size (base64 a third larger) is not decoded,
        nor what its content (no larger than the DER) could not fit into the budget."""
        most, why = self.ctx.budget.allowance(self.output, (self.smime.max_size,
                                                            f"larger than max_size ({self.smime.max_size} bytes)"))
        if len(part.body) > most * 4 // 3 + 4096:
            raise Undecryptable(why)
        data = part.decoded()
        if len(data) > self.smime.max_size:
            raise Undecryptable(f"larger than max_size ({self.smime.max_size} bytes)")
        return data

    def _not_beside_markup(self, part: Part, parent: Part | None) -> None:
        """Plaintext never joins markup the sender wrapped around it (EFAIL direct exfiltration)."""
        if parent is None:
            return
        if self.markup is None:         # counted again only after a decryption changed the tree
            self.markup = sum(1 for leaf in self.message.leaves() if may_render_as_markup(leaf))
        if self.markup > sum(1 for leaf in part.leaves() if may_render_as_markup(leaf)):
            raise Undecryptable("an encrypted part beside a part a reader may render as markup "
                                "(HTML, XHTML, SVG ...) is not decrypted (EFAIL)")

    def _spend(self) -> None:
        self.calls += 1
        if self.calls > MAX_CALLS:
            raise Undecryptable(f"more than {MAX_CALLS} encrypted or signed parts")

    def _scratch(self) -> str:
        return str(self.ctx.workdir())

    # -- outcome --------------------------------------------------------------------------

    def _signed(self, parent: Part | None, signature: Signature) -> None:
        scope = _scope(parent)
        if scope == "message":
            signature = _from_checked(signature, self.message.headers.get_all("From"))
        self.signatures.append((scope, signature))

    def _fail(self, error: Undecryptable) -> None:
        self.failures.append(str(error))
        self.foreign_only = self.foreign_only and isinstance(error, NotForUs)

    def _record(self, message: Message) -> None:
        headers = message.headers
        if self.failures:
            follow_undecryptable(self.smime.on_undecryptable, "; ".join(dict.fromkeys(self.failures)),
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


def _from_checked(signature: Signature, senders: list[str]) -> Signature:
    """RFC 8550 3: a signature vouches for the message only if its certificate names the
    From address; a good signature by somebody else is untrusted."""
    if signature.state != "good" or not signature.signer_addresses:
        return signature
    written = {address.lower() for _, address in addresses(senders) if address}
    if written and written <= signature.signer_addresses:
        return signature
    return Signature("untrusted", signature.signer, f"the certificate is not for the From address "
                     f"{', '.join(sorted(written)) or '(none)'}", signature.signer_addresses)
