"""Filters for the tests, loaded as ``gate_test_filters:Name`` like any third-party filter."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ispmailgate_filters.base import (Discard, Filter, FilterError, Reject, TempFail, choice,
                                      option)
from ispmailgate_filters.mime import ParseError


@dataclass(frozen=True)
class Counter(Filter):
    """Appends one line per run (its tag and recipients) to a file: counts the runs of a step."""

    name = "counter"
    path: str = option("", "file to append to")
    tag: str = option("", "what to write")

    def process(self, message, ctx) -> None:
        with open(self.path, "a") as out:
            out.write(f"{self.tag} {','.join(ctx.envelope.recipients)}\n")


@dataclass(frozen=True)
class Stamp(Filter):
    """Adds one header field."""

    name = "stamp"
    header: str = option("X-Stamp", "field name")
    value: str = option("yes", "field value")

    def process(self, message, ctx) -> None:
        message.headers.add(self.header, self.value)


@dataclass(frozen=True)
class StampAny(Stamp):
    """Stamp, declared to work on a message the parser gave up on as well."""

    name = "stamp-any"
    unparsed_mail = "process"


@dataclass(frozen=True)
class Upcase(Filter):
    """Upper-cases the first text/plain leaf (changes exactly one part)."""

    name = "upcase"

    def process(self, message, ctx) -> None:
        for part in message.leaves():
            if part.content_type == "text/plain":
                part.set_text(part.text().upper())
                return


@dataclass(frozen=True)
class Judge(Filter):
    """Ends the chain with the verdict it is configured for (or crashes)."""

    name = "judge"
    verdict: str = option("reject", "reject | discard | tempfail | error | crash | parse",
                          convert=choice("reject", "discard", "tempfail", "error", "crash", "parse"))
    only: str = option("", "only for this recipient (others pass)")

    def process(self, message, ctx) -> None:
        if self.only and self.only not in ctx.envelope.recipients:
            return
        if self.verdict == "reject":
            raise Reject("judged unacceptable", "5.7.1")
        if self.verdict == "discard":
            raise Discard("judged unwanted")
        if self.verdict == "tempfail":
            raise TempFail("judge is busy", "4.7.1")
        if self.verdict == "error":
            raise FilterError("judge could not decide")
        if self.verdict == "parse":
            raise ParseError("the test judge cannot parse this")
        try:
            raise RuntimeError("judge crashed")
        except Exception:       # a filter's own broad except must not swallow verdicts...
            raise ZeroDivisionError("judge crashed for real")

    def variant(self, recipient: str):
        return recipient == self.only if self.only else None


@dataclass(frozen=True)
class Notifier(Filter):
    """Asks the core to send a notice to the postmaster (or the sender, or anybody)."""

    name = "notifier"
    to: str = option("postmaster", "postmaster | sender | an address")
    text: str = option("something happened", "the notice's text")

    def process(self, message, ctx) -> None:
        to = {"postmaster": ctx.postmaster, "sender": ctx.envelope.sender}.get(self.to, self.to)
        ctx.notify([to], "test notice", self.text, attach_original=True)


@dataclass(frozen=True)
class NeedsWorkdir(Filter):
    """Writes a file into the per-message work directory."""

    name = "needs-workdir"
    record: str = option("", "file to write the work directory's path and modes to")

    def process(self, message, ctx) -> None:
        import stat

        path = ctx.workdir()
        (path / "scratch").write_bytes(b"x")
        if self.record:
            modes = (stat.S_IMODE(path.stat().st_mode), stat.S_IMODE((path / "scratch").stat().st_mode))
            with open(self.record, "w") as out:
                out.write(f"{path} {modes[0]:o} {modes[1]:o}")


@dataclass(frozen=True)
class WhoAmI(Filter):
    """Records the ids it runs with: proves privileges were dropped before the message."""

    name = "whoami"
    path: str = option("", "file to write 'uid gid groups' to")

    def process(self, message, ctx) -> None:
        import os
        with open(self.path, "w") as out:
            out.write(f"{os.getuid()} {os.geteuid()} {os.getgid()} {os.getegid()} {os.getgroups()}")


@dataclass(frozen=True)
class Sleeper(Filter):
    """Takes its time."""

    name = "sleeper"
    seconds: float = option(5.0, "how long")

    def process(self, message, ctx) -> None:
        import time
        time.sleep(self.seconds)


@dataclass(frozen=True)
class Scribbler(Filter):
    """Writes ``size`` bytes into the work directory (to meet a full disk)."""

    name = "scribbler"
    size: int = option(1 << 20, "bytes to write")

    def process(self, message, ctx) -> None:
        (ctx.workdir() / "blob").write_bytes(b"x" * self.size)


@dataclass(frozen=True)
class Secretive(Filter):
    """Holds a passphrase (kept out of repr and logs)."""

    name = "secretive"
    passphrase: str = option("", "a secret", secret=True)

    def process(self, message, ctx) -> None:
        ctx.log.info("processing with %r", self)


@dataclass(frozen=True)
class Picky(Filter):
    """Needs a file (as banner's text_file or pgp's gnupghome do): reports it through problems()."""

    name = "picky"
    needs: str = option("", "a file this filter reads")
    crash_when_checked: bool = option(False, "problems() itself fails")

    def process(self, message, ctx) -> None:
        return None

    def problems(self) -> list[str]:
        if self.crash_when_checked:
            raise OSError("the check itself broke")
        return [] if self.needs and os.access(self.needs, os.R_OK) else [f"needs: {self.needs}: not readable"]
