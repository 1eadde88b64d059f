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


SERVE_SETTINGS: dict[str, Setting] = {
    "socket": Setting(DEFAULT_SOCKET, string, "Unix socket the workers accept on, bound with "
                      "socket_mode at once; as root only in a directory nobody else can change."),
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
