"""The one table of what a run tells the MTA: its exit status, and the enhanced status code
(RFC 3463) that starts the status line on stderr, which the MTA quotes in its DSN.

A filter's verdict brings its own code (``Verdict.status``); the codes here are those the
gate gives of its own.  The two programs that must load when nothing else does --
ispmailgate_start and ispmailgate_client -- keep a copy of the two values they need
(tests/test_layout.py holds them to this table).
"""

from __future__ import annotations

import errno

# -- exit statuses: sysexits.h, as MTAs read them ------------------------------------------
# Postfix's pipe(8) defers only on 75 (and 71, or a signal) and bounces on every other
# non-zero status, so anything that is not the message's own fault must end in 75.
EX_OK, EX_UNAVAILABLE, EX_TEMPFAIL, EX_CONFIG = 0, 69, 75, 78

# -- enhanced status codes ---------------------------------------------------------------
DONE = "2.0.0"                  # delivered, discarded on purpose, reported to the postmaster
BAD_RECIPIENT = "5.1.3"         # X.1.3 bad destination mailbox address syntax
EMPTY_RECIPIENT = "4.1.3"       #   the same for an empty address: a fault of the MTA's, not the mail's
BAD_SENDER = "5.1.7"            # X.1.7 bad sender's mailbox address syntax
LOCAL_TROUBLE = "4.3.0"         # X.3.0 other mail system status: our own trouble, a retry may help
SYSTEM_FULL = "4.3.1"           # X.3.1 mail system full: disk, quota, memory
TOO_BIG = "4.3.4"               # X.3.4 message too big for system (on_oversize = tempfail)
TOO_BIG_FOR_GOOD = "5.3.4"      #   the same, on_oversize = reject
MISCONFIGURED = "4.3.5"         # X.3.5 system incorrectly configured: rule file, command line, privileges
NO_ANSWER = "4.4.1"             # X.4.1 no answer from host: the next hop cannot be reached
BAD_CONNECTION = "4.4.2"        # X.4.2 bad connection: the next hop broke it off
TIMED_OUT = "4.4.7"             # X.4.7 delivery time expired: time_limit, a hung sendmail command
OUT_OF_STEP = "4.5.0"           # X.5.0 other protocol status: the next hop said what SMTP does not say
NO_SENDER = "4.5.1"             # X.5.1 invalid command: no envelope sender given
RECIPIENT_COUNT = "4.5.3"       # X.5.3 wrong number of recipients: none given, or past the hop's limit
UNPARSABLE = "4.6.0"            # X.6.0 other media error: the parser gave up (on_parse_error = tempfail)
UNSIGNABLE = "5.6.0"            #   the same for good: a header block DKIM signing cannot take ([[dkim]])

# The exit statuses a sendmail command uses for a message or address it will never accept.
SENDMAIL_REFUSALS = {65: "5.6.0", 67: "5.1.1", 68: "5.1.2", 69: "5.0.0"}


def of_error(error: BaseException) -> str:
    """The code for the machine's own trouble: a full disk or quota, or no memory left, is
    4.3.1; anything else 4.3.0.  Never the message's fault, so always a retry."""
    if isinstance(error, MemoryError) or getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return SYSTEM_FULL
    return LOCAL_TROUBLE


class Stop(Exception):
    """Ends a run early with an exit status and the line the MTA puts into its DSN."""

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(f"{status} {text}")
        self.code, self.status, self.text = code, status, text


def tempfail(status: str, text: str) -> Stop:
    return Stop(EX_TEMPFAIL, status, text)
