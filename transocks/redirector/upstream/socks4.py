"""SOCKS4 and SOCKS4a dialer."""

from __future__ import annotations

from ...core import outcome
from ...core.netutil import Endpoint
from ...wire.socks4 import GRANTED, REPLIES, NeedsName, connect_request, read_reply
from .base import Claim, Dialer, UpstreamError, at_least
from .dial import Handshake

REPLY_SIZE = 8


class Socks4Dialer(Dialer):
    def handshake(self, dest: Endpoint, wire: bytes | None = None, claim: Claim | None = None) -> Handshake:
        try:
            request = connect_request(dest, self.url.username or "", allow_domain=self.url.scheme == "socks4a")
        except NeedsName as exc:
            raise UpstreamError(outcome.UPSTREAM_REFUSED, str(exc)) from None
        buf = yield from at_least(b"", REPLY_SIZE, "reply", request)
        cd = read_reply(lambda n: buf[:n])
        if cd != GRANTED:
            text = REPLIES.get(cd, "unknown reply code")
            kind = outcome.AUTH_FAILED if cd in (0x5C, 0x5D) else outcome.UPSTREAM_REFUSED
            raise UpstreamError(kind, f"socks4 reply {cd:02x}: {text}")
        return buf[REPLY_SIZE:]
