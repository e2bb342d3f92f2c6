"""SOCKS4 and SOCKS4a dialer."""

from __future__ import annotations

from ...core import nio, outcome
from ...core.netutil import Endpoint
from ...core.nio import Stream
from ...wire.socks4 import GRANTED, REPLIES, NeedsName, connect_request, read_reply
from .base import Dialer, UpstreamError, reader


class Socks4Dialer(Dialer):
    def handshake(self, stream: Stream, dest: Endpoint, wire: bytes | None = None) -> None:
        try:
            request = connect_request(dest, self.url.username or "", allow_domain=self.url.scheme == "socks4a")
        except NeedsName as exc:
            raise UpstreamError(outcome.UPSTREAM_REFUSED, str(exc)) from None
        stream.sendall(request)
        stream.wait(nio.READ)  # the answer needs a round trip
        cd = read_reply(reader(stream))
        if cd != GRANTED:
            text = REPLIES.get(cd, "unknown reply code")
            kind = outcome.AUTH_FAILED if cd in (0x5C, 0x5D) else outcome.UPSTREAM_REFUSED
            raise UpstreamError(kind, f"socks4 reply {cd:02x}: {text}")
