"""A filter for the serve tests, loaded by the server as ``serve_test_filters:Pause``."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ispmailgate_filters.base import Filter, option


@dataclass(frozen=True)
class Pause(Filter):
    """Leaves a file in ``folder`` when it starts, then waits while ``folder/hold`` exists.

    Lets a test catch a worker in the middle of a message, then let it go.
    """

    name = "pause"
    folder: str = option("", "where the start markers go and the hold file is looked for")
    seconds: float = option(60.0, "the longest it waits")

    def process(self, message, ctx) -> None:
        folder = Path(self.folder)
        (folder / f"started-{os.getpid()}-{time.monotonic_ns()}").write_text(ctx.message_id)
        deadline = time.monotonic() + self.seconds
        while (folder / "hold").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
