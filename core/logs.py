"""The log: syslog (and log_file), every line of one message starting with its run id."""

from __future__ import annotations

import logging
import os
import sys

from .text import loggable, one_line

log = logging.getLogger("ispmailgate")


class SyslogHandler(logging.Handler):
    """Syslog through the C library (no socket juggling); one syslog line per text line."""

    PRIORITIES = {logging.DEBUG: "LOG_DEBUG", logging.INFO: "LOG_INFO", logging.WARNING: "LOG_WARNING",
                  logging.ERROR: "LOG_ERR", logging.CRITICAL: "LOG_CRIT"}

    def __init__(self, facility: str) -> None:
        import syslog

        super().__init__()
        self.syslog = syslog
        syslog.openlog("ispmailgate", syslog.LOG_PID, getattr(syslog, "LOG_" + facility.upper()))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            priority = getattr(self.syslog, self.PRIORITIES.get(record.levelno, "LOG_INFO"))
            for line in self.format(record).splitlines() or [""]:
                self.syslog.syslog(priority, loggable(line))
        except Exception:       # logging must never be what loses a message
            self.handleError(record)


class _Collector(logging.Handler):
    """Error lines kept for stderr, written after the status line the MTA reads first."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(one_line(record.getMessage()))


UNLOGGED = ("nothing of this run was logged: syslog is not reachable (nothing listens on /dev/log) "
            "and log_file is unset or cannot be opened (ispmailgate check says more)")


def syslog_reachable(path: str = "/dev/log", probe: bool = True) -> bool:
    """Does anything listen where syslog(3) sends its lines?  With no daemon (containers,
    minimal hosts) the C library drops every line without a word.  ``probe=False``, for
    every run: a socket there is taken for a daemon (a stat, no import, no connect)."""
    import stat

    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    if not probe:
        return True
    import _socket      # the C module: socket.py would cost its enum import

    for kind in (_socket.SOCK_DGRAM, _socket.SOCK_STREAM):
        probe = _socket.socket(_socket.AF_UNIX, kind)
        try:
            probe.connect(path)
            return True
        except OSError:
            continue
        finally:
            probe.close()
    return False


def configure_logging(facility: str, debug: bool, log_file: str, errors: list[str],
                      run_id: str = "") -> bool:
    """Syslog (and log_file); every line of one message starts with its run id.  False when
    the lines go nowhere: syslog unreachable, and no log_file (or one that cannot be opened)."""
    prefix = f"{run_id}: " if run_id else ""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        if not isinstance(handler, _Collector):
            handler.close()
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    logging.raiseExceptions = False     # a failing handler never writes a traceback to stderr
    syslog_handler = SyslogHandler(facility)
    syslog_handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    log.addHandler(syslog_handler)
    log.addHandler(_Collector(errors))
    log.addHandler(_Early())
    return (bool(log_file) and add_log_file(log_file, run_id)) or syslog_reachable(probe=False)


class _Early(logging.Handler):
    """Lines logged before log_file is open (it opens once privileges are dropped), for it."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 100:
            self.records.append(record)


class _FileLog(logging.StreamHandler):
    """The log_file handler: its lines made loggable as syslog's are, its stream closed with it."""

    def format(self, record: logging.LogRecord) -> str:
        return loggable(super().format(record))

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            super().close()


def add_log_file(log_file: str, run_id: str = "") -> bool:
    """Also log to ``log_file`` ("-": stderr); False when there is none or it cannot be
    opened.  A run calls this after it dropped root, so the file is opened as mail_user;
    opened as root it must pass ``open_log_file``."""
    early = [h for h in log.handlers if isinstance(h, _Early)]
    for buffer in early:
        log.removeHandler(buffer)
    if not log_file:
        return False
    from ispmailgate_filters.files import open_log_file

    try:
        handler = logging.StreamHandler(sys.stderr) if log_file == "-" else _FileLog(open_log_file(log_file))
    except OSError as error:
        log.warning("cannot open log_file %s: %s", log_file, error.strerror or error)
        return False
    prefix = f"{run_id}: " if run_id else ""
    handler.setFormatter(logging.Formatter("%(asctime)s ispmailgate[%(process)d]: " + prefix + "%(message)s"))
    handler.setLevel(log.level)
    for record in (record for buffer in early for record in buffer.records):
        handler.handle(record)
    log.addHandler(handler)
    return True
