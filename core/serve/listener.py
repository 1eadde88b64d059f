"""The listening socket: bound here with its final mode and owner, or handed over by systemd."""

from __future__ import annotations

import os
from pathlib import Path

from ispmailgate_filters.base import ConfigError

from .master import HaltServer
from .section import ServeSettings
from .worker import Identity


class Listener:
    """The listening socket: bound here, or handed over by systemd (then it is not ours)."""

    def __init__(self, sock, path: str, owned: bool) -> None:
        self.sock, self.path, self.owned = sock, path, owned

    @classmethod
    def open(cls, settings: ServeSettings, identity: Identity | None) -> Listener:
        import socket

        if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS") == "1":
            sock = socket.socket(fileno=3)          # sd_listen_fds(3): the first passed socket
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(name, None)
            sock.setblocking(False)
            return cls(sock, settings.socket, owned=False)
        from ispmailgate_filters.files import refuse_untrusted_directories

        path = settings.socket
        Path(path).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        refuse_untrusted_directories(path)      # as root: nobody else may swap what is bound
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound with its final mode (never wider, not even for a moment), and owned with
        # lchown: neither chmod nor chown of a path, which would follow a planted link.
        old_umask = os.umask(0o777 & ~settings.socket_mode | 0o111)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        _set_owner(path, settings, identity)
        sock.listen(128)
        sock.setblocking(False)
        return cls(sock, path, owned=True)

    def close(self) -> None:
        """Unlink first: from now on clients cannot connect and fall back or defer."""
        if self.owned:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.owned = False
        self.sock.close()


def _remove_stale_socket(path: str) -> None:
    import socket
    import stat

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise HaltServer(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)         # left behind by a server that died
            return
    raise HaltServer(f"another server is listening on {path}")


def _set_owner(path: str, settings: ServeSettings, identity: Identity | None) -> None:
    import grp
    import pwd

    uid = gid = -1
    try:
        if settings.socket_user:
            uid = pwd.getpwnam(settings.socket_user).pw_uid
    except KeyError:
        raise ConfigError("serve.socket_user", f"no such user: {settings.socket_user!r}") from None
    try:
        if settings.socket_group:
            gid = grp.getgrnam(settings.socket_group).gr_gid
        elif identity is not None:
            gid = identity.gid
    except KeyError:
        raise ConfigError("serve.socket_group", f"no such group: {settings.socket_group!r}") from None
    os.chown(path, uid, gid, follow_symlinks=False)
