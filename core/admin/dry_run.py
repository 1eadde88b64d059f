"""The report of ``--dry-run``: what a run whose chains ran would deliver to whom."""

from __future__ import annotations

from ispmailgate_filters.base import Discard, Reject
from ispmailgate_filters.mime import Message

from ..delivery.groups import Delivery
from ..delivery.handover import Job
from ..delivery.hops import NextHop
from ..outcome import Result, exit_status
from ..routing import Leaf, Route, StepTrace
from ..rules import Config
from ..status import DONE, UNPARSABLE
from .output import addresses, printable


def dry_run_report(job: Job, size: int, config: Config, hop: NextHop, leaves: list[Leaf],
                   routes: dict[str, Route], refused: dict[str, Result], trace: list[StepTrace]) -> str:
    """What a run would have delivered to whom, after its chains ran; nothing was sent."""
    lines = [f"dry run {job.run_id}: nothing was delivered",
             f"message: {size} bytes from <{job.sender}>, next hop {hop.describe()}",
             "filter steps:"]
    lines += [f"  {t.step} for {addresses(t.recipients)}: {t.outcome} ({t.ms:.1f} ms)" for t in trace]
    if not trace:
        lines.append("  (none)")
    lines.append("delivery:")
    original = Message(job.original.raw).top_headers().items()
    for recipients, message, leaf in Delivery.groups(leaves, job.unsigned):
        chains = sorted({f"rule {routes[r].rule}, chain {routes[r].chain_label}" for r in recipients})
        lines.append(f"  {addresses(recipients)} ({'; '.join(chains)}):")
        lines.append(f"    {_fate(job, config, hop, leaf, message)}")
        if job.dkim and leaf.verdict is None and not leaf.defers(config, hop.carries_reports):
            lines.append(f"    {_signing(job, recipients, message)}")
        if message is not None and message.changed:
            lines += _header_changes(original, message.top_headers().items())
    lines += [f"notice to {addresses(n.recipients)}: {n.subject}" for n in job.notices]
    status, _, _ = exit_status(_expected_results(config, hop, leaves, refused))
    if _hands_over(job, config, hop, leaves):
        lines.append(f"a real run would exit {status} if the next hop accepted what it was given")
    else:
        lines.append(f"a real run would exit {status}, handing nothing to the next hop")
    return "".join(printable(line) + "\n" for line in lines)


def _hands_over(job: Job, config: Config, hop: NextHop, leaves: list[Leaf]) -> bool:
    """Would the next hop get anything: a message, a postmaster report, a notice?"""
    if any(leaf.defers(config, hop.carries_reports) for leaf in leaves):
        return False        # a deferral delivers nothing, not even the others
    return bool(job.notices) or any(leaf.verdict is None or leaf.verdict.outcome == "error"
                                     for leaf in leaves)


def _fate(job: Job, config: Config, hop: NextHop, leaf: Leaf, message: Message | None) -> str:
    verdict, step = leaf.verdict, leaf.step
    if leaf.defers(config, hop.carries_reports):
        reason = f"{verdict.status} {verdict}" if verdict else "cannot parse the message"
        return f"deferred by {step}: {reason}; the run would deliver nothing and exit 75"
    if verdict is not None and verdict.outcome == "error":
        return (f"error in {step}: {verdict}; the postmaster <{job.postmaster}> would get "
                "a report with the original attached, these recipients nothing")
    if verdict is not None:
        return f"{verdict.outcome} by {step}: {verdict.status} {verdict}"
    data = message.to_bytes()
    if leaf.unparsed:
        return (f"would be delivered ({len(data)} bytes) after its chain ran on it unparsed: the "
                "parser gave up; a copy would be kept in tmp_dir/keep/ and the postmaster told")
    state = "changed" if message.changed else "unchanged, byte for byte"
    return f"would be delivered: {len(data)} bytes, {state}"


def _signing(job: Job, recipients: list[str], message: Message) -> str:
    """What [[dkim]] would do with this group's result: signed, by whom, or why not.  The
    signatures are made (and thrown away), so a key dkimpy cannot use shows here."""
    from ..signing import NotSigned, Signer, failure_status

    if recipients[0] in job.unsigned:
        return "not DKIM-signed: the rule says dkim = false"
    signer = Signer(job.dkim, job.originating)
    tables, why = signer.plan(message.top_headers())
    if not tables:
        return f"not DKIM-signed: {why}"
    try:
        _, signers = signer.sign(job.original.raw, message.to_bytes(), message.eol, tables)
    except NotSigned as why:
        return f"not DKIM-signed: {why}"
    except Exception as error:      # noqa: BLE001 -- the report says what a run would hit
        status = failure_status(error)
        if status.startswith("5"):
            return f"DKIM signing would refuse the message: {status} {error}; these recipients would not get it"
        return f"DKIM signing would fail: {error!r}; the run would deliver nothing and exit 75"
    skipped = [t for t in tables if t not in signers]
    text = "would be DKIM-signed as " + ", ".join(f"d={t.domain} s={t.selector}" for t in signers) if signers \
        else "not DKIM-signed again"
    if skipped:
        text += "; unchanged and already signed as " + ", ".join(f"d={t.domain} s={t.selector}" for t in skipped)
    return text


def _header_changes(before: list[tuple[str, str]], after: list[tuple[str, str]]) -> list[str]:
    """Top-level header fields a chain added or removed (values shortened).  Counted as
    multisets, so the cost is linear in the fields, however many the sender wrote."""
    from collections import Counter

    removed, added = Counter(before) - Counter(after), Counter(after) - Counter(before)
    lines = [f"    - {name}: {value}" for name, value in _taken(before, removed)]
    lines += [f"    + {name}: {value}" for name, value in _taken(after, added)]
    return [line if len(line) <= 100 else line[:97] + "..." for line in lines[:20]]


def _taken(fields: list[tuple[str, str]], wanted: "Counter[tuple[str, str]]") -> list[tuple[str, str]]:
    """The fields of ``wanted``, as many of each as it counts, in the order ``fields`` has them."""
    taken = []
    for field in fields:
        if wanted[field] > 0:
            wanted[field] -= 1
            taken.append(field)
    return taken


def _expected_results(config: Config, hop: NextHop, leaves: list[Leaf],
                      refused: dict[str, Result]) -> dict[str, Result]:
    """What a real run's delivery would make of each recipient, were the next hop to accept
    all it is given: the input of the same exit status a real run gives."""
    results = dict(refused)
    for leaf in leaves:
        verdict = leaf.verdict
        if leaf.defers(config, hop.carries_reports):
            result = Result("deferred", verdict.status if verdict else UNPARSABLE, str(verdict or ""))
        elif isinstance(verdict, Reject):
            result = Result("rejected", verdict.status, str(verdict))
        elif isinstance(verdict, Discard):
            result = Result("discarded", verdict.status, str(verdict))
        elif verdict is not None:       # a filter error: the postmaster gets the report
            result = Result("reported", DONE, str(verdict))
        else:
            result = Result("sent", DONE, "")
        results.update(dict.fromkeys(leaf.recipients, result))
    return results
