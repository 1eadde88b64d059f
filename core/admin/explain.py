"""``ispmailgate explain``: the rule and chain of each recipient, the filter steps they
share and the delivery groups, without a message."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from ispmailgate_filters.base import ConfigError, Filter

from ..delivery.groups import by_signing
from ..delivery.hops import configured_hop
from ..envelope import envelope_addresses
from ..routing import ChainRunner, Route, route
from ..rules import Config, find_config, load_config
from ..status import EX_CONFIG, EX_OK
from .output import Output, addresses


def explain(requested: Path | None, sender: str | None, recipients: list[str], stdout: BinaryIO,
            *, originating: bool = False) -> int:
    """Per recipient the rule and chain; the filter steps they share; the delivery groups."""
    out = Output(stdout)
    path = find_config(requested)
    try:
        config = load_config(path)
    except ConfigError as error:
        out.line(str(error))
        out.line("(ispmailgate check lists every problem)")
        out.close()
        return EX_CONFIG
    sender, recipients, refused = envelope_addresses(config, sender or "", recipients)
    routes = {recipient: route(config, sender, recipient) for recipient in recipients}
    out.line(f"rule file: {config.path}")
    out.line(f"sender: <{sender}>")
    rules = {rule.label: rule for rule in config.rules}
    for recipient, chosen in routes.items():
        out.line(f"<{recipient}>: {_describe_rule(rules.get(chosen.rule))} -> {chosen.chain_label}")
    for recipient, result in refused.items():       # as a run refuses them: each for good
        out.line(f"<{recipient}>: refused, {result.status} {result.text}")
    out.line()
    out.line("filter steps, each run once for the recipients listed:")
    unsigned = frozenset(r for r, chosen in routes.items() if not chosen.dkim)
    groups = [part for members in _plan(routes, list(routes), 0, "  ", out)
              for part in by_signing(members, unsigned if "dkim" in config.sections else frozenset())]
    out.line()
    out.line("delivery groups (a verdict can end a chain early; identical results are merged):")
    for number, members in enumerate(groups, 1):
        chosen = routes[members[0]]
        signing = f"; {_signing(config, chosen, originating)}" if "dkim" in config.sections else ""
        out.line(f"  {number}. {addresses(members)}: {chosen.chain_label}; "
                 f"{_sealing(config, chosen.chain)}{signing}")
    out.line(f"next hop: {configured_hop(config).describe()}")
    out.close()
    return EX_OK


def _describe_rule(rule) -> str:
    if rule is None:
        return "default_filter (no rule matched)"
    return f"{rule.label} ({', '.join(map(_describe_condition, rule.conditions)) or 'matches everybody'})"


def _describe_condition(condition) -> str:
    """As the rule file says it: recipient '...', sender_not '...', sender_is external."""
    if condition.pattern is None:
        return f"{condition.subject}_is {'external' if condition.negate else 'internal'}"
    return f"{condition.subject}{'_not' if condition.negate else ''} '{condition.pattern.pattern}'"


def _plan(routes: dict[str, Route], recipients: list[str], depth: int, indent: str,
          out: Output) -> list[list[str]]:
    """Walks the chains as the runner does, printing each step run; returns the groups."""
    finished, branches = ChainRunner.split(routes, recipients, depth)
    groups = [finished] if finished else []
    if depth == 0 and not branches:
        out.line(f"{indent}(none: an empty chain delivers the message as it came)")
    for (step, variant), members in branches.items():
        notes = (["differs per recipient"] if variant is not None else []) + _explained(step, variant)
        note = f"  ({'; '.join(notes)})" if notes else ""
        out.line(f"{indent}{step.title}: {addresses(members)}{note}")
        groups += _plan(routes, members, depth + 1, indent + "  ", out)
    return groups


def _explained(step: Filter, variant) -> list[str]:
    """What the step says it does for these recipients (the certificate they are encrypted to)."""
    try:
        detail = step.explain(variant)
    except Exception as error:      # explain must show the rest whatever one filter does
        detail = f"cannot tell: {error!r}"
    return [detail] if detail else []


def _signing(config: Config, chosen: Route, originating: bool) -> str:
    """Who DKIM-signs the group's results: known only once a message says its From:."""
    from ..signing import not_originating

    tables = config.sections["dkim"]
    if not chosen.dkim:
        return f"not DKIM-signed ({chosen.rule}: dkim = false)"
    signing = [t for t in tables if originating or t.sign == "always"]
    idle = [t for t in tables if t not in signing]
    domains: dict[str, list[str]] = {}
    for t in signing:
        domains.setdefault(t.domain + (" or below" if t.subdomains else ""), []).append(
            f"d={t.domain} s={t.selector} {t.algorithm}")
    text = "DKIM-signed if the From: domain is " + " or ".join(
        f"{domain} (by {', '.join(signers)})" for domain, signers in domains.items()) if signing else ""
    return "; ".join(filter(None, (text, idle and f"not DKIM-signed: {not_originating(idle)}")))


def _sealing(config: Config, chain) -> str:
    if "arc" not in config.sections:
        return "not sealed (no [arc])"
    if any(step.changes_messages for step in chain):
        return "ARC-sealed if a filter changes the message"
    return "never sealed (nothing in the chain changes messages)"
