"""The report of ``--dry-run``: what a run whose chains ran would deliver to whom."""

from __future__ import annotations

from ispmailgate_filters.base import Reject
from ispmailgate_filters.mime import Message

from ..delivery.groups import Delivery
from ..routing import Leaf, Route, StepTrace
from ..run import Gate
from ..status import EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE
from .output import addresses, describe_hop, printable


def dry_run_report(gate: Gate, leaves: list[Leaf], routes: dict[str, Route], hop,
                   trace: list[StepTrace]) -> str:
    """What a run would have delivered to whom, after its chains ran; nothing was sent."""
    lines = [f"dry run {gate.id}: nothing was delivered",
             f"message: {gate.size} bytes from <{gate.sender}>, next hop {describe_hop(hop)}",
             "filter steps:"]
    lines += [f"  {t.step} for {addresses(t.recipients)}: {t.outcome} ({t.ms:.1f} ms)" for t in trace]
    if not trace:
        lines.append("  (none)")
    lines.append("delivery:")
    original = Message(gate.message.raw).top_headers().items()
    for recipients, message, leaf in Delivery.groups(leaves):
        chains = sorted({f"rule {routes[r].rule}, chain {routes[r].chain_label}" for r in recipients})
        lines.append(f"  {addresses(recipients)} ({'; '.join(chains)}):")
        lines.append(f"    {_fate(gate, leaf, message, hop)}")
        if message is not None and message.changed and not leaf.unparsed:
            lines += _header_changes(original, message.top_headers().items())
    lines += [f"notice to {addresses(n.recipients)}: {n.subject}" for n in gate.notices]
    status = _would_exit(gate, leaves, hop)
    if _hands_over(gate, leaves, hop):
        lines.append(f"a real run would exit {status} if the next hop accepted what it was given")
    else:
        lines.append(f"a real run would exit {status}, handing nothing to the next hop")
    return "".join(printable(line) + "\n" for line in lines)


def _hands_over(gate: Gate, leaves: list[Leaf], hop) -> bool:
    """Would the next hop get anything: a message, a postmaster report, a notice?"""
    if any(gate.defers(leaf, hop) for leaf in leaves):
        return False        # a deferral delivers nothing, not even the others
    return bool(gate.notices) or any(leaf.verdict is None or leaf.verdict.outcome == "error"
                                     for leaf in leaves)


def _fate(gate: Gate, leaf: Leaf, message: Message | None, hop) -> str:
    verdict, step = leaf.verdict, leaf.step
    if gate.defers(leaf, hop):
        reason = f"{verdict.status} {verdict}" if verdict else "cannot parse the message"
        return f"deferred by {step}: {reason}; the run would deliver nothing and exit 75"
    if verdict is not None and verdict.outcome == "error":
        return (f"error in {step}: {verdict}; the postmaster <{gate.config.postmaster}> would get "
                "a report with the original attached, these recipients nothing")
    if verdict is not None:
        return f"{verdict.outcome} by {step}: {verdict.status} {verdict}"
    if leaf.unparsed:
        return (f"would be delivered unchanged ({len(message.raw)} bytes): the parser gave up in "
                f"{step}; a copy would be kept in tmp_dir/keep/ and the postmaster told")
    data = message.to_bytes()
    state = "changed" if message.changed else "unchanged, byte for byte"
    return f"would be delivered: {len(data)} bytes, {state}"


def _header_changes(before: list[tuple[str, str]], after: list[tuple[str, str]]) -> list[str]:
    """Top-level header fields a chain added or removed (values shortened)."""
    lines = [f"    - {name}: {value}" for name, value in before if (name, value) not in after]
    lines += [f"    + {name}: {value}" for name, value in after if (name, value) not in before]
    return [line if len(line) <= 100 else line[:97] + "..." for line in lines[:20]]


def _would_exit(gate: Gate, leaves: list[Leaf], hop) -> int:
    if any(gate.defers(leaf, hop) for leaf in leaves):
        return EX_TEMPFAIL
    if all(isinstance(leaf.verdict, Reject) for leaf in leaves):
        return EX_UNAVAILABLE
    return EX_OK
