"""Exits without a proxy: connect to the destination itself, or refuse it."""

from __future__ import annotations

from ...core import outcome
from ...core.netutil import Endpoint
from ...core.nio import Stream
from .base import Dialer, UpstreamError


class DirectDialer(Dialer):
    @property
    def upstream(self) -> Endpoint | None:
        return None

    def dial(self, dest: Endpoint, wire: bytes | None = None) -> Stream:
        return self.connect(dest.host, dest.port)

    def probe(self, target: Endpoint | None) -> None:
        """Without a target there is nothing of ours to check."""
        if target is not None:
            self.dial(target).close()


class RejectDialer(Dialer):
    @property
    def upstream(self) -> Endpoint | None:
        return None

    def dial(self, dest: Endpoint, wire: bytes | None = None) -> Stream:
        raise UpstreamError(outcome.DEST_REFUSED, "rejected by configuration (reject://)")

    def probe(self, target: Endpoint | None) -> None:
        return None
