"""The packer's codecs: the standard library's, or a command; unpacking always has a cap.

Decompression streams and stops one byte past the cap, so a small bomb never becomes a
large buffer.  Commands run from an argv list (never a shell) with the body on stdin;
their output is read in chunks and the command killed when it passes the cap or its
time.  Codec modules are imported only when used.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

# codec -> (file name suffix, media type of a packed part)
BUILTIN_CODECS = {
    "gzip": (".gz", "application/gzip"),
    "bzip2": (".bz2", "application/x-bzip2"),
    "xz": (".xz", "application/x-xz"),
}
_CHUNK = 1 << 16
_PROBE = 1 << 15


class UnpackError(Exception):
    """Data that could not be packed or unpacked: damaged, too large, or a failing command.

    ``environment`` is true when the cause is this machine (a command that cannot be
    started), not the message.
    """

    def __init__(self, reason: str, *, environment: bool = False) -> None:
        super().__init__(reason)
        self.environment = environment


class TooLarge(UnpackError):
    """Data that unpacks to more than its limit allows (the work up to the limit was done)."""


def compress(codec: str, data: bytes, level: int, command: tuple[str, ...] = (),
             run: dict | None = None) -> bytes:
    """``data`` packed with a built-in codec, or with ``command`` when one is given."""
    if command:
        return run_command(command, data, 2 * len(data) + _CHUNK, **(run or {}))
    if codec == "gzip":
        import gzip
        return gzip.compress(data, level, mtime=0)      # mtime 0: equal input, equal output
    if codec == "bzip2":
        import bz2
        return bz2.compress(data, level)
    if codec == "xz":
        import lzma
        return lzma.compress(data, preset=level)
    raise UnpackError(f"codec {codec!r} is not built in and no command was given")


def incompressible(data: bytes) -> bool:
    """True for a large body that a fast zlib pass over three slices cannot shrink by 2 %.

    Compressed or encrypted files outside ``skip_types`` are then not compressed in
    full only to be thrown away (xz spends seconds per 20 MB of random data).
    """
    if len(data) <= 3 * _PROBE:
        return False
    import zlib

    middle = len(data) // 2
    sample = data[:_PROBE] + data[middle:middle + _PROBE] + data[-_PROBE:]
    return len(zlib.compress(sample, 1)) * 100 > len(sample) * 98


def decompress(codec: str, data: bytes, limit: int, command: tuple[str, ...] = (),
               run: dict | None = None, why: str = "max_unpacked") -> bytes:
    """``data`` unpacked, at most ``limit`` bytes of it; more (``why``: the limit that says
    so), or damage, is an UnpackError.  The output grows a chunk at a time: a bomb stops
    one chunk past the limit, and nothing is allocated for a limit it never reaches."""
    from ..bounded import read_at_most

    if command:
        return run_command(command, data, limit, **(run or {}))
    opener, damage = _reader(codec)
    try:
        with opener(io.BytesIO(data)) as stream:
            out, more = read_at_most(stream.read, limit)
    except damage as error:
        raise UnpackError(f"damaged {codec} data: {error or type(error).__name__}") from None
    if more:
        raise TooLarge(f"unpacks to more than {limit} bytes ({why})")
    return out


def _reader(codec: str) -> tuple[Callable, tuple[type[BaseException], ...]]:
    """A streaming reader for ``codec`` and the errors that mean damaged data."""
    if codec == "gzip":
        import gzip
        import zlib
        return (lambda raw: gzip.GzipFile(fileobj=raw)), (OSError, EOFError, zlib.error)
    if codec == "bzip2":
        import bz2
        return bz2.BZ2File, (OSError, EOFError, ValueError)
    if codec == "xz":
        import lzma
        return lzma.LZMAFile, (lzma.LZMAError, EOFError)
    raise UnpackError(f"codec {codec!r} is not built in")


def run_command(command: tuple[str, ...], data: bytes, limit: int, *, timeout: float = 60.0,
                cwd: Callable[[], Path] | None = None) -> bytes:
    """Run ``command`` with ``data`` on stdin; its stdout, at most ``limit`` bytes.

    The command (and whatever it started) is killed and reaped on every way out: past
    ``limit`` or ``timeout``, and when the time limit or an exception ends the run."""
    import subprocess
    import threading

    from ..processes import end, kill, start

    try:
        process = start(list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, cwd=cwd() if cwd else None)
    except OSError as error:
        raise UnpackError(f"cannot run {command[0]}: {error.strerror or error}", environment=True) from None
    errors, expired = bytearray(), threading.Event()
    helpers = [threading.Thread(target=_feed, args=(process.stdin, data), daemon=True),
               threading.Thread(target=_drain, args=(process.stderr, errors), daemon=True)]
    for helper in helpers:
        helper.start()
    timer = threading.Timer(timeout, lambda: (expired.set(), kill(process)))
    timer.start()
    out, status = bytearray(), None
    try:
        while chunk := process.stdout.read(_CHUNK):
            out += chunk
            if len(out) > limit:
                break
        status = end(process, kill=len(out) > limit)       # the timer still bounds the wait
    finally:
        timer.cancel()
        if process.returncode is None:      # left by an exception: the command goes with it
            end(process, kill=True)
        for helper in helpers:
            helper.join(5)
        process.stdout.close()
    return _checked(command, bytes(out), limit, status, expired.is_set(), timeout, bytes(errors))


def _checked(command, out: bytes, limit: int, status: int, expired: bool, timeout: float,
             errors: bytes) -> bytes:
    if len(out) > limit:
        raise TooLarge(f"{command[0]} put out more than {limit} bytes")
    if expired:
        raise UnpackError(f"{command[0]} ran longer than {timeout:g} s")
    if status != 0:
        said = errors.decode("utf-8", "replace").strip().splitlines()
        raise UnpackError(f"{command[0]} exited with status {status}" + (f": {said[0][:200]}" if said else ""))
    return out


def _feed(stream, data: bytes) -> None:
    try:
        stream.write(data)
    except OSError:             # the command stopped reading (it failed, or was killed)
        pass
    finally:
        try:
            stream.close()
        except OSError:
            pass


def _drain(stream, errors: bytearray) -> None:
    while chunk := stream.read(_CHUNK):
        if len(errors) < 4096:
            errors += chunk[:4096]
    stream.close()
