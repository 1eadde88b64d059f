"""The pgp filter's key ring: one GnuPG home, reached through python-gnupg.

python-gnupg is imported on first use, never when this module is imported.  Every gpg
call names the home on its command line and in its environment, so ~/.gnupg is never
read or written; runs with ``--pinentry-mode loopback``, so a missing passphrase fails at
once instead of waiting for a pinentry; gets passphrases on a pipe (``--passphrase-fd
0``), never in argv; and is killed after ``timeout`` seconds.

Failures come in two kinds: :class:`GpgTrouble` is the gateway's own set-up (gpg, the
home, the agent, keys, passphrases) and the mail should wait for it to be fixed;
:class:`Undecryptable` is the data (no secret key for it, corrupt, too large).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

_AGENT_TROUBLE = re.compile(r"can't connect to the agent|no agent running|failed to start agent|"
                            r"problem with the agent|agent_genkey failed", re.I)
# NEED_PASSPHRASE alone is no failure: gpg says it before every use of a protected key.
_PASSPHRASE_TROUBLE = re.compile(r"bad passphrase|^\[GNUPG:\] (?:MISSING|BAD)_PASSPHRASE|can't get input",
                                 re.I | re.M)
_TOO_LARGE = "exceeded --max-output limit"
_STATUS = re.compile(r"^\[GNUPG:\] (GOODSIG|BADSIG|EXPSIG|EXPKEYSIG|REVKEYSIG|ERRSIG)\b ?(.*)$", re.M)
_HEX = re.compile(r"(?:0x)?([0-9A-Fa-f ]{8,})\Z")
_ADDRESS = re.compile(r"<([^<>\s]+@[^<>\s]+)>|^([^<>\s]+@[^<>\s]+)$")
# OpenPGP hash algorithm numbers (RFC 4880 9.4) -> RFC 3156 micalg names
MICALG = {"1": "pgp-md5", "2": "pgp-sha1", "3": "pgp-ripemd160", "8": "pgp-sha256",
          "9": "pgp-sha384", "10": "pgp-sha512", "11": "pgp-sha224"}
SIGNATURE_STATES = {"GOODSIG": "good", "BADSIG": "bad", "EXPSIG": "expired-signature",
                    "EXPKEYSIG": "expired-key", "REVKEYSIG": "revoked-key"}


class GpgTrouble(Exception):
    """The gateway's set-up failed (gpg, home, agent, keys, passphrases): retry later."""

    def __init__(self, reason: str, status: str = "4.3.5") -> None:
        super().__init__(reason)
        self.status = status


class Undecryptable(Exception):
    """The data cannot be decrypted here: no secret key for it, corrupt, or too large."""


class TooLarge(Undecryptable):
    """The plaintext would be larger than the limit the call was given (gpg stopped there)."""


class NoSecretKey(Undecryptable):
    """Encrypted only to keys whose secret half this key ring does not hold."""


@dataclass(frozen=True)
class Signature:
    """One signature as gpg judged it; ``state`` good, bad, unknown-key, expired-*, revoked-key, error."""
    state: str
    key_id: str = ""
    signer: str = ""
    note: str = ""

    def describe(self) -> str:
        words = [self.state]
        if self.key_id:
            words.append(f"key={self.key_id}")
        for name in ("signer", "note"):
            if getattr(self, name):
                words.append('%s="%s"' % (name, getattr(self, name).replace('"', "'")))
        return "; ".join(words)


@dataclass(frozen=True)
class Key:
    """A key in the ring, with what lets a selector (id, fingerprint, user id, address) find it."""
    fingerprint: str
    uids: tuple[str, ...]
    ids: frozenset[str]             # key id, fingerprint and those of its subkeys, upper case
    created: int
    encrypts: bool                  # usable for encryption now (not revoked, expired, disabled)
    valid: bool                     # full or ultimate validity (what gpg's web of trust says)

    @property
    def addresses(self) -> set[str]:
        found = set()
        for uid in self.uids:
            match = _ADDRESS.search(uid)
            if match:
                found.add((match.group(1) or match.group(2)).lower())
        return found

    def matches(self, selector: str) -> bool:
        """Key id (8 or 16 hex digits) or fingerprint, else a whole user id or its address."""
        wanted = selector.strip()
        hexa = _HEX.match(wanted)
        if hexa and len(digits := hexa.group(1).replace(" ", "").upper()) in (8, 16, 40):
            return any(i.endswith(digits) for i in self.ids)
        wanted = wanted.lower()
        return wanted in self.addresses or any(uid.lower() == wanted for uid in self.uids)


@dataclass
class Keyring:
    """One GnuPG home, its keys and the passphrases for its secret keys."""
    home: str
    binary: str = "gpg"
    timeout: float = 60.0
    always_trust: bool = True
    passphrase_source: Callable[[], Mapping[str, str]] = field(default=dict, repr=False)

    @cached_property
    def passphrases(self) -> Mapping[str, str]:
        """Read once per key ring object, when a passphrase is first needed."""
        return self.passphrase_source()

    # -- keys ---------------------------------------------------------------------------

    def public_keys(self) -> list[Key]:
        return self._listing(secret=False)

    def secret_keys(self) -> list[Key]:
        return self._listing(secret=True)

    def find(self, selector: str, *, secret: bool = False) -> list[Key]:
        """The keys gpg itself finds for ``selector``, as ``-r`` and ``--default-key`` will."""
        return [_key(entry) for entry in self._call("list_keys", secret=secret, keys=[selector])]

    def recipient_key(self, address: str) -> str | None:
        """The fingerprint of the newest usable key with exactly this address, None if none."""
        address = address.lower()
        usable = [key for key in self.public_keys() if address in key.addresses and key.encrypts
                  and (self.always_trust or key.valid)]
        return max(usable, key=lambda k: k.created).fingerprint if usable else None

    def _listing(self, secret: bool) -> list[Key]:
        stamp = _stamp(self.home)
        cached = _LISTINGS.get((self.home, secret))
        if cached and cached[0] == stamp:
            return cached[1]
        listing = self._call("list_keys", secret=secret)
        keys = [_key(entry) for entry in listing]
        _LISTINGS[(self.home, secret)] = (stamp, keys)
        return keys

    # -- operations ---------------------------------------------------------------------

    def encrypt(self, data: bytes, recipients: list[str], *, sign: bool = False,
                sign_uid: str = "") -> bytes:
        """Armored OpenPGP data for ``recipients``, signed by the gateway if asked."""
        passphrase = self._signing_passphrase(sign_uid) if sign else None
        result = self._call("encrypt", data, recipients, armor=True, always_trust=self.always_trust,
                            sign=(sign_uid or True) if sign else None, passphrase=passphrase)
        if not result.ok:
            self._raise_set_up_trouble(result, f"cannot encrypt to {', '.join(recipients)}")
        return bytes(result.data)

    def sign_detached(self, data: bytes, sign_uid: str = "") -> tuple[bytes, str]:
        """A detached armored signature of ``data`` and its RFC 3156 micalg."""
        passphrase = self._signing_passphrase(sign_uid)
        result = self._call("sign", data, keyid=sign_uid or None, detach=True, passphrase=passphrase)
        if not result:
            self._raise_set_up_trouble(result, "cannot sign")
        return bytes(result.data), MICALG.get(str(result.hash_algo), "pgp-sha256")

    def decrypt(self, data: bytes, max_size: int) -> tuple[bytes, list[Signature]]:
        """The plaintext and the signatures found inside; raises Undecryptable or GpgTrouble."""
        wrong = ""
        for passphrase in self._decryption_passphrases(data):
            result = self._call("decrypt", data, passphrase=passphrase,
                                extra_args=["--max-output", str(max_size)])
            stderr = getattr(result, "stderr", "")
            if _TOO_LARGE in stderr:
                raise TooLarge(f"decrypted data larger than {max_size} bytes")
            if result.ok:
                return bytes(result.data), signatures(stderr)
            _raise_agent_trouble(result)
            if _PASSPHRASE_TROUBLE.search(stderr):
                wrong = f"wrong or missing passphrase for key {result.key_id or '?'}"
                continue
            if result.status == "no secret key":
                raise NoSecretKey(f"no secret key for {result.key_id or 'the recipients'} in this key ring")
            raise Undecryptable(result.status or "gpg could not decrypt the data")
        raise GpgTrouble(wrong, "4.7.5")

    def verify(self, data: bytes, signature: bytes | None, scratch: str) -> list[Signature]:
        """Check a detached ``signature`` of ``data`` (or a clearsigned ``data``)."""
        if signature is None:
            result = self._call("verify", data)
        else:
            import tempfile

            descriptor, path = tempfile.mkstemp(suffix=".asc", dir=scratch)
            with os.fdopen(descriptor, "wb") as out:
                out.write(signature)
            try:
                result = self._call("verify_data", path, data)
            finally:
                os.unlink(path)
        return signatures(getattr(result, "stderr", "")) or [Signature("error", note="no signature found")]

    # -- passphrases --------------------------------------------------------------------

    def _passphrase_for(self, key: Key) -> str | None:
        for selector, passphrase in self.passphrases.items():
            if key.matches(selector):
                return _for_pipe(passphrase)
        return None

    def _signing_passphrase(self, sign_uid: str) -> str | None:
        keys = self.find(sign_uid, secret=True) if sign_uid else self.secret_keys()[:1]
        if not keys:
            raise GpgTrouble(f"no secret key {sign_uid or '(none at all)'} to sign with in {self.home}")
        return self._passphrase_for(keys[0])

    def _decryption_passphrases(self, data: bytes) -> list[str | None]:
        """Passphrases worth trying, most likely first; None (no passphrase) last."""
        distinct = set(self.passphrases.values())
        if len(distinct) <= 1:          # the usual single gateway key: nothing to choose
            return [_for_pipe(p) for p in distinct] + [None]
        # The session key packets come first: gpg need not read a large message to name them.
        wanted = {i.upper() for i in self._call("get_recipients", data[:65536])}
        hidden = not wanted or any(set(i) == {"0"} for i in wanted)
        candidates = [self._passphrase_for(key) for key in self.secret_keys()
                      if hidden or key.ids & wanted]
        return list(dict.fromkeys(p for p in candidates if p is not None)) + [None]

    # -- running gpg --------------------------------------------------------------------

    def _call(self, operation: str, *args, **kwargs):
        gpg = _instance(self.binary, self.home, self.timeout)
        try:
            result = getattr(gpg, operation)(*args, **kwargs)
        except (OSError, ValueError) as error:
            raise GpgTrouble(f"gpg {operation} failed: {error}") from None
        if getattr(result, "timed_out", False):
            raise GpgTrouble(f"gpg {operation} took longer than {self.timeout:.0f} s", "4.4.7")
        return result

    def _raise_set_up_trouble(self, result, what: str) -> None:
        _raise_agent_trouble(result)
        stderr = getattr(result, "stderr", "")
        detail = "wrong or missing passphrase" if _PASSPHRASE_TROUBLE.search(stderr) else \
            (result.status or _last_error(stderr))
        raise GpgTrouble(f"{what}: {detail}")


def signatures(stderr: str) -> list[Signature]:
    """The signatures in gpg's status lines (GOODSIG, BADSIG, ERRSIG ...), in order."""
    found = []
    for keyword, rest in _STATUS.findall(stderr):
        words = rest.split(" ", 1)
        if keyword == "ERRSIG":         # key id, algorithms, class, time, reason: 9 = no public key
            fields = rest.split()
            missing = len(fields) > 5 and fields[5] == "9"
            found.append(Signature("unknown-key" if missing else "error", words[0]))
        else:
            signer = _unescape(words[1]) if len(words) > 1 else ""
            found.append(Signature(SIGNATURE_STATES[keyword], words[0], signer))
    return found


def _raise_agent_trouble(result) -> None:
    stderr = getattr(result, "stderr", "")
    if _AGENT_TROUBLE.search(stderr):
        raise GpgTrouble(f"gpg-agent trouble: {_last_error(stderr, _AGENT_TROUBLE)}", "4.3.0")


def _last_error(stderr: str, pattern: re.Pattern | None = None) -> str:
    lines = [line[5:] for line in stderr.splitlines() if line.startswith("gpg: ")
             and (pattern is None or pattern.search(line))]
    return lines[-1] if lines else "gpg failed"


def _for_pipe(passphrase: str) -> str:
    # python-gnupg writes the passphrase encoded as Latin-1; this hands gpg its UTF-8 bytes.
    return passphrase.encode("utf-8").decode("latin-1")


def _unescape(text: str) -> str:
    """gpg's listings are UTF-8 (python-gnupg reads them as Latin-1) with \\xNN and %XX escapes."""
    text = re.sub(r"\\x([0-9a-fA-F]{2})|%([0-9A-F]{2})",
                  lambda m: chr(int(m.group(1) or m.group(2), 16)), text)
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _key(entry: dict) -> Key:
    ids = {entry["keyid"].upper(), entry["fingerprint"].upper()}
    for subkey in entry.get("subkeys", []):
        ids.update(value.upper() for value in subkey[:3:2] if value)
    capabilities = entry.get("cap", "")
    validity = entry.get("trust", "")
    return Key(entry["fingerprint"].upper(), tuple(_unescape(uid) for uid in entry.get("uids", [])),
               frozenset(ids), int(entry.get("date") or 0),
               "E" in capabilities and "D" not in capabilities and validity not in ("r", "e", "i", "d", "n"),
               validity in ("f", "u"))


# -- one python-gnupg object per (gpg, home), created on first use ----------------------

_INSTANCES: dict[tuple[str, str, float], object] = {}
_LISTINGS: dict[tuple[str, bool], tuple[tuple, list[Key]]] = {}


def _stamp(home: str) -> tuple:
    """Changes whenever keys are imported, deleted or re-trusted."""
    names = ("pubring.kbx", "pubring.gpg", "trustdb.gpg", "private-keys-v1.d")
    stamps = []
    for name in names:
        try:
            stamps.append(os.stat(os.path.join(home, name)).st_mtime_ns)
        except OSError:
            stamps.append(None)
    return tuple(stamps)


def _instance(binary: str, home: str, timeout: float):
    key = (binary, home, timeout)
    gpg = _INSTANCES.get(key)
    if gpg is None:
        if not os.path.isdir(home):
            raise GpgTrouble(f"gnupghome {home} does not exist or is not a directory")
        environment = {"GNUPGHOME": home, "HOME": home, "LC_ALL": "C", "LANGUAGE": "C",
                       "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")}
        try:
            gpg = _timed_class()(gpgbinary=binary, gnupghome=home, env=environment, options=[
                "--pinentry-mode", "loopback", "--no-auto-key-retrieve", "--auto-key-locate", "local",
                "--no-permission-warning"])
        except OSError:
            raise GpgTrouble(f"cannot run gpg ({binary}): is GnuPG installed?") from None
        except ValueError as error:
            raise GpgTrouble(f"gpg does not work with gnupghome {home}: {error}") from None
        gpg.timeout = timeout
        gpg.buffer_size = 1 << 18        # python-gnupg copies 16 KB at a time by default
        _INSTANCES[key] = gpg
    return gpg


_TIMED = None


def _timed_class():
    """python-gnupg's GPG, with every gpg process killed after ``timeout`` seconds."""
    global _TIMED
    if _TIMED is None:
        import threading

        import gnupg

        class TimedGPG(gnupg.GPG):
            timeout = 60.0

            def _collect_output(self, process, result, writer=None, stdin=None):
                timer = threading.Timer(self.timeout, _kill, (process, result))
                timer.daemon = True
                timer.start()
                try:
                    return super()._collect_output(process, result, writer, stdin)
                except BaseException:       # the time limit, a signal: gpg goes too, reaped
                    _kill(process, result)
                    _reap(process)
                    raise
                finally:
                    timer.cancel()

        _TIMED = TimedGPG
    return _TIMED


def _kill(process, result) -> None:
    result.timed_out = True
    try:
        process.kill()
    except OSError:
        pass


def _reap(process) -> None:
    """Wait for a killed gpg; an exception arriving meanwhile waits until it is reaped."""
    pending = None
    while True:
        try:
            process.wait()
            break
        except BaseException as error:
            pending = pending or error
    if pending is not None:
        raise pending
