"""The filter interface: what a filter is, what it is handed, and how it answers.

A filter is an immutable value configured from the rule file: two chain steps are the
same step exactly when their type and options are equal, so the core runs a step once
for every recipient that shares it (the original's ``IsEq``).  A filter gets a
:class:`~ispmailgate_filters.mime.Message` and a :class:`Context`, changes the message in
place or leaves it alone, and ends a chain early only by raising a :class:`Verdict`.
It never delivers, never exits the process and never reads argv.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .mime import Message
from .mime import printable  # noqa: F401  (re-exported: a helper every filter may need)


# -- verdicts -----------------------------------------------------------------------------

class Verdict(BaseException):
    """A filter's decision to end the chain for the recipients of this step.

    Derived from BaseException, not Exception, so that a filter's own ``except
    Exception`` around library calls cannot swallow a verdict raised inside it.
    """

    outcome = "verdict"
    default_status = "4.3.0"

    def __init__(self, reason: str, status: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status or self.default_status

    def __str__(self) -> str:
        return self.reason


class Reject(Verdict):
    """Refuse the message for good: the MTA bounces it (exit 69, 5.x.x)."""
    outcome = "rejected"
    default_status = "5.7.1"


class Discard(Verdict):
    """Drop the message on purpose; the core logs the reason and reports success."""
    outcome = "discarded"
    default_status = "2.7.0"


class TempFail(Verdict):
    """Not now: the MTA keeps the message and retries (exit 75, 4.x.x)."""
    outcome = "deferred"
    default_status = "4.3.0"


class FilterError(Verdict):
    """The filter could not do its job on this message: the postmaster gets a report."""
    outcome = "error"
    default_status = "4.3.0"


class ConfigError(Exception):
    """A configuration problem, located by file and key path (``filter.av.max_depth``)."""

    def __init__(self, path: str, message: str, source: str = "") -> None:
        super().__init__(path, message, source)
        self.path = path
        self.message = message
        self.source = source

    def __str__(self) -> str:
        return ": ".join(piece for piece in (self.source, self.path, self.message) if piece)


# -- what a filter is handed --------------------------------------------------------------

class Envelope(NamedTuple):
    """SMTP envelope of one delivery group: ``sender`` is "" for the null sender."""
    sender: str
    recipients: tuple[str, ...]


class Notice(NamedTuple):
    """A message a filter asks the core to send once the chains have run."""
    recipients: tuple[str, ...]
    subject: str
    text: str
    attach_original: bool = False


class Budget:
    """The work one message may cost, shared by every filter and every chain of its run.

    A filter charges what it looks into beyond the parsed message: objects (archive
    members, parts of attached messages, objects handed to a scanner) and bytes decoded or
    unpacked.  Once :meth:`charge` returns a reason the budget is spent for the whole run:
    the filter stops and says so (virscan: ``unscannable``), so a small message cannot buy
    minutes of work by nesting.
    """

    def __init__(self, objects: int = 10_000, decoded: int = 512 * 1024 * 1024,
                 output: int = 1 << 40) -> None:
        self.max_objects, self.max_decoded = objects, decoded
        # What one step may put into a message by unpacking or decrypting: the largest
        # message the gate accepts (max_message_size), for it would not take a bigger one
        # from the sender either.
        self.max_output = output
        self.objects = self.decoded = 0
        self.spent: str | None = None       # why the budget is spent, once it is

    def charge(self, objects: int = 0, decoded: int = 0) -> str | None:
        """Count work done or about to be done; the reason once past the budget, else None."""
        self.objects += objects
        self.decoded += decoded
        if self.spent is None and self.objects > self.max_objects:
            self.spent = f"more than max_objects ({self.max_objects}) objects looked into in one message"
        elif self.spent is None and self.decoded > self.max_decoded:
            self.spent = (f"more than max_decoded ({self.max_decoded} bytes) decoded and unpacked "
                          "in one message")
        return self.spent

    def room(self) -> int:
        """Bytes that may still be decoded or unpacked."""
        return max(0, self.max_decoded - self.decoded) if self.spent is None else 0

    def allowance(self, produced: int, *caps: tuple[int, str]) -> tuple[int, str]:
        """How many bytes a step may unpack or decrypt next, and the limit that says so: the
        least of its own ``caps`` ((bytes, "max_size (...)") pairs), what the message's budget
        has left, and what :attr:`max_output` leaves a step that has put ``produced`` bytes
        into the message already."""
        spent = self.spent or f"more than max_decoded ({self.max_decoded} bytes) decoded and unpacked in one message"
        output = f"more than max_message_size ({self.max_output} bytes) unpacked or decrypted into one message"
        return min([*caps, (self.room(), spent), (max(0, self.max_output - produced), output)],
                   key=lambda cap: cap[0])


class Context:
    """The services the core lends a filter for one step of one message."""

    def __init__(self, envelope: Envelope, *, message_id: str, log: logging.Logger,
                 workdir: Callable[[], Path], postmaster: str, limits: Mapping[str, Any] | None = None,
                 notices: list[Notice] | None = None, dry_run: bool = False,
                 budget: Budget | None = None) -> None:
        self.envelope = envelope
        self.message_id = message_id       # this run's id, as in the log
        self.log = log
        self._workdir = workdir
        self.postmaster = postmaster
        self.limits = dict(limits or {})
        self.notices = notices if notices is not None else []
        self.dry_run = dry_run             # --dry-run: decide, but keep nothing (no quarantine copy)
        self.budget = budget if budget is not None else Budget()   # shared by the run's steps

    def workdir(self) -> Path:
        """This message's private work directory (0700), created on first use."""
        return self._workdir()

    def notify(self, recipients: tuple[str, ...] | list[str], subject: str, text: str, *,
               attach_original: bool = False) -> None:
        """Queue a notification (to the postmaster, the sender ...); sent after delivery."""
        self.notices.append(Notice(tuple(recipients), subject, text, attach_original))


# -- options --------------------------------------------------------------------------------

def option(default: Any, doc: str, *, convert: Callable[[Any], Any] | None = None,
           secret: bool = False) -> Any:
    """Declare a filter option: its default, one line of documentation, and how to read it.

    ``convert`` turns the TOML value into the stored value and raises ValueError with a
    reason; without it the option must have the type of its default (lists become tuples).
    ``secret`` keeps the value out of ``repr`` and logs.
    """
    return field(default=default, repr=not secret,
                 metadata={"doc": doc, "convert": convert or _convert_like(default)})


def _convert_like(default: Any) -> Callable[[Any], Any]:
    kind = type(default)

    def convert(value: Any) -> Any:
        if kind is tuple:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError("expected a list of strings")
            return tuple(value)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is float and isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"expected {_TYPE_WORDS.get(kind, kind.__name__)}, got {value!r}")
        return value

    return convert


_TYPE_WORDS = {str: "a string", int: "an integer", bool: "true or false", float: "a number"}
_SIZE = r"([0-9]{1,16})[ \t]*([kmgtKMGT]?)[bB]?\Z"
MAX_SIZE = 1 << 40      # 1T: no limit of a message's work is sanely bigger


def parse_size(value: Any) -> int:
    """A byte count from an integer or a string like "50M" (K, M, G, T: powers of 1024),
    at most 1T."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        size = value
    else:
        match = re.match(_SIZE, value.strip()) if isinstance(value, str) else None
        if not match:
            raise ValueError(f"expected a size like 200M or a number of bytes, got {value!r}")
        size = int(match.group(1)) * 1024 ** " kmgt".index((match.group(2) or " ").lower())
    if size > MAX_SIZE:
        raise ValueError(f"expected a size of at most 1T, got {value!r}")
    return size


def choice(*allowed: str) -> Callable[[Any], str]:
    """A converter accepting one of ``allowed``."""
    def convert(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return value
    return convert


def count(minimum: int, maximum: int = 1_000_000_000) -> Callable[[Any], int]:
    """A converter accepting a whole number from ``minimum`` to ``maximum``."""
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise ValueError(f"expected an integer from {minimum} to {maximum}, got {value!r}")
        return value
    return convert


MAX_SECONDS = 86_400.0      # a day: longer is no timeout, and setitimer(1e300) overflows


def seconds(maximum: float = MAX_SECONDS) -> Callable[[Any], float]:
    """A converter accepting a finite number of seconds above 0, at most ``maximum``."""
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= maximum:
            raise ValueError(f"expected a number of seconds above 0 and at most {maximum:g}, got {value!r}")
        return float(value)
    return convert


def argv(value: Any) -> tuple[str, ...]:
    """A command as a non-empty argv list (never a string: nothing runs through a shell)."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError("expected a command as a non-empty list of strings, e.g. [\"/usr/bin/prog\", \"-x\"]")
    return tuple(value)


def mapping_of_strings(value: Any) -> tuple[tuple[str, str], ...]:
    """A TOML table of strings, stored as sorted pairs so the filter stays hashable."""
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("expected a table of strings")
    return tuple(sorted(value.items()))


# -- the filter base class ----------------------------------------------------------------

@dataclass(frozen=True)
class Filter:
    """Base class of every filter.

    Subclasses are frozen dataclasses whose fields, declared with :func:`option`, are the
    filter's options; they set ``name`` (the type name in the rule file) and
    ``description``, and implement :meth:`process`.
    """

    name = "filter"
    description = ""

    label: str = field(default="", compare=False, repr=False, kw_only=True)

    def process(self, message: Message, ctx: Context) -> None:
        """Look at or change ``message`` in place; raise a Verdict to end the chain."""
        raise NotImplementedError

    def variant(self, recipient: str) -> Hashable:
        """What makes this step differ per recipient (e.g. their own key); None: nothing."""
        return None

    lazy_modules = ()       # modules process() imports lazily (not a field: not an option)
    changes_messages = True     # False for a filter that only looks: its chain is never sealed
    # What this step does with a message the MIME parser gave up on (``message.unparsed``
    # says why; its root is then one opaque part: header fields parsed, body uncut):
    # "process": process() gets it and keeps its promise on it all the same (a banner wraps
    # the whole message, a scanner scans it raw); "pass": the step is skipped, it promises
    # nothing a reader or the next hop relies on; "refuse": the chain ends here with a
    # filter error (on_filter_error), for a step whose promise cannot be kept on it.  Never
    # skipped in silence: the core logs it, keeps a copy and tells the postmaster.
    unparsed_mail = "refuse"

    def breaks_dkim(self) -> bool:
        """Can this step change what a DKIM signature covers (the body, signed fields)?
        ``ispmailgate check`` warns about such steps when no ``[arc]`` is configured."""
        return False

    def preload(self) -> None:
        """Import the modules :meth:`process` imports lazily (called before privileges are
        dropped and before ``serve`` forks workers)."""
        import importlib

        for module in self.lazy_modules:
            importlib.import_module(module)

    def problems(self) -> list[str]:
        """What is wrong with this filter's environment (files, sockets, keys), for ``check``."""
        return []

    def quarantine_dirs(self) -> tuple[str, ...]:
        """Directories where this step keeps copies of messages, in the format of
        :mod:`ispmailgate_filters.kept`: ``ispmailgate quarantine`` works on them."""
        return ()

    def trusted_files(self) -> dict[str, str]:
        """Option name -> a command it runs or a file of secrets it reads.  Started as root,
        the core refuses the rule file unless root alone can change each (a bare command
        name is looked up in $PATH), as it refuses a rule file others can change."""
        return {}

    def explain(self, variant: Hashable) -> str:
        """What this step does for the recipients whose :meth:`variant` is ``variant``, for
        ``explain`` (the certificate they are encrypted to ...); "": nothing to add."""
        return ""

    @property
    def title(self) -> str:
        """How this step appears in logs: the instance name, else the type name."""
        return self.label or self.name

    @classmethod
    def options(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls) if f.name != "label"}

    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str, label: str = "") -> Filter:
        """Build the filter from a rule-file table; every error names its key path."""
        known = cls.options()
        values = {}
        for key, value in options.items():
            if key not in known:
                raise ConfigError(f"{where}.{key}", f"unknown option for filter type {cls.name!r}"
                                  f" (known: {', '.join(sorted(known)) or 'none'})")
            try:
                values[key] = known[key].metadata["convert"](value)
            except (ValueError, TypeError) as error:
                raise ConfigError(f"{where}.{key}", str(error)) from None
        try:
            return cls(label=label, **values)
        except OptionError as error:
            raise ConfigError(f"{where}.{error.key}" if error.key else where, error.reason) from None


class OptionError(ValueError):
    """Raised by a filter's ``__post_init__`` when options do not fit together."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def marked_direction(message: Message, header: str, configured: str) -> str:
    """The original's rule for in/out filters: unmarked mail goes "pos", marked mail "neg".

    ``configured`` wins unless it is "auto".  Callers that guard something (decryption)
    must check the content as well: a marker is just a header anybody can write.
    """
    if configured != "auto":
        return configured
    marker = message.header_value(header) or ""
    return "neg" if marker.strip().lower().startswith("pos") else "pos"
