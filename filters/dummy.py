"""dummy: passes every message through untouched (the default chain)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Context, Filter
from .mime import Message


@dataclass(frozen=True)
class Dummy(Filter):
    """Does nothing, so the core delivers the original bytes."""

    name = "dummy"
    description = "pass the message through unchanged"
    changes_messages = False
    unparsed_mail = "process"       # it does nothing to any message

    def process(self, message: Message, ctx: Context) -> None:
        return None
