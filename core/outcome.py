"""What happened to each recipient, and the exit status that follows from it: a pure
function, the same for a run and for ``--dry-run`` (which predicts the results instead of
waiting for them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from .status import DONE, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, LOCAL_TROUBLE


class Result(NamedTuple):
    """What happened to one recipient in the end."""
    state: str          # sent | discarded | rejected | deferred | reported
    status: str
    text: str

    def describe(self) -> str:
        return f"{self.state} ({self.status} {self.text})" if self.text else self.state


def exit_status(results: Mapping[str, Result], *, unbounced: Sequence[str] = (),
                delivered: bool = False) -> tuple[int, str, str]:
    """The exit status, enhanced status code and text for the MTA.

    75 while any recipient waits for a retry (only the MTA's retry can deliver it); 69 when
    every recipient was refused for good; 75 as well when some were refused and their
    sender could not be told (``unbounced``), unless a next hop accepted something already
    (``delivered``): a retry would deliver that twice.  Else 0.
    """
    deferred = [r for r in results.values() if r.state == "deferred"]
    rejected = [rcpt for rcpt, r in results.items() if r.state == "rejected"]
    if deferred:
        return EX_TEMPFAIL, deferred[0].status, deferred[0].text
    if rejected and len(rejected) == len(results):
        first = results[rejected[0]]
        return EX_UNAVAILABLE, first.status, first.text
    if unbounced and not delivered:
        return EX_TEMPFAIL, LOCAL_TROUBLE, ("could not send the bounce for " + ",".join(unbounced)
                                      + "; the MTA will retry all recipients")
    return EX_OK, DONE, "ok"

