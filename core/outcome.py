"""What happened to each recipient in the end."""

from __future__ import annotations

from typing import NamedTuple


class Result(NamedTuple):
    """What happened to one recipient in the end."""
    state: str          # sent | discarded | rejected | deferred | reported
    status: str
    text: str

    def describe(self) -> str:
        return f"{self.state} ({self.status} {self.text})" if self.text else self.state
