"""The master: keeps the doorkeeper and the right number of workers alive, reloads, stops;
signals only queue work for its loop.  It never reads a byte a client sent."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ispmailgate_filters.base import ConfigError

from ..process import preload
from ..rules import Config, load_config
from ..status import EX_CONFIG, EX_OK
from .children import BOOT_ERROR, Heartbeat, Identity, end_all
from .doorkeeper import Doorkeeper
from .handoff import channel
from .section import ServeSettings, settings_of
from .session import Limits
from .worker import Service, Worker

log = logging.getLogger("ispmailgate.serve")


class HaltServer(Exception):
    def __init__(self, reason: str, status: int = EX_CONFIG) -> None:
        super().__init__(reason)
        self.reason, self.status = reason, status


class Arbiter:
    """Keeps the doorkeeper and the workers alive; signals only queue work for the loop."""

    SIGNALS = ("HUP", "TERM", "INT", "QUIT", "CHLD")

    def __init__(self, config: Config, config_path: Path | None, settings: ServeSettings,
                 listeners: list, overrides: dict[str, Any], service: Service) -> None:
        self.config, self.config_path, self.settings = config, config_path, settings
        self.listeners, self.overrides, self.service = listeners, overrides, service
        self.identity = Identity.for_workers(config)
        self.workers: dict[int, Worker | Doorkeeper] = {}      # every child, the doorkeeper too
        # Made before the first fork, so that every child forked later finds them.
        self.queue_in, self.queue_out = channel()
        self.returns_in, self.returns_out = channel()
        self.generation = 0
        self.queue: list[str] = []
        self.wake_read, self.wake_write = os.pipe()
        for fd in (self.wake_read, self.wake_write):
            os.set_blocking(fd, False)

    def run(self, ready) -> int:
        for name in self.SIGNALS:
            signal.signal(getattr(signal, "SIG" + name), self._queue_signal)
        self.spawn_missing()
        ready()
        log.info("serving on %s with %d workers (pid %d)",
                 ", ".join(f"{listener.kind} {listener.address}" for listener in self.listeners),
                 self.settings.workers, os.getpid())
        try:
            while True:
                name = self.queue.pop(0) if self.queue else None
                if name is None:
                    self.sleep()
                    self.murder_stale()
                    self.spawn_missing()
                elif name in ("TERM", "INT", "QUIT"):
                    return self.stop(graceful=name != "QUIT")
                else:
                    getattr(self, "handle_" + name.lower())()
        except HaltServer as halt:
            log.error("stopping: %s", halt.reason)
            self.stop(graceful=False)
            return halt.status

    def _queue_signal(self, signum, frame) -> None:
        if len(self.queue) < 10:
            self.queue.append(signal.Signals(signum).name[3:])
        try:
            os.write(self.wake_write, b".")
        except OSError:
            pass

    def sleep(self) -> None:
        import select

        ready, _, _ = select.select([self.wake_read], [], [], 1.0)
        if ready:
            while True:
                try:
                    if not os.read(self.wake_read, 512):
                        return
                except OSError:      # drained (EAGAIN)
                    return

    # -- signals ---------------------------------------------------------------------------

    def handle_chld(self) -> None:
        """Reap; a child that died is replaced by the loop, one that cannot boot stops all.
        Whatever a child started dies with it: its process group is killed while the dead
        child, not yet reaped, still holds the group's number."""
        while True:
            try:
                dead = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if dead is None:
                return
            pid = dead.si_pid
            worker = self.workers.pop(pid, None)
            if worker is not None:
                end_all(pid, worker.heartbeat)
            _, status = os.waitpid(pid, 0)
            if worker is None:
                continue
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == BOOT_ERROR:
                raise HaltServer(f"{worker.role} {pid} failed to boot")
            if os.WIFSIGNALED(status) and worker.stop_by is None:
                log.error("%s %d was killed by signal %d; replacing it", worker.role, pid, os.WTERMSIG(status))
            elif os.WIFEXITED(status) and os.WEXITSTATUS(status) != EX_OK:
                log.error("%s %d exited with status %d; replacing it", worker.role, pid, os.WEXITSTATUS(status))

    def handle_hup(self) -> None:
        """Re-read the rule file; workers with the new one replace the old gracefully."""
        notify("RELOADING=1")
        try:
            config = load_config(self.config_path)
            settings = settings_of(config.sections).with_overrides(**self.overrides)
            identity = Identity.for_workers(config)
            preload(config)
        except (Exception, SystemExit) as error:    # a plugin may fail in its own way, even by
            # calling sys.exit() at import: refuse the new rule file, never die
            log.error("reload refused, still serving the previous rule file: %s", error,
                      exc_info=not isinstance(error, ConfigError))
            notify("READY=1")
            return
        for key in ("socket", "lmtp", "smtp"):
            if getattr(settings, key) != getattr(self.settings, key):
                log.warning("serve.%s changed: takes effect at the next start, not on reload", key)
                settings = settings.with_overrides(**{key: getattr(self.settings, key)})
        self.config, self.settings, self.identity = config, settings, identity
        self.generation += 1
        self.spawn_missing()
        for pid, worker in list(self.workers.items()):
            if worker.generation < self.generation:         # the doorkeeper: to its successor
                self.ask_to_stop(pid, worker, signal.SIGUSR1 if worker.role == "doorkeeper" else signal.SIGTERM)
        log.info("reloaded %s: %d new workers", self.config.path, settings.workers)
        notify("READY=1")

    # -- workers ---------------------------------------------------------------------------

    def spawn_missing(self) -> None:
        current = [w for w in self.workers.values() if w.generation == self.generation]
        if not any(w.role == "doorkeeper" for w in current):
            self.spawn(self.doorkeeper())
        for _ in range(self.settings.workers - sum(w.role == "worker" for w in current)):
            self.spawn(self.worker())

    def worker(self) -> Worker:
        import random

        recycled_after = (self.settings.max_requests + random.randint(0, self.settings.max_requests_jitter)
                          if self.settings.max_requests else 0)
        return Worker(self.queue_out, self.returns_in, self.service, self.config, self.settings,
                      self.identity, Heartbeat(), recycled_after, self.generation)

    def doorkeeper(self) -> Doorkeeper:
        import socket

        limits = Limits(self.config.helo_name or socket.gethostname() or "localhost",
                        self.config.max_message_size, self.settings.max_recipients,
                        self.config.on_oversize == "reject")
        return Doorkeeper(self.listeners, self.queue_in, self.returns_out, self.returns_in, self.settings,
                          limits, self.identity, Heartbeat(), self.generation)

    def spawn(self, child: Worker | Doorkeeper) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            try:
                os.setpgid(pid, pid)        # the child does too: whoever is first
            except OSError:
                pass
            child.pid = pid
            self.workers[pid] = child
            return
        status = 1
        try:
            self._close_in_child(child)
            status = child.run()
        except BaseException as error:      # never fall back into the master's code
            log.error("%s %d crashed: %r", child.role, os.getpid(), error, exc_info=True)
        finally:
            logging.shutdown()
            os._exit(status)

    def _close_in_child(self, child: Worker | Doorkeeper) -> None:
        """What the child has no business with: the master's wake-up pipe, and the ends
        and listeners that are the other kind of child's."""
        os.close(self.wake_read)
        os.close(self.wake_write)
        unused = ([self.queue_out.end] if child.role == "doorkeeper" else
                  [self.queue_in.end, self.returns_out.end, *(listener.sock for listener in self.listeners)])
        for sock in unused:
            sock.close()

    def ask_to_stop(self, pid: int, worker: Worker | Doorkeeper, signum: int = signal.SIGTERM) -> None:
        if worker.stop_by is None:
            worker.stop_by = time.monotonic() + self.settings.graceful_timeout
            self.kill(pid, signum)

    def murder_stale(self) -> None:
        """Kill children stuck past worker_timeout, or past graceful_timeout once asked to
        stop, with everything they started."""
        now = time.monotonic()
        for pid, worker in list(self.workers.items()):
            if worker.stop_by is not None and now > worker.stop_by:
                log.error("%s %d did not finish within graceful_timeout; killing it", worker.role, pid)
                self.kill(pid, signal.SIGKILL)
            elif worker.heartbeat.age() > self.settings.worker_timeout:
                log.error("%s %d silent for %.0f s (worker_timeout); killing it", worker.role, pid,
                          worker.heartbeat.age())
                self.kill(pid, signal.SIGKILL)

    def kill(self, pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            self.workers.pop(pid, None)
            return
        if signum == signal.SIGKILL and pid in self.workers:
            end_all(pid, self.workers[pid].heartbeat)

    def stop(self, graceful: bool) -> int:
        """Stop accepting, let the workers finish their messages (or kill them), then exit."""
        for listener in self.listeners:
            listener.close()
        notify("STOPPING=1")
        log.info("stopping (%s)", "draining the workers" if graceful else "at once")
        for pid, worker in list(self.workers.items()):
            if graceful:
                self.ask_to_stop(pid, worker)
            else:
                self.kill(pid, signal.SIGKILL)
        while self.workers:
            if "QUIT" in self.queue:
                self.queue.clear()
                for pid in list(self.workers):
                    self.kill(pid, signal.SIGKILL)
            self.handle_chld_quietly()
            self.murder_stale()
            time.sleep(0.05)
        log.info("stopped")
        return EX_OK

    def handle_chld_quietly(self) -> None:
        try:
            self.handle_chld()
        except HaltServer:
            pass


def notify(state: str) -> None:
    """sd_notify(3) for Type=notify; nothing without $NOTIFY_SOCKET."""
    import socket

    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as error:
        log.warning("cannot notify systemd at %s: %s", address, error)
