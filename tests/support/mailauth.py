"""Real keys and a real DNS server for DKIM and ARC tests.

Keys come from openssl; their public halves are served as TXT records by dnsmasq on a
free loopback port, the way a receiver would find them.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import free_port


@dataclass
class Key:
    selector: str
    domain: str
    private_pem: bytes
    path: Path

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


def make_key(directory: Path, selector: str, domain: str) -> tuple[Key, str]:
    """An RSA key (2048 bits) and its DKIM TXT record."""
    path = directory / f"{selector}.{domain}.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(path), "2048"], check=True, capture_output=True)
    path.chmod(0o600)
    public = subprocess.run(["openssl", "rsa", "-in", str(path), "-pubout", "-outform", "DER"],
                            check=True, capture_output=True).stdout
    record = f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"
    return Key(selector, domain, path.read_bytes(), path), record


def make_ed25519_key(directory: Path, selector: str, domain: str) -> tuple[Key, str]:
    """An Ed25519 key (PKCS#8 PEM, as openssl writes it) and its DKIM TXT record (RFC 8463:
    the raw 32-byte public key, the last 32 bytes of openssl's SubjectPublicKeyInfo)."""
    path = directory / f"{selector}.{domain}.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(path)], check=True,
                   capture_output=True)
    path.chmod(0o600)
    public = subprocess.run(["openssl", "pkey", "-in", str(path), "-pubout", "-outform", "DER"],
                            check=True, capture_output=True).stdout
    record = f"v=DKIM1; k=ed25519; p={base64.b64encode(public[-32:]).decode()}"
    return Key(selector, domain, path.read_bytes(), path), record


class DnsServer:
    """dnsmasq answering only the TXT records it is given, on 127.0.0.1:port."""

    def __init__(self, records: dict[str, str]) -> None:
        self.port = free_port()
        dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        argv = [dnsmasq, "--keep-in-foreground", f"--port={self.port}", "--listen-address=127.0.0.1",
                "--bind-interfaces", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
                "--pid-file=", "--log-facility=-"]
        argv += [f"--txt-record={name},{text}" for name, text in records.items()]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready(next(iter(records)))

    def _wait_ready(self, name: str) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dnsmasq exited: {self.process.stderr.read().decode()}")
            if self.txt(name) is not None:
                return
            time.sleep(0.05)
        raise RuntimeError("dnsmasq did not answer")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def txt(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """A dkimpy ``dnsfunc`` that asks this server (used to check what the gate sent)."""
        import dns.resolver

        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port = ["127.0.0.1"], self.port
        name = name.decode() if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(name, "TXT", lifetime=min(timeout, 2), raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers, dns.exception.Timeout):
            return None
        for record in answer.response.answer:
            return b"".join(next(iter(record.items)).strings)
        return None

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class MisbehavingDns:
    """A DNS server on 127.0.0.1 (UDP) that misbehaves as asked, counting the names it is asked:
    ``silent`` never answers, ``garbage`` answers bytes that are no DNS message, ``servfail``
    answers SERVFAIL, ``records`` answers the TXT records it is given (NXDOMAIN for others)."""

    def __init__(self, mode: str, records: dict[str, str] | None = None) -> None:
        import socket
        import threading

        self.mode, self.records = mode, {k.lower(): v for k, v in (records or {}).items()}
        self.names: list[str] = []
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.socket.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import dns.message

        while True:
            try:
                data, peer = self.socket.recvfrom(4096)
            except OSError:         # closed
                return
            query = dns.message.from_wire(data)
            self.names.append(str(query.question[0].name).rstrip(".").lower())
            answer = self._answer(query, data)
            if answer is not None:
                self.socket.sendto(answer, peer)

    def _answer(self, query, data: bytes) -> bytes | None:
        import dns.message
        import dns.rcode
        import dns.rdata
        import dns.rdataclass
        import dns.rdatatype

        if self.mode == "silent":
            return None
        if self.mode == "garbage":
            return data[:2] + b"\x81\x80 this is not DNS \xff\xfe"
        response = dns.message.make_response(query)
        text = self.records.get(self.names[-1])
        if self.mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif text is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            pieces = " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))
            rrset = response.find_rrset(response.answer, query.question[0].name, dns.rdataclass.IN,
                                        dns.rdatatype.TXT, create=True)
            rrset.add(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, pieces), 300)
        return response.to_wire(max_size=65535)

    @property
    def distinct(self) -> set[str]:
        return set(self.names)

    def close(self) -> None:
        self.socket.close()


def signed(auth: "MailAuth", message: bytes, sender: str = "sender.example") -> bytes:
    """The message with a From: in the author domain, DKIM-signed by it (LF line ends)."""
    import re

    import dkim

    message = re.sub(rb"(?m)^From: .*$", f"From: Author <author@{sender}>".encode(), message, count=1)
    signature = dkim.sign(message.replace(b"\n", b"\r\n"), auth.sender_key.selector.encode(),
                          auth.sender_key.domain.encode(), auth.sender_key.private_pem,
                          include_headers=[b"from", b"to", b"subject", b"date"])
    return signature.replace(b"\r\n", b"\n") + message


@dataclass
class MailAuth:
    sender_key: Key        # the author domain's DKIM key
    sender_txt: str        # its TXT record
    gateway_key: Key       # the gateway's ARC key
    relay_key: Key         # an earlier intermediary's ARC key
    dns: DnsServer


@pytest.fixture(scope="session")
def mailauth(tmp_path_factory) -> MailAuth:
    directory = tmp_path_factory.mktemp("keys")
    sender, sender_txt = make_key(directory, "sel", "sender.example")
    gateway, gateway_txt = make_key(directory, "arc1", "gw.example.net")
    relay, relay_txt = make_key(directory, "relay", "relay.example")
    server = DnsServer({sender.dns_name: sender_txt, gateway.dns_name: gateway_txt,
                        relay.dns_name: relay_txt})
    try:
        yield MailAuth(sender, sender_txt, gateway, relay, server)
    finally:
        server.stop()
