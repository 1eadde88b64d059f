"""Dates and ages on the command line: ``--since 2025-03-01``, ``--since 2d``,
``--older-than 30d``."""

from __future__ import annotations

import re
import time

# Minutes are "min": a bare "m" could as well mean months, and "purge --older-than 6m"
# removing all but six minutes' worth is not a mistake to leave open.
UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_AGE = re.compile(r"([0-9]{1,9})(min|[shdw])")


def age(text: str) -> float:
    """Seconds from ``30d``, ``12h``, ``90min``, ``2w``, ``3600s`` (or several: ``1d12h``)."""
    words = text.strip().lower()
    if not words or _AGE.sub("", words):
        raise ValueError(f"expected an age such as 30d, 12h, 90min or 2w (no months: m is not a unit), got {text!r}")
    return float(sum(int(number) * UNITS[unit] for number, unit in _AGE.findall(words)))


def moment(text: str, now: float | None = None) -> float:
    """Seconds since the epoch from a date (``2025-03-01``, ``2025-03-01 14:30``, ISO 8601
    with a zone; local time without one) or an age before now (``2d``)."""
    from datetime import datetime

    now = time.time() if now is None else now
    try:
        return now - age(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"expected a date such as 2025-03-01 or 2025-03-01T14:30, or an age "
                         f"such as 2d or 90min (m is not a unit), got {text!r}") from None
    return when.timestamp()       # a naive date is local time, as the ids' times are


def shown(epoch: float) -> str:
    """A time as the tables show it: local, to the second, with its offset."""
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(epoch))
