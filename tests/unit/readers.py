"""Shared helpers for the unit tests."""

from __future__ import annotations

from collections.abc import Callable


def reader_of(data: bytes) -> Callable[[int], bytes]:
    """A SOCKS `Reader` over fixed bytes; `.rest` holds what was not read."""
    buf = bytearray(data)

    def read(n: int) -> bytes:
        if len(buf) < n:
            raise EOFError("short")
        out = bytes(buf[:n])
        del buf[:n]
        return out

    read.rest = buf  # type: ignore[attr-defined]
    return read
