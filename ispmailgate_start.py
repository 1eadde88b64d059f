"""The ``ispmailgate`` console script: starts the gate, or exits 75 when it cannot even load.

The gate's own last guard (``ispmailgate.run``) turns every failure into exit 75 and a
status line, but it exists only once ``ispmailgate`` and everything it imports have
loaded.  A broken installation — a dependency missing after an upgrade, a module that no
longer imports — would otherwise end in a traceback and exit 1, and Postfix's pipe(8)
bounces every message on 1.  Here such a failure keeps the mail queued instead: 75 and
one status line on stderr, the same line in syslog, nothing else.  Keep this module to
the standard library's built-ins: it must load when nothing else does.
"""

import sys

# Copies of ispmailgate_core.status's, which this module must not import (tests/test_layout.py
# holds them equal).
EX_TEMPFAIL, LOCAL_TROUBLE = 75, "4.3.0"


def main() -> int:
    """Console-script entry point: ``ispmailgate``."""
    try:
        from ispmailgate import main as gate
    except BaseException as error:      # noqa: BLE001 -- whatever broke, the MTA must retry
        return cannot_start(error)
    return gate()


def cannot_start(error: BaseException) -> int:
    text = " ".join(f"ispmailgate cannot start: {error!r}".split())[:400]
    try:
        import syslog
        syslog.openlog("ispmailgate", syslog.LOG_PID, syslog.LOG_MAIL)
        syslog.syslog(syslog.LOG_ERR, text)
    except Exception:                   # noqa: BLE001 -- no syslog: stderr still says it
        pass
    try:
        sys.stderr.write(f"{LOCAL_TROUBLE} {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass
    return EX_TEMPFAIL


if __name__ == "__main__":
    sys.exit(main())
