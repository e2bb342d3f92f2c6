"""HTTP CONNECT dialer: any 2xx opens the tunnel; bytes behind the header are the tunnel's first.

Interim 1xx responses (100 Continue, 102, 103 Early Hints) before the final
status are skipped, as RFC 9110 asks of a client; at most MAX_INTERIM of them.
"""

from __future__ import annotations

from ...core import outcome
from ...core.netutil import Endpoint
from ...wire import ProtocolError
from ...wire.http import (
    HEADER_END,
    MAX_HEADER,
    MAX_INTERIM,
    connect_request,
    is_interim,
    parse_status,
)
from .base import Claim, Dialer, UpstreamError, receive
from .dial import Handshake


def status_error(code: int, reason: str) -> UpstreamError:
    if code in (401, 407):  # tinyproxy answers 401 where RFC 9110 says 407
        kind = outcome.AUTH_FAILED
    elif code in (502, 503, 504):
        kind = outcome.DEST_UNREACHABLE
    else:
        kind = outcome.UPSTREAM_REFUSED
    return UpstreamError(kind, f"http CONNECT status {code} {reason}".rstrip())


class HttpConnectDialer(Dialer):
    def handshake(self, dest: Endpoint, wire: bytes | None = None, claim: Claim | None = None) -> Handshake:
        buf = yield from receive(b"", "response header", connect_request(dest, self.url.username, self.url.password))
        interim = 0
        while True:
            scanned = 0  # a header that trickles in is searched once, not once per byte
            while (end := buf.find(HEADER_END, scanned)) < 0:
                if len(buf) > MAX_HEADER:
                    raise ProtocolError(f"http response header exceeds {MAX_HEADER} bytes")
                scanned = max(0, len(buf) - len(HEADER_END) + 1)
                buf = yield from receive(buf, "response header")
            end += len(HEADER_END)
            if end > MAX_HEADER:
                raise ProtocolError(f"http response header exceeds {MAX_HEADER} bytes")
            code, reason = parse_status(buf[:end])
            buf = buf[end:]
            if not is_interim(code):
                break
            interim += 1
            if interim > MAX_INTERIM:
                raise ProtocolError(f"http more than {MAX_INTERIM} interim responses (last {code} {reason})".rstrip())
        if not 200 <= code < 300:
            raise status_error(code, reason)
        return buf
