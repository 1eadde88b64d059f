"""Reading what a decompressor gives, a chunk at a time, never past a limit.

``stream.read(limit + 1)`` looks bounded but is not cheap: a buffered reader allocates the
whole ``limit + 1`` bytes before it reads one (a limit near the machine's memory turns
every archive into a MemoryError), and the gzip reader's pieces, its buffer and the
result come to about three times the output at the peak.  Here the output grows by at
most a chunk at a time into one buffer that is handed over without a copy.
"""

from __future__ import annotations

import io
from collections.abc import Callable

CHUNK = 1 << 20


def read_at_most(read: Callable[[int], bytes], limit: int) -> tuple[bytes, bool]:
    """(what ``read(n)`` gives, at most ``limit`` bytes of it; whether there was more)."""
    out = io.BytesIO()
    while out.tell() <= limit:
        chunk = read(min(CHUNK, limit + 1 - out.tell()))
        if not chunk:
            return out.getvalue(), False
        out.write(chunk)
    out.truncate(limit)
    return out.getvalue(), True
