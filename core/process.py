"""The process of a run: privileges dropped before the message is read, everything imported
before that, and the wall-clock limit (with the signals that stop a run early)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from ispmailgate_filters.base import ConfigError

from .rules import Config, mail_identity
from .status import MISCONFIGURED, tempfail

log = logging.getLogger("ispmailgate")


def drop_privileges(config: Config) -> None:
    """Started as root: become mail_user/mail_group (default nobody), groups cleared.

    Called after the rule file is read and before the message is: nothing in a message is
    ever handled with root's rights.
    """
    if os.geteuid() != 0:
        return
    user, group = config.mail_user, config.mail_group
    try:
        identity = mail_identity(config)       # load_config checked it already, as check does
    except ConfigError as error:
        raise tempfail(MISCONFIGURED, f"config error: {config.path}: {error}") from None
    if identity is None:      # mail_user = "root", spelled out: allowed, never silently
        log.warning("mail_user is root: this message is handled with root's rights")
        return
    uid, gid = identity
    # the standard library's folder, and the one holding ispmailgate's own modules (site-packages,
    # or the pyz): this module is in ispmailgate_core/ below it
    if not readable_by(uid, gid, os.path.dirname(os.__file__), os.path.dirname(os.path.dirname(__file__))):
        log.debug("%s cannot read this Python installation: importing everything first", user)
        preload(config)
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as error:
        raise tempfail(MISCONFIGURED, f"cannot become {user}:{group or '-'}: {error}") from None
    if os.geteuid() == 0 or os.getegid() == 0 and gid != 0:
        raise tempfail(MISCONFIGURED, f"still root after switching to {user}")
    log.debug("running as %s (uid %d, gid %d)", user, os.getuid(), os.getgid())


def opened_as_mail_user(config: Config, opener: Callable[[], Any]) -> Any:
    """``opener()`` with the mail user's rights (effective ids only), for a process that
    stays root (the serve master): a file in a directory the mail user owns (the log
    directory of the man page's set-up) is opened as a one-shot run opens it, never as root
    through a path that user controls.  As anybody else, or with mail_user = "root": as is."""
    identity = mail_identity(config) if os.geteuid() == 0 else None
    if identity is None:
        return opener()
    groups, gid = os.getgroups(), os.getegid()
    os.setgroups([])
    os.setegid(identity[1])
    os.seteuid(identity[0])
    try:
        return opener()
    finally:
        os.seteuid(0)
        os.setegid(gid)
        os.setgroups(groups)


def readable_by(uid: int, gid: int, *directories: str) -> bool:
    """Can this user list and read these directories, every parent directory included?"""
    import stat

    for directory in directories:
        path = os.path.abspath(directory)
        while True:
            info = os.stat(path)
            bits = (stat.S_IRUSR | stat.S_IXUSR if info.st_uid == uid else
                    stat.S_IRGRP | stat.S_IXGRP if info.st_gid == gid else stat.S_IROTH | stat.S_IXOTH)
            if info.st_mode & bits != bits:
                return False
            if path == os.path.dirname(path):
                break
            path = os.path.dirname(path)
    return True


def preload(config: Config) -> None:
    """Import now whatever the run may import later: the core's lazy imports, every codec,
    each configured filter's modules, and with ``[arc]`` or ``[[dkim]]`` dkimpy and dnspython.

    Done before privileges are dropped (an interpreter installed under a private home is
    not readable by mail_user, and then nothing can be imported after the drop: a module
    that fails there is a filter error, an unsealed message, or a value silently left
    undecoded) and before ``serve`` forks its workers (load once).  tests/test_preload.py
    holds these lists to the code's imports and runs every built-in filter and ARC with
    imports forbidden after the drop.
    """
    import importlib

    for module in CORE_MODULES:
        importlib.import_module(module)
    _every_codec()
    for step in {*config.filters.values(), *config.default_chain,
                 *(step for rule in config.rules for step in rule.chain)}:
        step.preload()
    if "arc" in config.sections or "dkim" in config.sections:   # seals and signatures: dkimpy
        from .arc import preload as arc_modules
        arc_modules()
        importlib.import_module("ispmailgate_core.signing")
        importlib.import_module("ispmailgate_core.dkim_header")
        importlib.import_module("ispmailgate_core.dkim_linear").install()
    if any(table.key.kind == "ed25519" for table in config.sections.get("dkim", ())):
        importlib.import_module("nacl.signing")


# What the core imports lazily on the way of a run, after privileges are dropped (a served
# run included: its worker dropped them before its first message).
CORE_MODULES = (
    "_socket", "binascii", "collections", "email", "email.errors", "email.header", "email.message",
    "email.parser", "email.utils", "grp", "hashlib", "importlib.metadata", "io", "mmap", "pwd",
    "random", "select", "shutil", "signal", "socket", "stat", "struct", "subprocess", "syslog",
    "tempfile", "threading", "tomllib", "unicodedata", "urllib.parse",
    "ispmailgate_filters", "ispmailgate_filters.files", "ispmailgate_filters.kept", "ispmailgate_filters.mime",
    "ispmailgate_core.admin.dry_run", "ispmailgate_core.arc", "ispmailgate_core.delivery.reports",
    "ispmailgate_core.delivery.wire", "ispmailgate_core.serve.section")


def _every_codec() -> None:
    """Every codec of the standard library.  A message names its own charsets (Content-Type,
    RFC 2047 words, RFC 2231 values, any name Python knows), and a codec is a module loaded
    on its first lookup: one the mail user cannot load makes ``LookupError``, which a decoder
    takes for an unknown charset and quietly leaves the value undecoded."""
    import encodings
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(encodings.__path__):
        try:
            importlib.import_module(f"encodings.{module.name}")
        except ImportError:     # mbcs, oem: Windows only
            pass


class TimeLimitExceeded(BaseException):
    """Raised by SIGALRM in the middle of whatever the run was doing (a BaseException,
    like a verdict, so no ``except Exception`` on the way swallows it)."""


class Interrupted(BaseException):
    """SIGTERM, SIGINT or SIGHUP before the first delivery: the run stops, its children are
    killed on the way out (``finally``), and the MTA keeps the message (75)."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(f"stopped by {signal.Signals(signum).name} before delivery")


class time_limit:
    """Wall-clock limit for one message, with SIGALRM (main thread only, and only where
    SIGALRM's handler can be put back; elsewhere only :meth:`check` applies it).

    Until :meth:`shield` the alarm interrupts whatever runs.  From the first delivery on
    it no longer does: it must never land inside a transaction the next hop may already
    have accepted, so the limit is checked (:meth:`check`) before each delivery starts,
    and a delivery, bounded by ``delivery_timeout`` per step, runs to its end.  A
    terminating signal is treated alike when nobody else handles it (a one-shot run; a
    ``serve`` worker handles its own).
    """

    SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = float("inf")
        self.shielded = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "time_limit":
        import signal
        import threading

        self.deadline = time.monotonic() + self.seconds
        if threading.current_thread() is not threading.main_thread():
            return self
        if signal.getsignal(signal.SIGALRM) is None:
            # a handler installed from C (by a program embedding Python): signal.signal could
            # not put it back, so it is left alone, and only check() applies the limit
            return self
        self.previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._expired)
        for name in self.SIGNALS:
            number = getattr(signal, name)
            if signal.getsignal(number) in (signal.SIG_DFL, signal.default_int_handler):
                self.previous[number] = signal.signal(number, self._signalled)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.previous:
            import signal
            signal.setitimer(signal.ITIMER_REAL, 0)
            for number, handler in self.previous.items():
                signal.signal(number, handler)
            self.previous.clear()

    def shield(self) -> None:
        """From now on the alarm and signals no longer interrupt the run (see the class)."""
        self.shielded = True

    def check(self) -> None:
        if time.monotonic() >= self.deadline:
            raise TimeLimitExceeded()

    def _expired(self, signum, frame) -> None:
        if not self.shielded:
            raise TimeLimitExceeded()

    def _signalled(self, signum, frame) -> None:
        if not self.shielded:       # once delivering, the run finishes (each step is bounded)
            raise Interrupted(signum)
