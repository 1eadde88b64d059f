"""The ``[serve]`` table of the rule file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ispmailgate_client import DEFAULT_SOCKET, FALLBACKS
from ispmailgate_filters.base import ConfigError, count, parse_size

from ..settings import Setting, one_of, positive, string


def _mode(value: Any) -> int:
    """A file mode as an integer (0o660 in TOML) or an octal string ("0660")."""
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ValueError(f"expected an octal mode like \"0660\", got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError(f"expected a mode between 0 and 0o777, got {value!r}")
    return value


def _listen_address(value: Any) -> str:
    """An address to listen on (see ``listen_address``), or the empty string: none."""
    if string(value) and listen_address(value) is None:
        raise ValueError(f'expected "unix:/path", "inet:host:port" or "", got {value!r}')
    return value


def listen_address(value: str) -> tuple[str, str, int] | None:
    """"unix:/absolute/path" as ("unix", path, 0), "inet:HOST:PORT" (IPv6: "inet:[::1]:PORT")
    as ("inet", host, port); None if ``value`` is neither."""
    kind, _, rest = value.partition(":")
    if kind == "unix" and rest.startswith("/") and "\0" not in rest and len(rest.encode()) < 108:
        return "unix", rest, 0
    host, _, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if kind == "inet" and host and port.isdigit() and 0 < int(port) < 65536 and "[" not in host:
        return "inet", host, int(port)
    return None


def _networks(value: Any) -> tuple[str, ...]:
    """Networks as "127.0.0.0/8" or single addresses ("::1"); checked, kept as written."""
    import ipaddress

    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of networks, like [\"127.0.0.0/8\", \"::1\"]")
    for network in value:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError as error:
            raise ValueError(f"not a network: {network!r} ({error})") from None
    return tuple(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


SERVE_SETTINGS: dict[str, Setting] = {
    "socket": Setting(DEFAULT_SOCKET, string, "Unix socket for ispmailgate-client (\"\": none), bound "
                      "with socket_mode at once; as root only in a directory nobody else can change."),
    "lmtp": Setting("", _listen_address, "LMTP listener for the MTA, \"unix:/path\" or \"inet:host:port\" "
                    "(--lmtp overrides; \"\": none): a status per recipient."),
    "smtp": Setting("", _listen_address, "SMTP listener for MTAs without LMTP, \"unix:/path\" or "
                    "\"inet:host:port\" (--smtp overrides; \"\": none): one status per transaction."),
    "inet_clients": Setting(["127.0.0.0/8", "::1"], _networks,
                            "Networks an inet: listener takes connections from; others are closed at once."),
    "socket_mode": Setting(0o660, _mode, "Permissions of the socket (who may hand in mail)."),
    "socket_user": Setting("", string, "Owner of the socket (default: the server's user)."),
    "socket_group": Setting("", string,
                            "Group of the socket (default: mail_group when started as root)."),
    "pid_file": Setting("", string, "Write the master's pid here (--pidfile overrides): "
                        "replaced atomically, never through a link, in a directory only root can change."),
    "workers": Setting(2, count(1, 1024), "Worker processes, 1 to 1024 (--workers overrides)."),
    "max_requests": Setting(1000, count(0), "Messages a worker handles before it is replaced (0: never)."),
    "max_requests_jitter": Setting(50, count(0, 1_000_000),
                                   "Up to this many more, at random, so workers are not replaced together."),
    "head_timeout": Setting(5.0, positive,
                            "Seconds a new connection may take to send its request head (arguments); "
                            "until then it waits without holding a worker, then it is closed."),
    "read_timeout": Setting(30.0, positive, "Seconds to wait for each read from a client."),
    "request_timeout": Setting(600.0, positive,
                               "Seconds a client may take to send its whole request."),
    "max_request_size": Setting(64 * 1024 * 1024, parse_size,
                                "Largest request (arguments and message) a worker reads; over it: 75."),
    "graceful_timeout": Setting(300.0, positive,
                                "On stop or reload, seconds a worker may take to finish its message."),
    "worker_timeout": Setting(900.0, positive,
                              "A worker silent this long (one message taking longer) is killed."),
    "fallback": Setting("oneshot", one_of(*FALLBACKS),
                        "What ispmailgate-client does when the server is down: oneshot or tempfail."),
    "max_recipients": Setting(1000, count(1, 1_000_000),
                              "LMTP and SMTP: recipients per transaction; past them 452 (the MTA sends the rest later)."),
    "command_timeout": Setting(300.0, positive,
                               "LMTP and SMTP: seconds a session may wait for its next command (idle "
                               "sessions between messages too); they never hold a worker."),
    "data_timeout": Setting(180.0, positive, "LMTP and SMTP: seconds to wait for each read of a message."),
    "connections_per_worker": Setting(10, count(1, 10_000),
                                      "Connections held at once, all listeners together, per worker; past "
                                      "them new ones are refused (421) or closed (the client falls back)."),
    "client_options": Setting("restricted", one_of("restricted", "any"),
                              "restricted: the server declines, for users other than root and mail_user, "
                              "--stdout, --mail-host, --tmp-dir, --dry-run, shell mode and check/explain."),
    "other_rule_files": Setting(True, _boolean,
                                "May a request name another rule file than the server's (only one root "
                                "alone can change, unless the client is mail_user)? false: declined."),
}


@dataclass(frozen=True)
class ServeSettings:
    """The ``[serve]`` table, checked when the rule file is read."""
    values: dict[str, Any] = field(default_factory=lambda: {k: s.default for k, s in SERVE_SETTINGS.items()})

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def with_overrides(self, **overrides: Any) -> ServeSettings:
        return replace(self, values={**self.values, **{k: v for k, v in overrides.items() if v is not None}})


def load_section(table: Any, where: str) -> ServeSettings:
    """The loader registered in ``rules.SECTIONS``; every error names its key path."""
    if not isinstance(table, dict):
        raise ConfigError(where, "expected a [serve] table")
    values = ServeSettings().values
    for key, value in table.items():
        if key not in SERVE_SETTINGS:
            raise ConfigError(f"{where}.{key}", f"unknown key (known: {', '.join(SERVE_SETTINGS)})")
        try:
            values[key] = SERVE_SETTINGS[key].convert(value)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{where}.{key}", str(error)) from None
    return ServeSettings(values)


def settings_of(sections: Mapping[str, Any]) -> ServeSettings:
    """The ``[serve]`` settings among a rule file's sections (``Config.sections``); the
    defaults where it has no ``[serve]``."""
    return sections.get("serve") or ServeSettings()
