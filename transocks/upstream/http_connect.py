"""HTTP CONNECT client: any 2xx opens the tunnel; the header is read without eating tunnel bytes."""

from __future__ import annotations

import base64
import socket

from .. import nio, outcome
from ..netutil import Endpoint, format_hostport
from .base import Dialer, ProtocolError, UpstreamError

MAX_HEADER = 16 * 1024
_END = b"\r\n\r\n"


def connect_request(dest: Endpoint, username: str | None = None, password: str | None = None) -> bytes:
    target = format_hostport(dest.host, dest.port)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if username is not None:
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response_header(sock: socket.socket, limit: int = MAX_HEADER) -> bytes:
    """Consume exactly the response header: peek, then take only header bytes."""
    head = bytearray()
    while True:
        data = nio.peek_some(sock, limit - len(head) + 3)
        if not data:
            raise EOFError(f"proxy closed after {len(head)} header bytes")
        tail = bytes(head[-3:])
        pos = (tail + data).find(_END)
        if pos >= 0:
            take = pos + len(_END) - len(tail)
            head += nio.recv_exact(sock, take)
            return bytes(head)
        if len(head) + len(data) > limit:
            raise ProtocolError(f"http response header exceeds {limit} bytes")
        head += nio.recv_exact(sock, len(data))


def parse_status(header: bytes) -> tuple[int, str]:
    line = header.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
        raise ProtocolError(f"http bad status line {line[:80]!r}")
    return int(parts[1]), parts[2] if len(parts) > 2 else ""


def status_error(code: int, reason: str) -> UpstreamError:
    if code in (401, 407):  # tinyproxy answers 401 where RFC 9110 says 407
        kind = outcome.AUTH_FAILED
    elif code in (502, 503, 504):
        kind = outcome.DEST_UNREACHABLE
    else:
        kind = outcome.UPSTREAM_REFUSED
    return UpstreamError(kind, f"http CONNECT status {code} {reason}".rstrip())


class HttpConnectDialer(Dialer):
    def handshake(self, sock: socket.socket, dest: Endpoint) -> None:
        nio.sendall(sock, connect_request(dest, self.url.username, self.url.password))
        code, reason = parse_status(read_response_header(sock))
        if not 200 <= code < 300:
            raise status_error(code, reason)
