"""Route and run the chains: each recipient's rule and chain, and the runner that runs
every distinct filter step once for all the recipients it serves."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

from ispmailgate_filters.base import Envelope, Filter, FilterError, TempFail, Verdict
from ispmailgate_filters.mime import Message, ParseError

from .rules import Config
from .status import UNPARSABLE, of_error


class Route(NamedTuple):
    rule: str
    chain: tuple[Filter, ...]
    dkim: bool = True           # the rule lets [[dkim]] sign its recipients' results

    @property
    def chain_label(self) -> str:
        return ",".join(step.title for step in self.chain) or "-"


def route(config: Config, sender: str, recipient: str) -> Route:
    for rule in config.rules:
        if rule.matches(sender, recipient):
            return Route(rule.label, rule.chain, rule.dkim)
    return Route("default", config.default_chain)


class Leaf(NamedTuple):
    """Where a set of recipients ended up after their chains: a message, or a verdict."""
    recipients: list[str]
    message: Any                    # a Message, or what ChainRunner's finish made of it; None: a verdict
    verdict: Verdict | None = None
    step: str = ""
    unparsed: bool | str = False    # the parser gave up on its message (why, where known): see on_parse_error

    def defers(self, config: Config, carries_reports: bool) -> bool:
        """Does this leaf make the whole run a tempfail, before anything is delivered?  A
        TempFail does; a message the parser gave up on when on_parse_error says so; a filter
        error when the policy says so or the next hop cannot carry the postmaster's report."""
        if isinstance(self.verdict, TempFail):
            return True
        if self.unparsed and config.on_parse_error == "tempfail":
            return True
        if isinstance(self.verdict, FilterError):
            return config.on_filter_error == "tempfail" or not carries_reports
        return False


class ChainRunner:
    """Runs every recipient's chain, each distinct step once per distinct input.

    The chains form a tree: recipients whose chains start with equal steps (same type
    and options, same per-recipient variant) share those steps' work, and their paths
    split where their chains differ.  A verdict ends the path for its recipients.
    """

    def __init__(self, make_context, log, trace: "list[StepTrace] | None" = None,
                 finish: "Callable[[Message], Any] | None" = None) -> None:
        self.make_context = make_context
        self.log = log
        self.trace = trace          # --dry-run: what each step did, for whom
        self.finish = finish or (lambda message: message)   # what a finished message is kept as

    def run(self, message: Message, sender: str, routes: dict[str, Route]) -> list[Leaf]:
        """Depth first: one path of the tree at a time, so that the messages alive at once are
        those on the current path (and the forks waiting at its branch points), never one per
        result; each result is handed to ``finish`` as soon as its chain is done."""
        leaves: list[Leaf] = []
        pending: list[tuple] = [(message, list(routes), 0, None, False)]
        while pending:
            current, recipients, depth, step, shared = pending.pop()
            if step is not None:
                work = current.fork() if shared else current
                leaf = self._step(step, work, Envelope(sender, tuple(recipients)))
                if leaf is None:
                    pending.append((work, recipients, depth + 1, None, False))
                else:
                    leaves.append(leaf)
                continue
            finished, branches = self.split(routes, recipients, depth)
            if finished:
                unparsed = (current.parsed and current.unparsed) or False     # never parsed: never gave up
                leaves.append(Leaf(finished, self.finish(current), unparsed=unparsed))
            shared = len(branches) + bool(finished) > 1
            for (step, _), members in branches.items():    # the last branch runs first, as it always did
                pending.append((current, members, depth, step, shared))
        return leaves

    @classmethod
    def split(cls, routes: dict[str, Route], recipients: list[str],
              depth: int) -> "tuple[list[str], dict[tuple[Filter, Any], list[str]]]":
        """Who is done after ``depth`` steps, and who takes which (step, variant) next."""
        finished = [r for r in recipients if len(routes[r].chain) == depth]
        branches: dict[tuple[Filter, Any], list[str]] = {}
        for recipient in recipients:
            if len(routes[recipient].chain) > depth:
                step = routes[recipient].chain[depth]
                branches.setdefault((step, cls._variant(step, recipient)), []).append(recipient)
        return finished, branches

    @staticmethod
    def _variant(step: Filter, recipient: str) -> Any:
        try:
            return step.variant(recipient)
        except Exception as error:    # decided in _step: the step will fail for them
            return ("variant-error", repr(error))

    def _step(self, step: Filter, work: Message, envelope: Envelope) -> Leaf | None:
        members = list(envelope.recipients)
        started = time.monotonic()
        if step.unparsed_mail != "process" and self._unparsed(step, work):
            return self._not_on_unparsed(step, work, members, started)
        before = bytes(work.to_bytes()) if self.trace is not None else None
        try:
            step.process(work, self.make_context(envelope, step))
        except Verdict as verdict:
            # the summary line carries the verdict; this is the detail of -d
            self.log.debug("%s: %s for %s: %s", step.title, verdict.outcome, ",".join(members), verdict)
            return self._record(step, started, Leaf(members, None, verdict, step.title))
        except ParseError as error:     # content a filter parses inside the message
            self.log.error("%s: cannot parse part of the message: %s", step.title, error)
            verdict = FilterError(f"{step.title} cannot parse part of the message: {error}", UNPARSABLE)
            return self._record(step, started, Leaf(members, None, verdict, step.title, unparsed=True))
        except (OSError, MemoryError) as error:    # the machine's trouble, not the message's
            self.log.error("%s: %r", step.title, error, exc_info=True)
            return self._record(step, started, Leaf(members, None, TempFail(str(error), of_error(error)),
                                                    step.title))
        except Exception as error:
            self.log.error("%s: filter error for %s: %r", step.title, ",".join(members), error,
                           exc_info=True)
            verdict = FilterError(f"filter {step.title} failed: {error!r}")
            return self._record(step, started, Leaf(members, None, verdict, step.title))
        self.log.debug("%s: %.1f ms for %s%s", step.title, (time.monotonic() - started) * 1000,
                       ",".join(members), " (changed)" if work.changed else "")
        if before is not None:
            self._record(step, started, Leaf(members, work),
                         "changed the message" if work.to_bytes() != before else "passed")
        return None

    def _unparsed(self, step: Filter, work: Message) -> bool:
        """Has the parser given up on ``work``?  Parsed now if need be: whether ``step`` may
        run on it depends on that (a step that processes any message needs no parse here)."""
        if work.unparsed is not None:
            self.log.warning("%s: the message cannot be parsed (%s): this step %s", step.title,
                             work.unparsed, "is skipped" if step.unparsed_mail == "pass"
                             else "cannot do its work on it")
        return work.unparsed is not None

    def _not_on_unparsed(self, step: Filter, work: Message, members: list[str], started: float) -> Leaf | None:
        """A step that may be skipped on unparsed mail (None: go on), or the filter error of one
        whose promise cannot be kept on it: never skipped in silence."""
        if step.unparsed_mail == "pass":
            if self.trace is not None:
                self._record(step, started, Leaf(members, work), "skipped: the message cannot be parsed")
            return None
        verdict = FilterError(f"the message cannot be parsed ({work.unparsed}), and {step.title} "
                              "cannot do its work on it", UNPARSABLE)
        return self._record(step, started, Leaf(members, None, verdict, step.title, unparsed=True))

    def _record(self, step: Filter, started: float, leaf: Leaf, outcome: str = "") -> Leaf:
        """For --dry-run: what this step did (a verdict speaks for itself)."""
        if self.trace is not None:
            if leaf.verdict is not None:
                outcome = f"{leaf.verdict.outcome}: {leaf.verdict.status} {leaf.verdict}"
            self.trace.append(StepTrace(step.title, tuple(leaf.recipients), outcome,
                                        (time.monotonic() - started) * 1000))
        return leaf


class StepTrace(NamedTuple):
    """What one filter step did for its recipients (``--dry-run`` prints these)."""
    step: str
    recipients: tuple[str, ...]
    outcome: str
    ms: float
