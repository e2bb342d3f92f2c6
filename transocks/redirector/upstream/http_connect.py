"""HTTP CONNECT dialer: any 2xx opens the tunnel; the header is read without eating tunnel bytes.

Interim 1xx responses (100 Continue, 102, 103 Early Hints) before the final
status are skipped, as RFC 9110 asks of a client; at most MAX_INTERIM of them.
"""

from __future__ import annotations

from ...core import nio, outcome
from ...core.netutil import Endpoint
from ...core.nio import Stream
from ...wire import ProtocolError
from ...wire.http import (
    HEADER_END,
    MAX_HEADER,
    MAX_INTERIM,
    connect_request,
    is_interim,
    parse_status,
)
from .base import Dialer, UpstreamError


def read_response_header(stream: Stream, limit: int = MAX_HEADER) -> bytes:
    """Consume exactly the response header: peek, then take only header bytes."""
    head = bytearray()
    while True:
        data = stream.peek_some(limit - len(head) + 3)
        if not data:
            raise EOFError(f"proxy closed after {len(head)} header bytes")
        tail = bytes(head[-3:])
        pos = (tail + data).find(HEADER_END)
        if pos >= 0:
            take = pos + len(HEADER_END) - len(tail)
            head += stream.recv_exact(take)
            return bytes(head)
        if len(head) + len(data) > limit:
            raise ProtocolError(f"http response header exceeds {limit} bytes")
        head += stream.recv_exact(len(data))


def status_error(code: int, reason: str) -> UpstreamError:
    if code in (401, 407):  # tinyproxy answers 401 where RFC 9110 says 407
        kind = outcome.AUTH_FAILED
    elif code in (502, 503, 504):
        kind = outcome.DEST_UNREACHABLE
    else:
        kind = outcome.UPSTREAM_REFUSED
    return UpstreamError(kind, f"http CONNECT status {code} {reason}".rstrip())


class HttpConnectDialer(Dialer):
    def handshake(self, stream: Stream, dest: Endpoint, wire: bytes | None = None) -> None:
        stream.sendall(connect_request(dest, self.url.username, self.url.password))
        stream.wait(nio.READ)  # the answer needs a round trip
        code, reason = parse_status(read_response_header(stream))
        interim = 0
        while is_interim(code):
            interim += 1
            if interim > MAX_INTERIM:
                raise ProtocolError(f"http more than {MAX_INTERIM} interim responses (last {code} {reason})".rstrip())
            code, reason = parse_status(read_response_header(stream))
        if not 200 <= code < 300:
            raise status_error(code, reason)
