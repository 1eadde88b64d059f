"""Distinct results wait for delivery in memory only up to a bound, then in spool files
(attack review finding 9: 20 recipients with a distinct banner each held 20 copies of the
message until delivery: 466 MiB for a 10 MB message)."""

from __future__ import annotations

import os
import subprocess
import sys

import dkim

from conftest import CORPUS, GATE, PLUGINS, run_inline
from support.mailauth import signed
from test_dkim import LETTER, dkim_table, signing, verifies  # noqa: F401  (signing: a fixture)

SIMPLE = (CORPUS / "plain.eml").read_bytes()
MB = 1024 * 1024


def distinct_banners(count: int) -> str:
    """A rule per recipient u0@, u1@, ...: each gets a banner of its own."""
    return "".join(f'[[recipients]]\nrecipient = "^u{i}@"\nfilters = ["b{i}"]\n'
                   f'[filter.b{i}]\ntype = "banner"\ntext = "disclaimer {i}"\n' for i in range(count))


def arc_section(mailauth) -> str:
    return (f'[arc]\ndomain = "{mailauth.gateway_key.domain}"\nselector = "{mailauth.gateway_key.selector}"\n'
            f'private_key_file = "{mailauth.gateway_key.path}"\nauthserv_id = "mx.example.net"\n'
            f'resolver = "{mailauth.dns.address}"\n')


def test_spooled_results_are_delivered_as_they_were_made_and_sealed(config_file, smtp_sink, mailauth,
                                                                    monkeypatch, tmp_path):
    """With nothing held in memory but the first, every other result goes through its
    spool file: each recipient still gets its own banner, ARC-sealed, and the files go."""
    from ispmailgate_core.delivery import spool

    monkeypatch.setattr(spool, "IN_MEMORY", 0)
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\n' + distinct_banners(4)
                         + arc_section(mailauth))
    written = []
    real_write = spool.Spool._write
    monkeypatch.setattr(spool.Spool, "_write", lambda self, *a: written.append(1) or real_write(self, *a))
    run = run_inline(["-c", str(config), "-f", "a@sender.example", *(f"u{i}@x.example" for i in range(4))],
                     signed(mailauth, SIMPLE))
    assert run.code == 0, run.stderr
    assert len(written) == 3                   # the first result stays in memory
    assert sorted(m.rcpt_tos[0] for m in smtp_sink.messages) == [f"u{i}@x.example" for i in range(4)]
    for message in smtp_sink.messages:
        number = message.rcpt_tos[0][1]
        assert f"disclaimer {number}".encode() in message.content
        assert all(f"disclaimer {i}".encode() not in message.content for i in range(4) if str(i) != number)
        verdict, _, reason = dkim.arc_verify(message.content, dnsfunc=mailauth.dns.txt)
        assert verdict == dkim.CV_Pass, reason
    assert not list((tmp_path / "spool").glob("ispmailgate-*"))


def test_equal_results_spooled_are_still_merged(config_file, smtp_sink, monkeypatch):
    from ispmailgate_core.delivery import spool

    monkeypatch.setattr(spool, "IN_MEMORY", 0)
    rules = distinct_banners(2) + '[[recipients]]\nrecipient = "^v@"\nfilters = ["b1"]\n'
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\n' + rules)
    run = run_inline(["-c", str(config), "-f", "a@x.example", "u0@x.example", "u1@x.example", "v@x.example"],
                     SIMPLE)
    assert run.code == 0, run.stderr
    assert sorted(sorted(m.rcpt_tos) for m in smtp_sink.messages) == [["u0@x.example"],
                                                                      ["u1@x.example", "v@x.example"]]


PROBE = """
import resource, subprocess, sys
with open(sys.argv[1], "rb") as stdin:
    done = subprocess.run(sys.argv[2:], stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, done.stderr[-300:])
"""


def peak(config, message, recipients: int) -> int:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ISPMAILGATE_")}
    environment["PYTHONPATH"] = str(PLUGINS)
    out = subprocess.run([sys.executable, "-c", PROBE, str(message), str(GATE), "-c", str(config), "--stdout",
                          "-f", "a@b.example", "--", *(f"u{i}@x.example" for i in range(recipients))],
                         capture_output=True, text=True, env=environment, timeout=300, check=True).stdout
    code, kib, rest = out.split(" ", 2)
    assert code == "0", rest
    return int(kib) * 1024


def test_memory_does_not_grow_with_the_number_of_distinct_results(config_file, tmp_path):
    """4 against 16 distinct results of an 8 MB message: 12 more results held in memory
    would cost about 200 MB more; the bar is two messages' worth."""
    message = tmp_path / "big.eml"
    message.write_bytes(b"Subject: s\nContent-Type: text/plain\n\n" + (b"x" * 76 + b"\n") * (8 * MB // 77))
    config = config_file(distinct_banners(16))
    few, many = peak(config, message, 4), peak(config, message, 16)
    assert many < few + 16 * MB, f"{few // MB} MiB for 4 results, {many // MB} MiB for 16"


def test_spooled_results_are_dkim_signed_and_sealed_over_what_leaves(config_file, smtp_sink, mailauth,
                                                                     signing, monkeypatch):
    """[[dkim]] and [arc] put their fields on top of a result that waits in its file: both
    verify on what the next hop got."""
    from ispmailgate_core.delivery import spool

    monkeypatch.setattr(spool, "IN_MEMORY", 0)
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\n' + distinct_banners(3)
                         + dkim_table(signing.rsa) + arc_section(mailauth))
    run = run_inline(["-c", str(config), "--originating", "-f", "ada@gate.example", *(f"u{i}@x.example" for i in range(3))], LETTER)
    assert run.code == 0, run.stderr
    assert len(smtp_sink.messages) == 3
    for message in smtp_sink.messages:
        assert f"disclaimer {message.rcpt_tos[0][1]}".encode() in message.content
        assert message.content.startswith(b"ARC-Seal: i=1;")
        assert verifies(message.content, signing)
        verdict, _, reason = dkim.arc_verify(message.content, dnsfunc=mailauth.dns.txt)
        assert verdict == dkim.CV_Pass, reason
