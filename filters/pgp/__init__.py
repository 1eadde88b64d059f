"""pgp: encrypt, sign, decrypt and verify mail with OpenPGP, through a real gpg.

Two ways to use it, the original's and today's:

- between two sites: the sending gateway encrypts to the receiving gateway's key
  (``uid``) and marks the message ``X-ispMailGate-PGP: pos``; the receiving gateway
  decrypts it with its own secret key;
- per recipient (``per_recipient = true``): each recipient's own public key from the
  gateway's key ring; a recipient without one gets ``on_missing_key``, and recipients
  with different keys end up in different delivery groups.

``pos`` writes PGP/MIME (RFC 3156): ``multipart/encrypted`` with the whole original MIME
entity inside, or ``multipart/signed`` with ``encrypt = false``.  It never encrypts what
is encrypted already (PGP/MIME, inline PGP, S/MIME enveloped data); signed-only mail is
encrypted as a whole, its signature inside.  ``neg`` decrypts PGP/MIME and inline PGP and
verifies signatures (see :mod:`.incoming`).  ``auto`` decides by content: mail that
is PGP-encrypted as a whole goes ``neg``, anything else ``pos``.  The marker never
decides on its own: forging or stripping it cannot make the gateway skip a decryption or
an encryption, nor decrypt what it must not.

Configuration problems (gpg missing, gnupghome missing, agent trouble, a key or
passphrase that does not work) make the mail wait (TempFail); data the gateway cannot
decrypt follows ``on_undecryptable``.  python-gnupg is imported on first use.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from ..base import (Context, Filter, OptionError, Reject, TempFail, choice, mapping_of_strings, option,
                   parse_size, seconds)
from ..mime import Message
from .gpg import GpgTrouble, Keyring
from .incoming import Incoming
from ..secure_mime import remove_verdicts, unparsed_incoming
from .parts import (MARKER, PGP_KINDS, RESULT, SIGNATURE, already_encrypted, build_encrypted, build_signed,
                       canonical, seven_bit, split_entity)


def _passphrase_table(value: Any) -> tuple[tuple[str, str], ...]:
    pairs = mapping_of_strings(value)
    for selector, passphrase in pairs:
        if re.search(r"[\r\n\0]", passphrase):
            raise ValueError(f"the passphrase for {selector!r} contains a line break or NUL")
    return pairs


def _absolute(value: Any) -> str:
    if not isinstance(value, str) or not os.path.isabs(value):
        raise ValueError(f"expected an absolute path, got {value!r}")
    return value


_seconds = seconds()
# What OpenPGP data in a message looks like, found in its raw bytes when it cannot be parsed.
_PGP_TRACES = r"-----BEGIN PGP |application/pgp-|\.(?:pgp|gpg)\b"


@dataclass(frozen=True)
class Pgp(Filter):
    """OpenPGP for a gateway: PGP/MIME out, PGP/MIME and inline PGP in."""

    name = "pgp"
    description = "encrypt and sign (pos), decrypt and verify (neg) with OpenPGP and gpg"
    lazy_modules = ("gnupg", "mimetypes", "tempfile", "threading", "tomllib", "ispmailgate_filters.pgp.gpg",
                    "ispmailgate_filters.pgp.incoming", "ispmailgate_filters.pgp.parts")
    # pos encrypts it whole; neg removes forged verdicts and calls what it holds undecryptable
    unparsed_mail = "process"

    direction: str = option("auto", "pos: encrypt/sign; neg: decrypt/verify; auto: by content "
                            "(PGP-encrypted mail goes neg, all else pos)", convert=choice("pos", "neg", "auto"))
    uid: str = option("", "encrypt to this gateway key: user id, key id or fingerprint in the key ring")
    per_recipient: bool = option(False, "encrypt to each recipient's own key from the key ring instead")
    encrypt: bool = option(True, "false: only sign (multipart/signed), never encrypt")
    sign: bool = option(False, "sign outgoing mail with sign_uid")
    sign_uid: str = option("", "the signing key (default: the key ring's first secret key)")
    on_missing_key: str = option("clear", "a recipient without a usable key (per_recipient): clear "
                                 "(sent unencrypted, signed if sign = true), reject (5.7.5) or tempfail",
                                 convert=choice("clear", "reject", "tempfail"))
    on_undecryptable: str = option("deliver", "encrypted mail the gateway cannot decrypt (no secret key, "
                                   "corrupt, too large): deliver (as it came, with a result header, the "
                                   "postmaster told), report (the postmaster gets it instead, as for a "
                                   "filter error), reject (5.7.5, the postmaster told), tempfail (4.7.5; "
                                   "only the log records it, as a report would repeat on every retry)",
                                   convert=choice("deliver", "report", "reject", "tempfail"))
    gnupghome: str = option("/var/lib/ispmailgate/gnupg", "the gateway's GnuPG home (never ~/.gnupg)",
                            convert=_absolute)
    passphrases: tuple = option((), "passphrases of secret keys: a table of key id, fingerprint, user id "
                                "or address = passphrase", convert=_passphrase_table, secret=True)
    passphrase_file: str = option("", "a TOML file with the same table; refused if others can read it "
                                  "(0600, or 0640 for a group such as root:mail); entries in passphrases win")
    always_trust: bool = option(True, "every key in the gateway's key ring is trusted (false: gpg's web "
                                "of trust decides)")
    max_size: int = option(50 * 1024 * 1024, "largest decrypted data accepted (bytes, or 10M)",
                           convert=parse_size)
    timeout: float = option(60.0, "seconds one gpg call may take", convert=_seconds)
    gpg_binary: str = option("gpg", "the gpg program (GnuPG 2.1 or newer)")

    def __post_init__(self) -> None:
        if self.uid and self.per_recipient:
            raise OptionError("per_recipient", "set either uid (a gateway key) or per_recipient = true")
        encrypts = self.direction != "neg" and self.encrypt
        if encrypts and not (self.uid or self.per_recipient):
            raise OptionError("uid", "missing: the key to encrypt to (or per_recipient = true, "
                                     "or encrypt = false to sign only)")
        if self.direction != "neg" and not self.encrypt and not self.sign:
            raise OptionError("sign", "encrypt = false and sign = false: nothing to do")
        if self.sign_uid and not self.sign:
            raise OptionError("sign_uid", "set, but sign = false")

    def keyring(self) -> Keyring:
        return Keyring(self.gnupghome, self.gpg_binary, self.timeout, self.always_trust, self._passphrases)

    def variant(self, recipient: str) -> Hashable:
        """Per recipient: the fingerprint of their key, so each key makes its own group."""
        if self.per_recipient and self.encrypt and self.direction != "neg":
            return self.keyring().recipient_key(recipient) or "no key"
        return None

    def process(self, message: Message, ctx: Context) -> None:
        remove_verdicts(message, ctx, (RESULT, SIGNATURE), MARKER)
        keyring = self.keyring()
        try:
            if self._direction(message) == "pos":
                self._outgoing(message, ctx, keyring)
            elif message.unparsed is not None:
                unparsed_incoming(message, ctx, self.on_undecryptable, RESULT, _PGP_TRACES, "OpenPGP data")
            else:
                Incoming(self, ctx, keyring).run(message)
        except GpgTrouble as trouble:
            raise TempFail(f"pgp: {trouble}", trouble.status) from None

    def _direction(self, message: Message) -> str:
        if self.direction != "auto":
            return self.direction
        return "neg" if already_encrypted(message.root) & PGP_KINDS else "pos"

    # -- pos ------------------------------------------------------------------------------

    def _outgoing(self, message: Message, ctx: Context, keyring: Keyring) -> None:
        kinds = already_encrypted(message.root)
        if kinds:
            ctx.log.info("not encrypted again: already %s", ", ".join(sorted(kinds)))
            return
        keys = self._encryption_keys(ctx, keyring)
        eol = message.eol
        outer, entity = split_entity(message.root, eol)
        if keys:
            armor = keyring.encrypt(canonical(entity), keys, sign=self.sign, sign_uid=self.sign_uid)
            root = build_encrypted(outer, armor, eol)
            ctx.log.info("encrypted to %s%s", ", ".join(keys), " and signed" if self.sign else "")
        elif self.sign:
            entity = seven_bit(entity, message.parse_again)
            signature, micalg = keyring.sign_detached(canonical(entity), self.sign_uid)
            root = build_signed(outer, entity, signature, micalg, eol, message.parse_again)
            ctx.log.info("signed, not encrypted")
        else:
            return
        root.headers.remove(MARKER)
        if keys and self.uid:           # for the receiving gateway; per-recipient mail is not for one
            root.headers.add(MARKER, "pos")
        message.root = root

    def _encryption_keys(self, ctx: Context, keyring: Keyring) -> list[str]:
        """The keys to encrypt to; [] sends the message unencrypted (on_missing_key = clear)."""
        if not self.encrypt:
            return []
        if self.uid:
            return [self.uid]
        found = {recipient: keyring.recipient_key(recipient) for recipient in ctx.envelope.recipients}
        missing = [recipient for recipient, key in found.items() if key is None]
        if not missing:
            return sorted(set(found.values()))
        if self.on_missing_key == "reject":
            raise Reject(f"no OpenPGP key for {', '.join(missing)}; this gateway sends encrypted mail only",
                         "5.7.5")
        if self.on_missing_key == "tempfail":
            raise TempFail(f"no OpenPGP key for {', '.join(missing)} yet", "4.7.5")
        ctx.log.info("no OpenPGP key for %s: sent %s", ", ".join(missing),
                     "signed, not encrypted" if self.sign else "unencrypted")
        return []

    # -- passphrases and check ------------------------------------------------------------

    def _passphrases(self) -> dict[str, str]:
        table = read_passphrase_file(self.passphrase_file) if self.passphrase_file else {}
        table.update(self.passphrases)
        return table

    def breaks_dkim(self) -> bool:
        return True         # encrypting or decrypting replaces the body

    def trusted_files(self) -> dict[str, str]:
        files = {"gpg_binary": self.gpg_binary}
        if self.passphrase_file:
            files["passphrase_file"] = self.passphrase_file
        return files

    def problems(self) -> list[str]:
        if not os.path.isdir(self.gnupghome):
            return [f"gnupghome {self.gnupghome} does not exist or is not a directory"]
        found = []
        if self.passphrase_file:
            try:
                read_passphrase_file(self.passphrase_file)
            except GpgTrouble as trouble:
                found.append(str(trouble))
        try:
            found += self._key_problems(self.keyring())
        except GpgTrouble as trouble:
            found.append(str(trouble))
        return found

    def _key_problems(self, keyring: Keyring) -> list[str]:
        found, home = [], self.gnupghome
        if self.direction != "neg" and self.encrypt and self.uid and \
                not any(key.encrypts for key in keyring.find(self.uid)):
            found.append(f"no usable public key for uid {self.uid!r} in {home}")
        if self.direction != "neg" and self.sign and \
                not (keyring.find(self.sign_uid, secret=True) if self.sign_uid else keyring.secret_keys()):
            found.append(f"no secret key {self.sign_uid or '(none at all)'} to sign with in {home}")
        if self.direction == "neg" and not keyring.secret_keys():
            found.append(f"no secret key in {home}: nothing can be decrypted")
        return found


def read_passphrase_file(path: str) -> dict[str, str]:
    """The passphrase table in ``path`` (TOML); refused if others may read it."""
    import tomllib

    try:
        with open(path, "rb") as stream:
            if os.fstat(stream.fileno()).st_mode & 0o004:
                raise GpgTrouble(f"passphrase_file {path} is readable by others: chmod o-r it")
            table = tomllib.load(stream)
    except OSError as error:
        raise GpgTrouble(f"cannot read passphrase_file {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise GpgTrouble(f"passphrase_file {path}: TOML syntax: {error}") from None
    try:
        return dict(_passphrase_table(table))
    except ValueError as error:
        raise GpgTrouble(f"passphrase_file {path}: {error}") from None
