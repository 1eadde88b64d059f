"""CMS (RFC 5652) for the smime filter: encrypt, sign, decrypt, verify.

The ``cryptography`` package does what it can: AES-CBC enveloped data to RSA
certificates, signatures, and decrypting DER enveloped data with an RSA key.  The
system's ``openssl cms`` does the rest: every signature verification (the package
verifies no CMS signatures), AES-GCM (authenticated enveloped data, RFC 5083), EC
certificates and keys, and BER-encoded (streamed) or 3DES data from other mail programs.
openssl gets an argv list (never a shell), a clean environment, the data on stdin and a
deadline; a child that overruns is killed and reaped.

Two kinds of failure: :class:`~.credentials.CertTrouble` is the gateway's own set-up (the
mail waits), :class:`Undecryptable` the data's (it follows ``on_undecryptable``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from ..secure_mime import ENVELOPED, cms_content_type
from .credentials import CertTrouble, Identity, addresses, describe, subject

MICALG = {"sha256": "sha-256", "sha384": "sha-384", "sha512": "sha-512"}
_OPENSSL_CIPHERS = {"aes256-cbc": "-aes-256-cbc", "aes128-gcm": "-aes-128-gcm", "aes256-gcm": "-aes-256-gcm"}
_VERIFY_ERROR = re.compile(r"Verify error: ?([^\n]+)")


class Undecryptable(Exception):
    """The data cannot be decrypted here: not for our keys, corrupt, malformed, too large."""


class NotForUs(Undecryptable):
    """Encrypted to certificates whose keys the gateway does not hold."""


@dataclass(frozen=True)
class Signature:
    """One signature as checked: ``state`` good, bad, untrusted or expired."""
    state: str
    signer: str = ""                            # the signer's addresses, else the subject
    reason: str = ""
    signer_addresses: frozenset[str] = frozenset()

    def describe(self) -> str:
        words = [self.state]
        for name in ("signer", "reason"):
            if getattr(self, name):
                words.append('%s="%s"' % (name, getattr(self, name).replace('"', "'")))
        return "; ".join(words)


@dataclass(frozen=True)
class Openssl:
    """The ``openssl`` program, run with a deadline in a private scratch folder."""
    binary: str = "openssl"
    timeout: float = 60.0

    def run(self, args: list[str], data: bytes) -> tuple[int, bytes, str]:
        import subprocess

        environment = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LC_ALL": "C"}
        try:     # run() kills and reaps the child on a timeout, and on any error in between
            done = subprocess.run([self.binary, *args], input=data, capture_output=True,
                                  timeout=self.timeout, env=environment, check=False)
        except subprocess.TimeoutExpired:
            raise CertTrouble(f"openssl {' '.join(args[:2])} took longer than {self.timeout:.0f} s",
                              "4.4.7") from None
        except OSError as error:
            raise CertTrouble(f"cannot run openssl ({self.binary}): {error.strerror or error}; "
                              "is OpenSSL installed?") from None
        return done.returncode, done.stdout, done.stderr.decode("utf-8", "replace")


# -- pos: encrypt and sign ---------------------------------------------------------------------

def encrypt(data: bytes, certs: list, cipher: str, openssl: Openssl, scratch: str) -> bytes:
    """DER enveloped data (authenticated for the GCM ciphers) of ``data`` for ``certs``."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    if cipher == "aes256-cbc" and all(isinstance(c.public_key(), rsa.RSAPublicKey) for c in certs):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.ciphers import algorithms
        from cryptography.hazmat.primitives.serialization import pkcs7

        builder = pkcs7.PKCS7EnvelopeBuilder().set_data(data).set_content_encryption_algorithm(algorithms.AES256)
        for cert in certs:
            builder = builder.add_recipient(cert)
        return builder.encrypt(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
    files = [_write_pem(scratch, f"recipient-{i}.pem", cert) for i, cert in enumerate(certs)]
    code, out, err = openssl.run(["cms", "-encrypt", "-binary", "-outform", "DER", _OPENSSL_CIPHERS[cipher],
                                  *files], data)
    if code != 0:
        raise CertTrouble(f"openssl cannot encrypt to {', '.join(map(describe, certs))}: {_last_error(err)}")
    return out


def sign(data: bytes, identity: Identity, digest: str, *, detached: bool) -> bytes:
    """A DER signed-data structure over ``data`` (without it when ``detached``)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.serialization import pkcs7

    algorithm = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}[digest]()
    builder = pkcs7.PKCS7SignatureBuilder().set_data(data).add_signer(identity.cert, identity.key, algorithm)
    for cert in identity.chain:
        builder = builder.add_certificate(cert)
    options = [pkcs7.PKCS7Options.Binary] + ([pkcs7.PKCS7Options.DetachedSignature] if detached else [])
    return builder.sign(serialization.Encoding.DER, options)


def _write_pem(scratch: str, name: str, cert: Any) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    path = os.path.join(scratch, name)
    with open(path, "wb") as out:
        out.write(cert.public_bytes(Encoding.PEM))
    return path


# -- neg: decrypt --------------------------------------------------------------------------------

def decrypt(der: bytes, keys: list[Identity], openssl: Openssl) -> bytes:
    """The content of enveloped data, with whichever of the gateway's keys it is for."""
    der = checked_structure(der, ENVELOPED)
    if not keys:
        raise NotForUs("no key_file is configured to decrypt with")
    left = keys
    if cms_content_type(der[:64]) == "enveloped-data" and der[1] != 0x80:
        plain, tried = _decrypt_with_library(der, [key for key in keys if key.rsa])
        if plain is not None:
            return plain
        left = [key for key in keys if key not in tried]
    if not left:
        raise NotForUs(_not_ours(keys))
    return _decrypt_with_openssl(der, left, openssl, keys)


def _decrypt_with_library(der: bytes, keys: list[Identity]) -> tuple[bytes | None, list[Identity]]:
    """(the content, or None; the keys found not to be recipients).  None with keys left
    untried means openssl must do it: an algorithm or encoding the library lacks."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import pkcs7

    tried = []
    for identity in keys:
        try:
            return pkcs7.pkcs7_decrypt_der(der, identity.cert, identity.key, []), tried
        except UnsupportedAlgorithm:
            return None, tried
        except ValueError as error:
            if "No recipient found" in str(error):
                tried.append(identity)
                continue
            if "parsing asn1" in str(error):
                return None, tried      # a structure the DER parser refuses: openssl reads BER too
            raise Undecryptable(f"decryption failed: {error} (corrupt or tampered data)") from None
        except Exception:               # whatever else the library makes of hostile data: openssl decides
            return None, tried
        except BaseException as error:  # a panic in the library's Rust code is a BaseException
            if type(error).__name__ != "PanicException":
                raise
            return None, tried
    return None, tried


def _decrypt_with_openssl(der: bytes, keys: list[Identity], openssl: Openssl, every: list[Identity]) -> bytes:
    for identity in keys:
        code, out, err = openssl.run(["cms", "-decrypt", "-inform", "DER", "-binary",
                                      "-recip", identity.cert_file, "-inkey", identity.key_file], der)
        if code == 0:
            return out
        if "Error reading" in err:
            raise Undecryptable(f"malformed CMS data: {_last_error(err)}")
        if "using private key" not in err:      # the recipient was found; the content failed
            raise Undecryptable(f"decryption failed: {_last_error(err)} (corrupt or tampered data)")
    raise NotForUs(_not_ours(every))


def _not_ours(keys: list[Identity]) -> str:
    names = ", ".join(describe(identity.cert) for identity in keys)
    return f"not encrypted to this gateway's certificate{'s' if len(keys) > 1 else ''} ({names})"


def checked_structure(der: bytes, kinds: frozenset[str]) -> bytes:
    """``der`` cut to the length its outer header declares; Undecryptable if it is not a
    CMS structure of one of ``kinds``, or declares more bytes than there are."""
    kind = cms_content_type(der[:64])
    if kind not in kinds:
        raise Undecryptable(f"not {' or '.join(sorted(kinds))} but {kind or 'no CMS structure'}")
    if der[1] == 0x80:
        return der          # BER, indefinite length: its end is found by parsing
    size = der[1] & 0x7F if der[1] > 0x80 else 0
    total = 2 + size + (int.from_bytes(der[2:2 + size], "big") if size else der[1])
    if total > len(der):
        raise Undecryptable(f"truncated: the CMS structure declares {total} bytes, {len(der)} are there")
    return der[:total]


# -- neg: verify -------------------------------------------------------------------------------

def verify(signature: bytes, content: bytes | None, trust_store: str, openssl: Openssl,
           scratch: str) -> tuple[Signature, bytes | None]:
    """Check signed data (``content`` given: a detached signature over it).

    Returns the verdict and, for opaque signed data whose signature holds, its content.
    The chain is checked against ``trust_store`` first; only when that fails is the
    signature itself checked alone, to tell a bad signature from an untrusted signer.
    """
    try:
        signature = checked_structure(signature, frozenset({"signed-data"}))
    except Undecryptable as error:
        return Signature("bad", reason=f"malformed signature: {error}"), None
    args = ["cms", "-verify", "-inform", "DER", "-binary", "-signer", os.path.join(scratch, "signer.pem")]
    if content is not None:
        path = os.path.join(scratch, "signed-content")
        with open(path, "wb") as out:
            out.write(content)
        args += ["-content", path, "-out", os.devnull]
    chain_error = "no trust_store is configured"
    if trust_store:
        code, out, err = openssl.run(args + ["-CAfile", trust_store, "-no-CApath", "-no-CAstore"], signature)
        if code == 0:
            return _signed_by("good", "", scratch), out if content is None else None
        found = _VERIFY_ERROR.search(err)
        if found is None:
            return _not_verified(err), None
        chain_error = found.group(1).strip()
    code, out, err = openssl.run(args + ["-noverify"], signature)
    if code != 0:
        return _not_verified(err), None
    state = "expired" if "expired" in chain_error else "untrusted"
    return _signed_by(state, chain_error, scratch), out if content is None else None


def _signed_by(state: str, reason: str, scratch: str) -> Signature:
    from .credentials import read_certificates

    path = os.path.join(scratch, "signer.pem")
    try:
        cert = read_certificates(path, "signer")[0]
    except CertTrouble:
        return Signature(state, reason=reason)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    mails = addresses(cert)
    return Signature(state, ", ".join(sorted(mails)) or subject(cert), reason, mails)


def _not_verified(err: str) -> Signature:
    if "signer certificate not found" in err:
        return Signature("untrusted", reason="the signer's certificate is not in the message")
    if "Error reading" in err:
        return Signature("bad", reason=f"malformed signature: {_last_error(err)}")
    return Signature("bad", reason=f"the signature does not match the content ({_last_error(err)})")


def _last_error(err: str) -> str:
    """openssl's last error reason, as in ``...:CMS routines:CMS_verify:content verify error:...``."""
    reasons = re.findall(r"^[0-9A-F]+:error:[0-9A-F]+:[^:]*:[^:]*:([^:]+):", err, re.M)
    if reasons:
        return reasons[-1]
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    return lines[-1] if lines else "openssl failed"
