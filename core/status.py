"""Exit statuses as the MTA reads them, and the stop of a run with one of them."""

from __future__ import annotations


# sysexits.h, as MTAs read them.  Postfix's pipe(8) defers only on 75 (and 71, or a
# signal) and bounces on every other non-zero status, so anything that is not the
# message's own fault must end in 75.
EX_OK, EX_UNAVAILABLE, EX_TEMPFAIL, EX_CONFIG = 0, 69, 75, 78


class Stop(Exception):
    """Ends a run early with an exit status and the line the MTA puts into its DSN."""

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(f"{status} {text}")
        self.code, self.status, self.text = code, status, text


def tempfail(status: str, text: str) -> Stop:
    return Stop(EX_TEMPFAIL, status, text)
