"""The listening sockets: the client's Unix socket and the LMTP and SMTP listeners, each
bound here with its final mode and owner, or handed over by systemd."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ispmailgate_filters.base import ConfigError

from .master import HaltServer
from .section import ServeSettings, listen_address
from .children import Identity

KINDS = ("client", "lmtp", "smtp")      # what is spoken on it: ispmailgate-client's protocol, LMTP, SMTP


class Listener:
    """One listening socket: bound here, or handed over by systemd (then it is not ours)."""

    def __init__(self, sock: socket.socket, kind: str, address: str, owned: bool) -> None:
        self.sock, self.kind, self.address, self.owned = sock, kind, address, owned
        self.inet = sock.family in (socket.AF_INET, socket.AF_INET6)
        self.path = address.removeprefix("unix:") if owned and not self.inet else ""

    def close(self) -> None:
        """Unlink first: from now on clients cannot connect and fall back or defer."""
        if self.owned and self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.owned = False
        self.sock.close()


def addresses(settings: ServeSettings) -> dict[str, str]:
    """What each kind listens on, as configured: the client's socket is a bare path."""
    found = {"client": f"unix:{settings.socket}" if settings.socket else "",
             "lmtp": settings.lmtp, "smtp": settings.smtp}
    return {kind: address for kind, address in found.items() if address}


def open_listeners(settings: ServeSettings, identity: Identity | None) -> list[Listener]:
    """Every configured listener (systemd's where it passed one); at least one."""
    listeners = _from_systemd()
    try:
        for kind, address in addresses(settings).items():
            if all(listener.kind != kind for listener in listeners):
                listeners.append(_bind(kind, address, settings, identity))
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    if not listeners:
        raise HaltServer('nothing to listen on: serve.socket, serve.lmtp and serve.smtp are all ""')
    return listeners


def _from_systemd() -> list[Listener]:
    """sd_listen_fds(3): the sockets systemd passed, by FileDescriptorName= (client, lmtp,
    smtp); a single socket without such a name is the client's, as before LMTP."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or not os.environ.get("LISTEN_FDS", "").isdigit():
        return []
    count = int(os.environ["LISTEN_FDS"])
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    listeners = []
    for index in range(count):
        name = names[index] if index < len(names) else ""
        kind = name if name in KINDS else "client" if count == 1 else None
        if kind is None:
            raise HaltServer(f"systemd passed a socket named {name!r}: name each one client, lmtp "
                             "or smtp (FileDescriptorName=)")
        sock = socket.socket(fileno=3 + index)
        sock.setblocking(False)
        listeners.append(Listener(sock, kind, f"systemd:{name or kind}", owned=False))
    return listeners


def _bind(kind: str, address: str, settings: ServeSettings, identity: Identity | None) -> Listener:
    family, where, port = listen_address(address) or ("", "", 0)
    sock = _bind_unix(where, settings, identity) if family == "unix" else _bind_inet(where, port)
    sock.listen(128)
    sock.setblocking(False)
    return Listener(sock, kind, address, owned=True)


def _bind_inet(host: str, port: int) -> socket.socket:
    [(family, kind, proto, _, place), *_] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(place)
    except OSError:
        sock.close()
        raise
    return sock


def _bind_unix(path: str, settings: ServeSettings, identity: Identity | None) -> socket.socket:
    from ispmailgate_filters.files import refuse_untrusted_directories

    Path(path).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    refuse_untrusted_directories(path)      # as root: nobody else may swap what is bound
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bound with its final mode (never wider, not even for a moment), and owned with
    # lchown: neither chmod nor chown of a path, which would follow a planted link.
    old_umask = os.umask(0o777 & ~settings.socket_mode | 0o111)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    _set_owner(path, settings, identity)
    return sock


def _remove_stale_socket(path: str) -> None:
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
