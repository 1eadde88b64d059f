"""A private certificate authority with S/MIME keys and certificates, made by openssl, for
the smime tests and bench/smime.py.

Made once per test session in a temporary folder (RSA 2048 and EC P-256: fast to make):
a CA the gateways trust and a stranger's CA they do not, two gateways, recipients with
keys of their own, an outsider, and a certificate that has expired.  Private keys are
0600, as an administrator keeps them.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

EXTENSIONS = ("keyUsage = critical, digitalSignature, keyEncipherment\n"
              "extendedKeyUsage = emailProtection\nsubjectAltName = {names}\n")
EC_EXTENSIONS = EXTENSIONS.replace("keyEncipherment", "keyAgreement")


def openssl(*args: str, data: bytes = b"", check: bool = True) -> subprocess.CompletedProcess:
    """Plain openssl, as a person would run it (not through the project)."""
    process = subprocess.run(["openssl", *map(str, args)], input=data, capture_output=True, timeout=60)
    if check and process.returncode != 0:
        raise AssertionError(f"openssl {' '.join(map(str, args))} failed: {process.stderr.decode(errors='replace')}")
    return process


@dataclass(frozen=True)
class Holder:
    """Somebody's key and certificate, as files."""
    key: Path
    cert: Path
    address: str

    def decrypt(self, data: bytes, *, inform: str = "SMIME") -> subprocess.CompletedProcess:
        return openssl("cms", "-decrypt", "-inform", inform, "-binary", "-recip", self.cert, "-inkey", self.key,
                       data=data, check=False)

    def sign(self, content: bytes, *, detached: bool = True) -> bytes:
        """An S/MIME message as ``openssl cms -sign`` writes it (multipart/signed or opaque)."""
        return openssl("cms", "-sign", "-signer", self.cert, "-inkey", self.key,
                       *([] if detached else ["-nodetach"]), data=content).stdout


class Pki:
    """The CAs, gateways and people of the smime tests."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="ig-smime-"))
        self.ca = self._authority("ca", "Test CA")
        self.stranger_ca = self._authority("stranger-ca", "Stranger CA")
        self.gateway_a = self.person("gw-a", "gw@a.example")
        self.gateway_b = self.person("gw-b", "gw@b.example")
        self.gateway_b_ec = self.person("gw-b-ec", "gw@b.example", ec=True)
        self.alice = self.person("alice", "alice@b.example", also=("alice.smith@b.example",))
        self.bob = self.person("bob", "bob@b.example", ec=True)
        self.outsider = self.person("outsider", "out@c.example", issuer=self.stranger_ca)
        self.expired = self.person("expired", "old@b.example", dates=("20200101000000Z", "20210101000000Z"))
        self.trust_store = self.ca.cert

    def _authority(self, name: str, subject: str) -> Holder:
        key, cert = self.folder / f"{name}.key", self.folder / f"{name}.pem"
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "30",
                "-subj", f"/CN={subject}", "-addext", "basicConstraints=critical,CA:true",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        return Holder(key, cert, "")

    def person(self, name: str, address: str, *, ec: bool = False, also: tuple[str, ...] = (),
               issuer: Holder | None = None, dates: tuple[str, str] | None = None) -> Holder:
        issuer = issuer or self.ca
        key, request, cert = (self.folder / f"{name}{suffix}" for suffix in (".key", ".csr", ".pem"))
        kind = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] if ec else ["-newkey", "rsa:2048"]
        openssl("req", "-new", *kind, "-nodes", "-keyout", key, "-out", request,
                "-subj", f"/CN={name}/emailAddress={address}")
        key.chmod(0o600)
        extensions = self.folder / f"{name}.ext"
        names = ", ".join(f"email:{a}" for a in (address, *also))
        extensions.write_text((EC_EXTENSIONS if ec else EXTENSIONS).format(names=names))
        if dates:
            self._sign_with_dates(issuer, request, cert, extensions, dates)
        else:
            openssl("x509", "-req", "-in", request, "-CA", issuer.cert, "-CAkey", issuer.key, "-CAcreateserial",
                    "-out", cert, "-days", "30", "-extfile", extensions)
        return Holder(key, cert, address)

    def _sign_with_dates(self, issuer: Holder, request: Path, cert: Path, extensions: Path,
                         dates: tuple[str, str]) -> None:
        """``openssl ca``: the one openssl command that sets both validity dates."""
        home = self.folder / "ca-db"
        (home / "new").mkdir(parents=True, exist_ok=True)
        (home / "index.txt").write_text("")
        (home / "serial").write_text("1000\n")
        config = home / "ca.cnf"
        config.write_text(f"[ca]\ndefault_ca = here\n[here]\ndatabase = {home}/index.txt\n"
                          f"new_certs_dir = {home}/new\nserial = {home}/serial\ndefault_md = sha256\n"
                          "policy = anything\nunique_subject = no\n[anything]\ncommonName = supplied\n"
                          "emailAddress = optional\n")
        openssl("ca", "-batch", "-config", config, "-cert", issuer.cert, "-keyfile", issuer.key, "-in", request,
                "-out", cert, "-startdate", dates[0], "-enddate", dates[1], "-extfile", extensions, "-notext")

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@functools.cache
def pki() -> Pki:
    """The one Pki of this test session (removed when the session ends)."""
    made = Pki()
    atexit.register(made.close)
    return made


def smime_message(body: bytes, head: bytes = b"From: someone@c.example\nTo: gw@b.example\nSubject: s/mime\n") -> bytes:
    """A mail message around what ``openssl cms`` wrote (its header and body), with LF line ends."""
    return head + body.replace(b"\r\n", b"\n")
