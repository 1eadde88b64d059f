"""What ``ispmailgate check`` and ``explain`` say about an smime step.

check: keys and certificates that are missing, unreadable, readable by others, expired,
or do not belong together; a recipient certificate store or trust store that does not
load; an openssl that is not there.  explain: which certificate a group of recipients
is encrypted to.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Hashable
from typing import Protocol

from .credentials import (CertificateStore, CertTrouble, describe, identity, read_certificates,
                          require_library, unusable)


class Options(Protocol):
    """What check and explain read of an smime step (the step itself: a Smime, which
    imports this module when asked, so this module does not import it back)."""
    key_file: tuple
    cert_file: tuple
    sign: bool
    recipient_cert: str
    recipient_certs: str
    per_recipient: bool
    on_missing_cert: str
    trust_store: str
    openssl_binary: str

    @property
    def encrypts(self) -> bool: ...


def problems(smime: Options) -> list[str]:
    try:
        require_library()
    except CertTrouble as trouble:
        return [str(trouble)]
    found = _key_problems(smime)
    for check in (_recipient_problems, _trust_store_problems, _openssl_problems):
        try:
            found += check(smime)
        except CertTrouble as trouble:
            found.append(str(trouble))
    return found


def _key_problems(smime: Options) -> list[str]:
    found = []
    for number, (key_file, cert_file) in enumerate(zip(smime.key_file, smime.cert_file)):
        try:
            cert = identity(key_file, cert_file).cert
        except CertTrouble as trouble:
            found.append(str(trouble))
            continue
        # Only the first certificate is the gateway's current one: the others may well have
        # expired, kept to decrypt mail that was encrypted to them.
        reason = unusable(cert, encrypting=False) if smime.sign else _expired(cert)
        if number == 0 and reason:
            found.append(f"cert_file {cert_file}: {describe(cert)} cannot be used: {reason}")
    return found


def _expired(cert) -> str | None:
    reason = unusable(cert, encrypting=True)
    return reason if reason and reason.startswith(("expired", "not valid")) else None


def _recipient_problems(smime: Options) -> list[str]:
    if smime.recipient_cert:
        cert = read_certificates(smime.recipient_cert, "recipient_cert")[0]
        reason = unusable(cert, encrypting=True)
        return [f"recipient_cert {smime.recipient_cert}: {describe(cert)} cannot be used: {reason}"] if reason else []
    if smime.per_recipient:
        if not os.path.exists(smime.recipient_certs):
            return [f"recipient_certs {smime.recipient_certs} does not exist"]
        return CertificateStore.load(smime.recipient_certs).problems()
    return []


def _trust_store_problems(smime: Options) -> list[str]:
    if not smime.trust_store:
        return []
    read_certificates(smime.trust_store, "trust_store")
    return []


def _openssl_problems(smime: Options) -> list[str]:
    program = smime.openssl_binary
    found = program if "/" in program else shutil.which(program)
    if found and os.path.isfile(found) and os.access(found, os.X_OK):
        return []
    return [f"openssl ({program}) not found: it verifies every signature, and does GCM and EC keys"]


def explain(smime: Options, variant: Hashable) -> str:
    """Which certificate the recipients sharing ``variant`` are encrypted to."""
    if not smime.encrypts:
        return ""
    try:
        require_library()
        if smime.recipient_cert:
            return "encrypted to " + describe(read_certificates(smime.recipient_cert, "recipient_cert")[0])
        if variant == "no certificate":
            return f"no certificate: on_missing_cert = {smime.on_missing_cert}"
        cert = CertificateStore.load(smime.recipient_certs).by_fingerprint.get(variant)
    except CertTrouble as trouble:
        return f"cannot read the certificates: {trouble}"
    return "encrypted to " + describe(cert) if cert is not None else ""
