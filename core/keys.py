"""The private keys the gateway signs with: read only when they are private, told apart
(RSA or Ed25519) and checked without a crypto library, and their public half as a DKIM key
record publishes it (RFC 6376 3.6.1, RFC 8463 4).

A key file holds a PEM key as openssl writes it (PKCS#1 ``RSA PRIVATE KEY``, PKCS#8
``PRIVATE KEY`` for RSA or Ed25519) or, for Ed25519, the base64 seed dkimpy's ``dknewkey``
writes.  The DER is read here with a small reader (linear in the file, each length checked
against what is left) so a rule file is checked without importing a crypto library.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import re
import stat
from typing import NamedTuple

from ispmailgate_filters.base import ConfigError

RSA_OID = bytes.fromhex("2a864886f70d010101")       # 1.2.840.113549.1.1.1 rsaEncryption
ED25519_OID = bytes.fromhex("2b6570")               # 1.3.101.112 id-Ed25519
SEQUENCE, INTEGER, BIT_STRING, OCTET_STRING, NULL, OID = 0x30, 0x02, 0x03, 0x04, 0x05, 0x06
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.S)


class PrivateKey(NamedTuple):
    """A signing key: its kind, the form dkimpy signs with, and what its public half needs."""
    kind: str           # "rsa" | "ed25519"
    secret: bytes       # RSA: a PKCS#1 PEM; Ed25519: the base64 seed (dkimpy's forms)
    bits: int           # the RSA modulus size; 256 for Ed25519
    public_der: bytes   # RSA: the SubjectPublicKeyInfo; Ed25519: b"" (needs PyNaCl: public_key)


def read_private_file(path: str, where: str) -> bytes:
    """The bytes of a private key file: refused if others may read it, and as root if
    anyone but root could change it or a directory above it.

    Opened without following a last symbolic link and without blocking, and refused unless
    it is a regular file, before anything is read: whoever may change the key's directory
    could otherwise put a FIFO there, and every run (as root, before its time limit) would
    wait in open() for ever."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        why = "a symbolic link: give the key file's own path" if error.errno == errno.ELOOP else error.strerror
        raise ConfigError(where, f"cannot read {path}: {why}") from None
    try:
        with open(descriptor, "rb", closefd=True) as stream:
            info = os.fstat(stream.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError(where, f"{path} is not a regular file")
            if info.st_mode & 0o004:
                raise ConfigError(where, f"{path} is readable by others (chmod o-r {path})")
            if os.geteuid() == 0:       # a secret root reads: only root may change it
                from ispmailgate_filters.files import untrusted

                reason = untrusted(path, info)
                if reason:
                    raise ConfigError(where, f"{reason}: refused as root")
            return stream.read(1 << 16)         # a key is a few KB: more is not a key file
    except OSError as error:
        raise ConfigError(where, f"cannot read {path}: {error.strerror}") from None


def parse_private_key(data: bytes) -> PrivateKey:
    """An RSA or Ed25519 private key from a key file's bytes; ValueError says what is wrong."""
    match = _PEM.search(data)
    if match is None:
        return _ed25519(_seed_file(data))
    label, body = match.group(1).decode(), match.group(2)
    if "ENCRYPTED" in label or b"ENCRYPTED" in body:
        raise ValueError("the key is encrypted: give it unencrypted (openssl pkey -in KEY -out PLAIN)")
    try:
        der = base64.b64decode(b"".join(body.split()), validate=True)
    except binascii.Error:
        raise ValueError(f"the {label} block is not base64") from None
    if label == "RSA PRIVATE KEY":
        return _rsa(der)
    if label == "PRIVATE KEY":
        return _pkcs8(der)
    raise ValueError(f"a {label}: expected an RSA or Ed25519 private key (PEM, PKCS#1 or PKCS#8)")


def _seed_file(data: bytes) -> bytes:
    """dknewkey's Ed25519 key file: the 32-byte seed in base64 on one line."""
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except binascii.Error:
        seed = b""
    if len(seed) != 32:
        raise ValueError("no PEM private key, nor an Ed25519 seed in base64")
    return seed


def _pkcs8(der: bytes) -> PrivateKey:
    """PKCS#8 PrivateKeyInfo: version, algorithm, the key in an OCTET STRING."""
    fields = _elements(_single(der, SEQUENCE))
    if len(fields) < 3 or fields[1][0] != SEQUENCE or fields[2][0] != OCTET_STRING:
        raise ValueError("not a PKCS#8 private key")
    algorithm = _elements(fields[1][1])
    oid = algorithm[0][1] if algorithm and algorithm[0][0] == OID else b""
    if oid == RSA_OID:
        return _rsa(fields[2][1])
    if oid == ED25519_OID:
        return _ed25519(_single(fields[2][1], OCTET_STRING))
    raise ValueError("neither an RSA nor an Ed25519 key (an EC key? DKIM signs with RSA or Ed25519)")


def _rsa(der: bytes) -> PrivateKey:
    """PKCS#1 RSAPrivateKey: version, modulus, public exponent, then the private parts."""
    fields = _elements(_single(der, SEQUENCE))
    if len(fields) < 9 or any(tag != INTEGER for tag, _ in fields[:9]):
        raise ValueError("not an RSA private key")
    modulus, exponent = fields[1][1], fields[2][1]
    public = _encode(SEQUENCE, _encode(INTEGER, modulus) + _encode(INTEGER, exponent))
    spki = _encode(SEQUENCE, _encode(SEQUENCE, _encode(OID, RSA_OID) + _encode(NULL, b""))
                   + _encode(BIT_STRING, b"\x00" + public))
    pem = base64.encodebytes(der).replace(b"\n", b"")
    lines = b"\n".join(pem[i:i + 64] for i in range(0, len(pem), 64))
    secret = b"-----BEGIN RSA PRIVATE KEY-----\n" + lines + b"\n-----END RSA PRIVATE KEY-----\n"
    return PrivateKey("rsa", secret, int.from_bytes(modulus, "big").bit_length(), spki)


def _ed25519(seed: bytes) -> PrivateKey:
    if len(seed) != 32:
        raise ValueError("an Ed25519 key of the wrong size")
    return PrivateKey("ed25519", base64.b64encode(seed), 256, b"")


def public_key(key: PrivateKey) -> bytes:
    """The ``p=`` of the key's DNS record, decoded: RSA a SubjectPublicKeyInfo, Ed25519 the
    raw 32 bytes (RFC 8463 4.2); Ed25519 needs PyNaCl."""
    if key.kind == "rsa":
        return key.public_der
    import nacl.signing

    return bytes(nacl.signing.SigningKey(base64.b64decode(key.secret)).verify_key)


def publishes(key: PrivateKey, published: bytes) -> bool:
    """Is ``published`` (a record's p=, decoded) this key's public half?  For RSA either form
    counts: the SubjectPublicKeyInfo everybody publishes, or the bare RSAPublicKey inside it
    (RFC 6376 3.6.1 names that one)."""
    own = public_key(key)
    if published == own:
        return True
    return key.kind == "rsa" and published == _elements(_single(own, SEQUENCE))[1][1][1:]


def key_record(key: PrivateKey) -> str:
    """The TXT record that publishes the key: ``v=DKIM1; k=...; p=...``."""
    return f"v=DKIM1; k={key.kind}; p={base64.b64encode(public_key(key)).decode()}"


def _elements(data: bytes) -> list[tuple[int, bytes]]:
    """The DER elements one after another in ``data``: (tag, contents) each."""
    elements, position = [], 0
    while position < len(data):
        tag, contents, position = _element(data, position)
        elements.append((tag, contents))
    return elements


def _single(data: bytes, tag: int) -> bytes:
    """The contents of ``data``, which must be one element with ``tag`` (and nothing after)."""
    found, contents, end = _element(data, 0)
    if found != tag or end != len(data):
        raise ValueError("not a DER key")
    return contents


def _element(data: bytes, position: int) -> tuple[int, bytes, int]:
    """One DER element at ``position``: (tag, contents, the position after it)."""
    if position + 2 > len(data):
        raise ValueError("a truncated DER key")
    tag, length = data[position], data[position + 1]
    position += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 3 or position + count > len(data):
            raise ValueError("a DER length out of range")
        length, position = int.from_bytes(data[position:position + count], "big"), position + count
    if position + length > len(data):
        raise ValueError("a truncated DER key")
    return tag, data[position:position + length], position + length


def _encode(tag: int, contents: bytes) -> bytes:
    size = len(contents)
    if size < 0x80:
        return bytes((tag, size)) + contents
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + contents
