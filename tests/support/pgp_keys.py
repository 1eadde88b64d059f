"""Throwaway GnuPG homes with real keys, for the pgp tests and bench/pgp.py.

What REAL-PARTS.md measured: homes under /tmp (gpg-agent's socket path must stay under
107 bytes), an agent that caches nothing and derives passphrase keys fast, fast
ed25519/cv25519 keys, loopback pinentry, and ``gpgconf --kill all`` before removal.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

AGENT_CONF = "default-cache-ttl 0\nmax-cache-ttl 0\ns2k-count 65536\nallow-loopback-pinentry\n"


class GpgHome:
    """A GnuPG home of its own: generate, import, export, encrypt and decrypt with plain gpg."""

    def __init__(self, label: str) -> None:
        self.path = tempfile.mkdtemp(dir="/tmp", prefix=f"ig-{label[:6]}-")
        with open(os.path.join(self.path, "gpg-agent.conf"), "w") as conf:
            conf.write(AGENT_CONF)

    def __str__(self) -> str:
        return self.path

    def gpg(self, *args: str, data: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Plain gpg in this home, as a person would run it (not through the project)."""
        environment = {**os.environ, "GNUPGHOME": self.path, "LC_ALL": "C"}
        process = subprocess.run(["gpg", "--batch", "--yes", "--pinentry-mode", "loopback", *args],
                                 input=data or b"", capture_output=True, env=environment, timeout=60)
        if check and process.returncode != 0:
            raise AssertionError(f"gpg {' '.join(args)} failed: {process.stderr.decode(errors='replace')}")
        return process

    def generate(self, uid: str, passphrase: str = "") -> str:
        """A new ed25519/cv25519 key; returns its fingerprint."""
        self.gpg("--passphrase", passphrase, "--quick-gen-key", uid, "future-default", "default", "never")
        return self.fingerprint(uid)

    def fingerprint(self, selector: str, *, secret: bool = False) -> str:
        listing = self.gpg("--with-colons", "--list-secret-keys" if secret else "--list-keys", selector)
        return next(line.split(":")[9] for line in listing.stdout.decode().splitlines() if line.startswith("fpr:"))

    def export(self, selector: str) -> bytes:
        return self.gpg("--armor", "--export", selector).stdout

    def export_secret(self, selector: str, passphrase: str = "") -> bytes:
        return self.gpg("--passphrase", passphrase, "--armor", "--export-secret-keys", selector).stdout

    def import_keys(self, data: bytes, *, trust: bool = False) -> None:
        self.gpg("--import", data=data)
        if trust:
            for fingerprint in self._fingerprints(data):
                self.gpg("--import-ownertrust", data=f"{fingerprint}:6:\n".encode())

    def _fingerprints(self, data: bytes) -> list[str]:
        shown = self.gpg("--with-colons", "--import-options", "show-only", "--import", data=data)
        lines = shown.stdout.decode().splitlines()
        return [line.split(":")[9] for i, line in enumerate(lines)
                if line.startswith("fpr:") and i and lines[i - 1].startswith(("pub:", "sec:"))]

    def encrypt(self, data: bytes, *recipients: str, sign: str = "", passphrase: str = "",
                hidden: bool = False, armor: bool = True) -> bytes:
        """Armored, as ``gpg --encrypt --armor`` makes it (``hidden``: with -R, no key ids)."""
        args = ["--trust-model", "always", *(["--armor"] if armor else []), "--encrypt"]
        for recipient in recipients:
            args += ["--hidden-recipient" if hidden else "--recipient", recipient]
        if sign:
            args += ["--sign", "--local-user", sign, "--passphrase", passphrase]
        return self.gpg(*args, data=data).stdout

    def decrypt(self, data: bytes, passphrase: str = "") -> subprocess.CompletedProcess:
        return self.gpg("--passphrase", passphrase, "--decrypt", data=data, check=False)

    def close(self) -> None:
        subprocess.run(["gpgconf", "--kill", "all"], env={**os.environ, "GNUPGHOME": self.path},
                       capture_output=True, timeout=30, check=False)
        shutil.rmtree(self.path, ignore_errors=True)


class World:
    """Two gateways, two recipients with keys of their own, and an outsider.

    ``sending`` holds gateway A's secret key (no passphrase) and the public keys of
    gateway B, alice and bob; ``receiving`` holds gateway B's secret key (protected by a
    non-ASCII passphrase) and gateway A's public key; ``alice``, ``bob`` and ``outsider``
    hold their own secret keys (bob's protected) and the gateways' public keys.  Alice's
    key carries two addresses (alice@ and alice.smith@), so two recipients share it.
    """

    A_UID, B_UID = "Gateway A <gw@a.example>", "Gateway B <gw@b.example>"
    B_PASSPHRASE = "pass-B ü 'quoted' \"too\""
    BOB_PASSPHRASE = "bob's secret"

    def __init__(self) -> None:
        self.homes: list[GpgHome] = []
        self.sending, self.receiving = self.home("sendgw"), self.home("recvgw")
        self.alice, self.bob, self.outsider = self.home("alice"), self.home("bob"), self.home("outsd")
        self.a = self.sending.generate(self.A_UID)
        self.b = self.receiving.generate(self.B_UID, self.B_PASSPHRASE)
        self.alice_key = self.alice.generate("Alice <alice@b.example>")
        self.alice.gpg("--quick-add-uid", self.alice_key, "Alice Smith <alice.smith@b.example>")
        self.bob_key = self.bob.generate("Bob <bob@b.example>", self.BOB_PASSPHRASE)
        self.outsider_key = self.outsider.generate("Outsider <out@c.example>")
        for home, key in ((self.receiving, self.b), (self.alice, self.alice_key), (self.bob, self.bob_key)):
            self.sending.import_keys(home.export(key))
        self.receiving.import_keys(self.sending.export(self.a))
        for home in (self.alice, self.bob, self.outsider):
            home.import_keys(self.receiving.export(self.b))
            home.import_keys(self.sending.export(self.a))

    def home(self, label: str) -> GpgHome:
        home = GpgHome(label)
        self.homes.append(home)
        return home

    def close(self) -> None:
        for home in self.homes:
            home.close()
