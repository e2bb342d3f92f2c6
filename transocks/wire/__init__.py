"""SOCKS4/4a, SOCKS5 and HTTP CONNECT messages: bytes in, bytes out, no I/O.

Shared by the redirector's dialers (client side) and usocksd (server side).
Parsers take a ``read(n)`` callable that returns exactly n bytes, so a message
is read whole and never a byte of the tunnel behind it; the caller owns the
socket and the deadlines.
"""

from __future__ import annotations

from collections.abc import Callable

from ..core import outcome

Reader = Callable[[int], bytes]


class ProtocolError(outcome.Failure):
    """The peer's bytes are not the message the protocol says comes next."""

    def __init__(self, message: str) -> None:
        super().__init__(outcome.PROTOCOL_ERROR, message)

