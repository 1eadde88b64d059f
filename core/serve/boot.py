"""Starting the server: the rule file and every module once, the listeners, the pid file,
the daemon (or systemd's foreground service)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ispmailgate_filters.base import ConfigError

from ..logs import SyslogHandler
from ..process import opened_as_mail_user, preload
from ..rules import Config, find_config, load_config
from ..status import EX_CONFIG, EX_OK
from .children import Identity
from .listener import Listener, open_listeners
from .master import Arbiter, HaltServer, notify
from .section import settings_of
from .worker import Service

log = logging.getLogger("ispmailgate.serve")


def serve(config_path: Path | None, service: Service, *, socket: str | None = None,
          workers: int | None = None, pidfile: Path | None = None, foreground: bool = True,
          lmtp: str | None = None, smtp: str | None = None) -> int:
    """``ispmailgate serve``: returns the exit status (78 on a boot error)."""
    overrides = {"socket": socket, "workers": workers, "pid_file": str(pidfile) if pidfile else None,
                 "lmtp": lmtp, "smtp": smtp}
    try:
        config_path, config = _load(config_path, service)
        settings = settings_of(config.sections).with_overrides(**_checked(overrides))
        _configure_logging(config, foreground)
        listeners = open_listeners(settings, Identity.for_workers(config))
    except (ConfigError, HaltServer, OSError) as error:
        sys.stderr.write(f"ispmailgate serve: cannot start: {error}\n")
        return EX_CONFIG
    except Exception as error:      # a plugin whose preload fails: the rule file names it, 78 too
        sys.stderr.write(f"ispmailgate serve: cannot start: {error!r}\n")
        return EX_CONFIG
    role, ready_pipe = ("foreground", None) if foreground else daemonize()
    if role == "parent":
        return _parent_of_daemon(listeners, ready_pipe)
    pid_file = None
    try:
        pid_file = PidFile(settings.pid_file) if settings.pid_file else None
        arbiter = Arbiter(config, config_path, settings, listeners, overrides, service)
        return arbiter.run(lambda: _ready(ready_pipe))
    except (ConfigError, HaltServer, OSError) as error:
        log.error("cannot start: %s", error)
        return EX_CONFIG
    finally:
        for listener in listeners:
            listener.close()
        if pid_file is not None:
            pid_file.remove()


def _checked(overrides: dict) -> dict:
    """--lmtp and --smtp as the rule file's keys are checked."""
    from .section import SERVE_SETTINGS

    for key in ("lmtp", "smtp"):
        if overrides[key] is not None:
            try:
                SERVE_SETTINGS[key].convert(overrides[key])
            except ValueError as error:
                raise ConfigError(f"--{key}", str(error)) from None
    return overrides


def _load(path: Path | None, service: Service) -> tuple[Path | None, Config]:
    """The rule file, once; requests without -c (or with the same -c) use it as loaded."""
    _pin_search_paths()
    path = find_config(path)
    if path is not None:
        path = Path(os.path.abspath(path))
        os.environ["ISPMAILGATE_CONFIG"] = str(path)     # what a request without -c means
    else:
        os.environ.pop("ISPMAILGATE_CONFIG", None)
    config = load_config(path)
    preload(config)     # what runs import lazily: once, and before privileges go
    service.prepare()   # built once here, not in every worker
    return path, config


def _pin_search_paths() -> None:
    """Workers enter each client's directory: a relative entry of sys.path ("" under
    ``python -c``) or $PATH ("" or ".") would let that directory supply the modules a
    worker imports or the commands it runs.  Each is made absolute, as it means now."""
    sys.path[:] = [os.path.abspath(entry) for entry in sys.path]
    if "PATH" in os.environ:
        os.environ["PATH"] = os.pathsep.join(os.path.abspath(entry)
                                             for entry in os.environ["PATH"].split(os.pathsep))


def _configure_logging(config: Config, foreground: bool) -> None:
    for handler in list(log.handlers):
        log.removeHandler(handler)
    log.setLevel(logging.INFO)
    log.addHandler(SyslogHandler(config.facility))
    formatter = logging.Formatter("%(asctime)s ispmailgate-serve[%(process)d]: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)] if foreground else []
    if config.log_file and config.log_file != "-":
        from ispmailgate_filters.files import open_log_file

        stream = opened_as_mail_user(config, lambda: open_log_file(config.log_file))   # as a run opens it
        handlers.append(logging.StreamHandler(stream))
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)


class PidFile:
    """The master's pid, written atomically; removed at exit only if it is still ours.

    Written as root: under a random name, created exclusively, then renamed over the pid
    file (a rename never follows a symlink), in a directory only root can change; read
    never through a symlink, FIFO or device."""

    def __init__(self, path: str) -> None:
        from ispmailgate_filters.files import replace_file

        self.path = Path(path)
        other = self._running_pid()
        if other is not None and other != os.getpid():
            raise HaltServer(f"already running: pid {other} in {self.path}")
        replace_file(str(self.path), f"{os.getpid()}\n".encode())

    def _pid(self) -> int | None:
        from ispmailgate_filters.files import read_small

        try:
            text = read_small(str(self.path)).strip()
        except OSError:
            return None
        return int(text) if text.isdigit() and len(text) < 12 else None

    def _running_pid(self) -> int | None:
        pid = self._pid()
        try:
            if pid is not None and pid > 0:
                os.kill(pid, 0)
                return pid
        except OSError:
            pass
        return None

    def remove(self) -> None:
        if self._pid() == os.getpid():
            try:
                self.path.unlink()
            except OSError:
                pass


def daemonize() -> tuple[str, int]:
    """The classic double fork: ("parent", fd to read the daemon's report) in the process
    that was started, ("daemon", fd to report on) in the daemon."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    first = os.fork()
    if first:
        os.close(write_fd)
        os.waitpid(first, 0)
        return "parent", read_fd
    os.close(read_fd)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return "daemon", write_fd


def _parent_of_daemon(listeners: list[Listener], report_fd: int) -> int:
    """Exit 0 once the daemon is serving, 78 if it died on the way."""
    for listener in listeners:
        listener.owned = False      # the daemon owns the sockets now
        listener.sock.close()
    with os.fdopen(report_fd, "rb") as report:
        answer = report.read(len(READY))       # not to EOF: the workers hold the pipe too
    if answer == READY:
        return EX_OK
    sys.stderr.write("ispmailgate serve: the daemon failed to start (see the log)\n")
    return EX_CONFIG


READY = b"ready"


def _ready(ready_pipe: int | None) -> None:
    notify(f"READY=1\nMAINPID={os.getpid()}")
    if ready_pipe is not None:
        os.write(ready_pipe, READY)
        os.close(ready_pipe)
