"""Exits without a proxy: connect to the destination itself, or refuse it."""

from __future__ import annotations

import errno
from collections.abc import Callable

from ...core import nio, outcome
from ...core.netutil import Endpoint
from .base import Claim, Dialer, UpstreamError
from .dial import Dial, Expired, Handshake


class DirectDialer(Dialer):
    """The TCP connect is the whole tunnel; its failures are the destination's answers."""

    @property
    def upstream(self) -> Endpoint | None:
        return None

    def connect_to(self, dest: Endpoint | None) -> Endpoint:
        assert dest is not None
        return dest

    def addrs_for(self, dest: Endpoint | None) -> list[tuple[int, tuple]] | None:
        assert dest is not None
        return nio.literal_addresses(dest.host, dest.port, 0)

    def handshake(self, dest: Endpoint, wire: bytes | None = None, claim: Claim | None = None) -> Handshake | None:
        return None

    def probe(self, target: Endpoint | None) -> None:
        """Without a target there is nothing of ours to check."""
        if target is not None:
            self.dial(target).close()

    def failure(self, exc: BaseException, negotiating: bool, where: str) -> BaseException:
        if isinstance(exc, Expired):
            return UpstreamError(outcome.DEST_UNREACHABLE,
                                 f"connect to destination {where} timed out after {self.connect_timeout:g}s")
        if isinstance(exc, OSError):
            kind = outcome.DEST_REFUSED if exc.errno == errno.ECONNREFUSED else outcome.DEST_UNREACHABLE
            return UpstreamError(kind, f"connect to destination {where}: {exc.strerror or exc}")
        return exc


class RejectDialer(Dialer):
    @property
    def upstream(self) -> Endpoint | None:
        return None

    def begin(self, dest: Endpoint, wire: bytes | None, on_done: Callable[[Dial], None]) -> Dial:
        return Dial.refused(self, _rejected(), on_done)

    def dial(self, dest: Endpoint, wire: bytes | None = None) -> nio.Stream:
        raise _rejected()

    def probe(self, target: Endpoint | None) -> None:
        return None


def _rejected() -> UpstreamError:
    return UpstreamError(outcome.DEST_REFUSED, "rejected by configuration (reject://)")
