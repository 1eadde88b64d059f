"""smime: encrypt, sign, decrypt and verify mail with S/MIME (RFC 8551), the twin of pgp.

Two ways to use it, as for pgp:

- between two sites: the sending gateway encrypts to the receiving gateway's certificate
  (``recipient_cert``) and marks the message ``X-ispMailGate-SMIME: pos``; the receiving
  gateway decrypts it with its own key (``key_file``, ``cert_file``);
- per recipient (``per_recipient = true``): each recipient's own certificate from
  ``recipient_certs`` (a folder of PEM files or one PEM bundle); a recipient without one
  gets ``on_missing_cert``, and recipients with different certificates end up in
  different delivery groups.

``pos`` writes ``application/pkcs7-mime; smime-type=enveloped-data`` (AES-256-CBC, or
authenticated AES-GCM) with the whole original MIME entity inside, signed first if asked
(``multipart/signed`` or opaque signed data).  It never encrypts what is encrypted already
(S/MIME or PGP, judged by content); signed-only mail is encrypted as a whole, its
signature inside.  ``neg`` decrypts and verifies (see :mod:`.incoming`).  ``auto`` decides
by content: mail that is S/MIME-encrypted as a whole goes ``neg``, anything else ``pos``.

The ``cryptography`` package (imported on first use) does what it can, ``openssl cms``
the rest (see :mod:`.cms`).  Set-up problems make the mail wait (TempFail); data the
gateway cannot decrypt follows ``on_undecryptable``.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from ..base import Context, Filter, OptionError, Reject, TempFail, choice, option, parse_size
from ..mime import Message
from ..secure_mime import (SMIME_KINDS, already_encrypted, canonical, remove_verdicts, seven_bit, split_entity,
                           under_outer, unparsed_incoming)
from .parts import MARKER, RESULT, SIGNATURE


def _absolute(value: Any) -> str:
    if not isinstance(value, str) or not os.path.isabs(value):
        raise ValueError(f"expected an absolute path, got {value!r}")
    return value


def _absolute_or_empty(value: Any) -> str:
    return value if value == "" else _absolute(value)


def _paths(value: Any) -> tuple[str, ...]:
    """One absolute path, or a list of them."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values:
        raise ValueError(f"expected an absolute path or a list of them, got {value!r}")
    return tuple(_absolute(path) for path in values)


# What S/MIME data in a message looks like, found in its raw bytes when it cannot be parsed.
_SMIME_TRACES = r"pkcs7-|\.p7m\b"


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Smime(Filter):
    """S/MIME for a gateway: enveloped (and signed) data out, decryption and verification in."""

    name = "smime"
    description = "encrypt and sign (pos), decrypt and verify (neg) with S/MIME"
    lazy_modules = ("cryptography.x509", "cryptography.hazmat.primitives.serialization.pkcs7",
                    "cryptography.hazmat.primitives.asymmetric.rsa", "email.utils", "subprocess",
                    "ispmailgate_filters.smime.cms", "ispmailgate_filters.smime.credentials",
                    "ispmailgate_filters.smime.incoming", "ispmailgate_filters.smime.checks",
                    "cryptography.hazmat.backends.openssl.backend")
    # pos encrypts it whole; neg removes forged verdicts and calls what it holds undecryptable
    unparsed_mail = "process"

    direction: str = option("auto", "pos: encrypt/sign; neg: decrypt/verify; auto: by content "
                            "(S/MIME-encrypted mail goes neg, all else pos)", convert=choice("pos", "neg", "auto"))
    key_file: tuple = option((), "the gateway's private key, PEM, unencrypted; refused if others can read "
                             "it (0600, or 0640 root:mail); a list: several keys, all decrypt, the first "
                             "signs", convert=_paths)
    cert_file: tuple = option((), "the certificate of each key_file, PEM, in the same order (certificates "
                              "after the first in a file: its chain, sent with signatures)", convert=_paths)
    recipient_cert: str = option("", "encrypt to this one certificate (PEM): a peer gateway's",
                                 convert=_absolute_or_empty)
    per_recipient: bool = option(False, "encrypt to each recipient's own certificate from recipient_certs "
                                 "instead")
    recipient_certs: str = option("", "the recipients' certificates: a folder of PEM files or one PEM "
                                  "bundle, matched by the e-mail addresses in each certificate",
                                  convert=_absolute_or_empty)
    on_missing_cert: str = option("clear", "a recipient without a usable certificate (per_recipient): clear "
                                  "(sent unencrypted, signed if sign = true), reject (5.7.5) or tempfail",
                                  convert=choice("clear", "reject", "tempfail"))
    encrypt: bool = option(True, "false: only sign, never encrypt")
    sign: bool = option(False, "sign outgoing mail with the first key_file and cert_file (before encrypting)")
    sign_format: str = option("detached", "detached (multipart/signed, readable without S/MIME) or opaque "
                              "(signed data, application/pkcs7-mime)", convert=choice("detached", "opaque"))
    digest: str = option("sha256", "the signature's digest: sha256, sha384 or sha512",
                         convert=choice("sha256", "sha384", "sha512"))
    cipher: str = option("aes256-cbc", "content encryption: aes256-cbc, or aes128-gcm / aes256-gcm "
                         "(authenticated, RFC 5083; not every reader has it)",
                         convert=choice("aes256-cbc", "aes128-gcm", "aes256-gcm"))
    trust_store: str = option("", "the CA certificates (one PEM bundle) signatures are verified against; "
                              "without it every signature is at best untrusted", convert=_absolute_or_empty)
    unwrap_opaque: bool = option(True, "neg: replace opaque signed data by its content once checked (false: "
                                 "leave it for the reader's own S/MIME)")
    on_undecryptable: str = option("deliver", "encrypted mail the gateway cannot decrypt (not for its keys, "
                                   "corrupt, too large): deliver (as it came, with a result header, the "
                                   "postmaster told), report (the postmaster gets it instead), reject (5.7.5, "
                                   "the postmaster told), tempfail (4.7.5; only the log records it)",
                                   convert=choice("deliver", "report", "reject", "tempfail"))
    max_size: int = option(50 * 1024 * 1024, "largest encrypted or signed data accepted (bytes, or 10M)",
                           convert=parse_size)
    timeout: float = option(60.0, "seconds one openssl call may take", convert=_seconds)
    openssl_binary: str = option("openssl", "the openssl program (OpenSSL 3)")

    def __post_init__(self) -> None:
        if self.recipient_cert and self.per_recipient:
            raise OptionError("per_recipient", "set either recipient_cert (a gateway certificate) or "
                                               "per_recipient = true")
        if self.per_recipient != bool(self.recipient_certs):
            raise OptionError("recipient_certs", "missing: per_recipient = true needs it" if self.per_recipient
                              else "set, but per_recipient = false")
        if self.encrypts and not (self.recipient_cert or self.per_recipient):
            raise OptionError("recipient_cert", "missing: the certificate to encrypt to (or per_recipient = "
                                                "true, or encrypt = false to sign only)")
        if self.direction != "neg" and not self.encrypt and not self.sign:
            raise OptionError("sign", "encrypt = false and sign = false: nothing to do")
        if len(self.key_file) != len(self.cert_file):
            raise OptionError("cert_file", f"{len(self.cert_file)} certificate(s) for {len(self.key_file)} "
                                           "key_file(s): give one certificate per key, in the same order")
        if self.sign and not self.key_file:
            raise OptionError("key_file", "missing: sign = true needs the gateway's key_file and cert_file")
        if self.direction == "neg" and not (self.key_file or self.trust_store):
            raise OptionError("key_file", "missing: direction neg needs key_file and cert_file to decrypt, "
                                          "or a trust_store to verify")

    @property
    def encrypts(self) -> bool:
        return self.direction != "neg" and self.encrypt

    def variant(self, recipient: str) -> Hashable:
        """Per recipient: the fingerprint of their certificate, so each makes its own group."""
        if not (self.per_recipient and self.encrypts):
            return None
        from .credentials import CertificateStore, fingerprint, require_library

        require_library()
        cert = CertificateStore.load(self.recipient_certs).for_recipient(recipient)
        return fingerprint(cert) if cert is not None else "no certificate"

    def process(self, message: Message, ctx: Context) -> None:
        remove_verdicts(message, ctx, (RESULT, SIGNATURE), MARKER)
        from .cms import Openssl
        from .credentials import CertTrouble, identities, require_library

        try:
            require_library()
            openssl = Openssl(self.openssl_binary, self.timeout)
            if self._direction(message) == "pos":
                self._outgoing(message, ctx, openssl)
            elif message.unparsed is not None:
                unparsed_incoming(message, ctx, self.on_undecryptable, RESULT, _SMIME_TRACES, "S/MIME data")
            else:
                from .incoming import Incoming

                Incoming(self, ctx, identities(self.key_file, self.cert_file), openssl).run(message)
        except CertTrouble as trouble:
            raise TempFail(f"smime: {trouble}", trouble.status) from None

    def _direction(self, message: Message) -> str:
        if self.direction != "auto":
            return self.direction
        return "neg" if already_encrypted(message.root) & SMIME_KINDS else "pos"

    # -- pos ------------------------------------------------------------------------------

    def _outgoing(self, message: Message, ctx: Context, openssl) -> None:
        kinds = already_encrypted(message.root)
        if kinds:
            ctx.log.info("not encrypted again: already %s", ", ".join(sorted(kinds)))
            return
        certs = self._encryption_certs(ctx)
        if not certs and not self.sign:
            return
        eol = message.eol
        outer, entity = split_entity(message.root, eol)
        inner = self._signed(entity, eol, message.parse_again) if self.sign else None
        if certs:
            from .cms import encrypt
            from .credentials import describe
            from .parts import pkcs7_part

            data = canonical(inner.to_bytes() if inner is not None else entity)
            enveloped = encrypt(data, certs, self.cipher, openssl, str(ctx.workdir()))
            kind = "enveloped-data" if self.cipher.endswith("cbc") else "authenveloped-data"
            root = under_outer(outer, pkcs7_part(enveloped, kind, eol), eol)
            ctx.log.info("encrypted (%s) to %s%s", self.cipher, "; ".join(map(describe, certs)),
                         " and signed" if self.sign else "")
        else:
            root = under_outer(outer, inner, eol)
            ctx.log.info("signed, not encrypted")
        root.headers.remove(MARKER)
        if certs and self.recipient_cert:   # for the receiving gateway; per-recipient mail is not for one
            root.headers.add(MARKER, "pos")
        message.root = root

    def _signed(self, entity: bytes, eol: bytes, parse):
        """The entity signed by the gateway: a multipart/signed, or opaque signed data."""
        from .cms import MICALG, sign
        from .credentials import identities
        from .parts import pkcs7_part, signed_multipart

        identity = identities(self.key_file[:1], self.cert_file[:1])[0]

        if self.sign_format == "opaque":
            return pkcs7_part(sign(canonical(entity), identity, self.digest, detached=False), "signed-data", eol)
        entity = seven_bit(entity, parse)
        signature = sign(canonical(entity), identity, self.digest, detached=True)
        return signed_multipart(entity, signature, MICALG[self.digest], eol, parse)

    def _encryption_certs(self, ctx: Context) -> list:
        """The certificates to encrypt to; [] sends the message unencrypted (on_missing_cert = clear)."""
        from .credentials import CertificateStore, CertTrouble, describe, read_certificates, unusable

        if not self.encrypt:
            return []
        if self.recipient_cert:
            cert = read_certificates(self.recipient_cert, "recipient_cert")[0]
            reason = unusable(cert, encrypting=True)
            if reason:
                raise CertTrouble(f"recipient_cert {describe(cert)} cannot be used: {reason}")
            return [cert]
        store = CertificateStore.load(self.recipient_certs)
        found = {recipient: store.for_recipient(recipient) for recipient in ctx.envelope.recipients}
        missing = [recipient for recipient, cert in found.items() if cert is None]
        if not missing:
            return list({id(cert): cert for cert in found.values()}.values())
        if self.on_missing_cert == "reject":
            raise Reject(f"no S/MIME certificate for {', '.join(missing)}; this gateway sends encrypted "
                         "mail only", "5.7.5")
        if self.on_missing_cert == "tempfail":
            raise TempFail(f"no S/MIME certificate for {', '.join(missing)} yet", "4.7.5")
        ctx.log.info("no S/MIME certificate for %s: sent %s", ", ".join(missing),
                     "signed, not encrypted" if self.sign else "unencrypted")
        return []

    # -- check and explain ----------------------------------------------------------------

    def breaks_dkim(self) -> bool:
        return True         # encrypting, signing or decrypting replaces the body

    def problems(self) -> list[str]:
        from .checks import problems

        return problems(self)

    def explain(self, variant: Hashable) -> str:
        from .checks import explain

        return explain(self, variant)
