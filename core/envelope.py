"""The envelope of a run: its sender and recipients, from the command line or (in shell
test mode) from the message, each checked before anything is delivered."""

from __future__ import annotations

from ispmailgate_filters.mime import Message

from .addresses import MAX_ADDRESS, canonical_address
from .outcome import Result
from .rules import Config
from .status import BAD_RECIPIENT, BAD_SENDER, EMPTY_RECIPIENT, EX_UNAVAILABLE, Stop, tempfail
from .text import one_line


def envelope_addresses(config: "Config", sender: str,
                       recipients: list[str]) -> "tuple[str, list[str], dict[str, Result]]":
    """The envelope as it is delivered, checked before anything is: the sender, the usable
    recipients (canonical, each once), and a permanent failure (5.1.3) for each recipient
    that no next hop could be given -- reported like one a next hop refused, so the others
    are still delivered.  An unusable sender refuses the message (69, 5.1.7)."""
    try:
        sender = "" if sender in ("", "<>") else usable_address(sender, config)
    except ValueError as error:
        raise Stop(EX_UNAVAILABLE, BAD_SENDER, f"bad sender address: {error}") from None
    usable, refused = [], {}
    for recipient in recipients:
        try:
            usable.append(usable_address(recipient, config))
        except ValueError as error:
            refused[recipient] = Result("rejected", BAD_RECIPIENT, f"bad recipient address: {error}")
    if "" in usable:
        raise tempfail(EMPTY_RECIPIENT, "empty recipient address")
    return sender, list(dict.fromkeys(usable)), refused


def refused_untold(refused: "dict[str, Result]") -> Stop:
    """A next hop that cannot carry our delivery status notification (stdout) cannot tell the
    sender about a refused recipient: rather than drop it silently and exit 0, the message is
    refused for every recipient (69, its 5.1.3), so the MTA's bounce tells the sender."""
    recipient, result = next(iter(refused.items()))
    return Stop(EX_UNAVAILABLE, result.status, f"<{one_line(recipient)[:100]}>: {result.text}; --stdout cannot "
                                               "tell the sender, so no recipient gets the message")


def usable_address(text: str, config: "Config") -> str:
    """``canonical_address``, and short enough for an SMTP command with the loop suffix."""
    address = canonical_address(text, config.unqualified_domain)
    if len(address.encode("utf-8")) + len(config.loop_suffix.encode("utf-8")) > MAX_ADDRESS:
        raise ValueError(f"longer than {MAX_ADDRESS} octets with the loop suffix: {text[:60]!r}...")
    return address


def sender_of_from_line(line: str | None) -> str | None:
    """The sender of an mbox From_ line; MAILER-DAEMON is the null sender, "-" is unknown."""
    words = (line or "").split()
    sender = words[1] if len(words) > 1 else "-"
    if sender == "-":
        return None
    return "" if sender.upper() == "MAILER-DAEMON" else sender


def envelope_from_headers(message: Message, from_line: str | None) -> tuple[str, list[str]]:
    """Shell test mode: sender from From_, Return-Path or From:; recipients as ``sendmail -t``."""
    from ispmailgate_filters.mime import addresses

    headers = message.top_headers()
    sender = sender_of_from_line(from_line)
    if sender is None:
        sender = headers.get("Return-Path") or headers.get("From") or ""
        sender = addresses([sender])[0][1] if sender.strip() not in ("", "<>") else ""
    fields = [v for name in ("To", "Cc", "Bcc") for v in headers.get_all(name)]
    return sender, [address for _, address in addresses(fields) if address]
