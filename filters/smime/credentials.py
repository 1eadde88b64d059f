"""The smime filter's keys and certificates: the gateway's own, its partners', the trust store.

Everything is read from files the administrator names, with the ``cryptography`` package
(imported on first use, never when this module is imported).  A private key file that
others may read is refused, as pgp refuses such a passphrase file.  A certificate belongs
to the addresses it names (subjectAltName rfc822Name, else the subject's emailAddress).
What was read is kept while the files stay the same (``serve`` reads them once).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

MIN_CRYPTOGRAPHY = (45, 0, 1)       # PKCS7EnvelopeBuilder with AES-256, pkcs7_decrypt_der
CERTIFICATE_FILES = (".pem", ".crt", ".cer")      # what a recipient_certs folder is read for


class CertTrouble(Exception):
    """The gateway's set-up (a key, a certificate, a library, openssl): the mail waits."""

    def __init__(self, reason: str, status: str = "4.3.5") -> None:
        super().__init__(reason)
        self.status = status


def require_library() -> None:
    """Import cryptography, or say in one line why S/MIME cannot work here."""
    try:
        import cryptography
        from cryptography.hazmat.primitives.serialization import pkcs7  # noqa: F401  (fails here, not later)
    except ImportError as error:
        raise CertTrouble(f"the cryptography package is missing ({error}): pip install "
                          f"'cryptography>={'.'.join(map(str, MIN_CRYPTOGRAPHY))}'") from None
    version = tuple(int(piece) for piece in cryptography.__version__.split(".")[:3] if piece.isdigit())
    if version < MIN_CRYPTOGRAPHY:
        raise CertTrouble(f"cryptography {cryptography.__version__} is too old for S/MIME: "
                          f"{'.'.join(map(str, MIN_CRYPTOGRAPHY))} or newer is needed")


# -- one certificate ------------------------------------------------------------------------

def addresses(cert: Any) -> frozenset[str]:
    """The e-mail addresses a certificate is for (subjectAltName and the subject's
    emailAddress, RFC 8550 3), in lower case."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    found = set()
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        found.update(names.get_values_for_type(x509.RFC822Name))
    except (x509.ExtensionNotFound, ValueError):
        pass
    found.update(str(attribute.value) for attribute in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS))
    return frozenset(address.strip().lower() for address in found)


def fingerprint(cert: Any) -> str:
    from cryptography.hazmat.primitives import hashes

    return cert.fingerprint(hashes.SHA256()).hex().upper()


def describe(cert: Any) -> str:
    """How logs, check and explain name a certificate: subject, addresses, short fingerprint."""
    mails = ", ".join(sorted(addresses(cert)))
    return f"{subject(cert)}{f' <{mails}>' if mails else ''} (SHA-256 {fingerprint(cert)[:16]})"


def subject(cert: Any) -> str:
    """The subject as text; never fails on a strange one (a signer's certificate is the sender's)."""
    try:
        return cert.subject.rfc4514_string() or "(empty subject)"
    except Exception:
        return "(unreadable subject)"


def unusable(cert: Any, *, encrypting: bool, now: datetime | None = None) -> str | None:
    """Why ``cert`` cannot serve now (expired, not yet valid, key type, key usage), or None."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    now = now or datetime.now(timezone.utc)
    if now > cert.not_valid_after_utc:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    if now < cert.not_valid_before_utc:
        return f"not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
    key = cert.public_key()
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        return f"a {type(key).__name__} key: S/MIME here needs RSA or EC"
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and encrypting:
        allowed = usage.key_encipherment if isinstance(key, rsa.RSAPublicKey) else usage.key_agreement
        if not allowed:
            return "its key usage does not allow encryption"
    if usage is not None and not encrypting and not usage.digital_signature:
        return "its key usage does not allow signing"
    return _extended_usage_problem(cert)


def _extended_usage_problem(cert: Any) -> str | None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    try:
        purposes = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if ExtendedKeyUsageOID.EMAIL_PROTECTION in purposes or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in purposes:
        return None
    return "its extended key usage does not include e-mail protection"


# -- files --------------------------------------------------------------------------------

def read_certificates(path: str, what: str) -> list:
    """Every PEM certificate in ``path`` (a certificate, its chain, or a bundle)."""
    from cryptography import x509

    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertTrouble(f"{what} {path} holds no PEM certificate (or a damaged one)") from None


def read_private_key(path: str) -> Any:
    """The private key in ``path`` (PEM, unencrypted); refused if others may read the file."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read(path, "key_file", private=True)
    try:
        return load_pem_private_key(data, password=None)
    except TypeError:
        raise CertTrouble(f"key_file {path} is encrypted: store it without a passphrase, readable by "
                          "root and the mail user only (0600, or 0640 root:mail)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertTrouble(f"key_file {path} holds no PEM private key (or a damaged one)") from None


def _read(path: str, what: str, private: bool = False) -> bytes:
    try:
        with open(path, "rb") as stream:
            if private and os.fstat(stream.fileno()).st_mode & 0o004:
                raise CertTrouble(f"{what} {path} is readable by others: chmod o-r it")
            return stream.read()
    except OSError as error:
        raise CertTrouble(f"cannot read {what} {path}: {error.strerror or error}") from None


def _stamp(path: str) -> tuple:
    """Changes when the file, or any file in the folder, is replaced, changed or removed."""
    try:
        info = os.stat(path)
    except OSError:
        return ()
    if not os.path.isdir(path):
        return (info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size)   # ctime: chmod too
    with os.scandir(path) as entries:
        files = sorted((entry.name, entry.inode(), entry.stat().st_mtime_ns, entry.stat().st_size)
                       for entry in entries if entry.name.endswith(CERTIFICATE_FILES))
    return (info.st_mtime_ns, tuple(files))


_CACHE: dict[tuple, tuple[tuple, Any]] = {}


def cached(key: tuple, paths: tuple[str, ...], load):
    """``load()``, kept until one of ``paths`` changes."""
    stamp = tuple(_stamp(path) for path in paths)
    entry = _CACHE.get(key)
    if entry is not None and entry[0] == stamp:
        return entry[1]
    value = load()
    _CACHE[key] = (stamp, value)
    return value


# -- the gateway's own keys -------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """One key of the gateway, its certificate and the chain that came with it."""
    key: Any
    cert: Any
    chain: tuple
    key_file: str
    cert_file: str

    @property
    def rsa(self) -> bool:
        from cryptography.hazmat.primitives.asymmetric import rsa

        return isinstance(self.key, rsa.RSAPrivateKey)


def identities(key_files: tuple[str, ...], cert_files: tuple[str, ...]) -> list[Identity]:
    """The gateway's keys with their certificates, in the configured order."""
    return cached(("identities", key_files, cert_files), key_files + cert_files,
                  lambda: [identity(key, cert) for key, cert in zip(key_files, cert_files)])


def identity(key_file: str, cert_file: str) -> Identity:
    """One key and the certificate it belongs to; CertTrouble if they do not match."""
    key = read_private_key(key_file)
    cert, *chain = read_certificates(cert_file, "cert_file")
    if cert.public_key() != key.public_key():
        raise CertTrouble(f"key_file {key_file} does not belong to the certificate in {cert_file}")
    return Identity(key, cert, tuple(chain), key_file, cert_file)


# -- the recipients' certificates ----------------------------------------------------------------

class CertificateStore:
    """recipient_certs: a folder of PEM files (``*.pem``, ``*.crt``, ``*.cer``; others are
    left alone), or one PEM bundle, curated by the administrator."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.by_address: dict[str, list] = {}
        self.by_fingerprint: dict[str, Any] = {}
        self.unreadable: list[str] = []
        for cert in self._certificates():
            self.by_fingerprint[fingerprint(cert)] = cert
            for address in addresses(cert):
                self.by_address.setdefault(address, []).append(cert)

    @classmethod
    def load(cls, path: str) -> CertificateStore:
        return cached(("store", path), (path,), lambda: cls(path))

    def _certificates(self) -> list:
        if not os.path.isdir(self.path):
            return read_certificates(self.path, "recipient_certs")
        found = []
        for name in sorted(os.listdir(self.path)):
            full = os.path.join(self.path, name)
            if not name.endswith(CERTIFICATE_FILES) or not os.path.isfile(full):
                continue
            try:
                found += read_certificates(full, "recipient_certs file")
            except CertTrouble as trouble:      # one bad file must not stop everybody's mail
                self.unreadable.append(str(trouble))
        return found

    def for_recipient(self, address: str) -> Any | None:
        """The newest certificate for exactly this address that can encrypt now, or None."""
        usable = [cert for cert in self.by_address.get(address.lower(), ())
                  if unusable(cert, encrypting=True) is None]
        return max(usable, key=lambda cert: cert.not_valid_before_utc) if usable else None

    def problems(self) -> list[str]:
        found = list(self.unreadable)
        if not self.by_fingerprint:
            found.append(f"recipient_certs {self.path} holds no certificate")
        for cert in self.by_fingerprint.values():
            reason = unusable(cert, encrypting=True)
            if reason:
                found.append(f"recipient_certs: {describe(cert)} cannot be used: {reason}")
        return found
