"""HTTP/1.1 CONNECT: the request and the status line of its response."""

from __future__ import annotations

import base64
import re

from ..core.names import format_hostport
from ..core.netutil import Endpoint
from . import ProtocolError

MAX_HEADER = 16 * 1024
HEADER_END = b"\r\n\r\n"
MAX_INTERIM = 8  # 1xx responses a proxy may send before the final one
SWITCHING_PROTOCOLS = 101

# A bytes pattern: [0-9] is ASCII only ("\xb2" is a digit to str.isdigit, not to int()).
_STATUS_LINE = re.compile(rb"HTTP/1\.[0-9] ([0-9]{3})(?: ([^\r\n]*))?")


def connect_request(dest: Endpoint, username: str | None = None, password: str | None = None) -> bytes:
    target = format_hostport(dest.host, dest.port)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if username is not None:
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_status(header: bytes) -> tuple[int, str]:
    """(status code, reason phrase) from a response header; ProtocolError for anything else."""
    line = header.split(b"\r\n", 1)[0]
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise ProtocolError(f"http bad status line {line[:80].decode('latin-1')!r}")
    return int(match[1]), (match[2] or b"").decode("latin-1")


def is_interim(code: int) -> bool:
    """A 1xx response that precedes the final one (RFC 9110 15.2); 101 is final (we asked no upgrade)."""
    return 100 <= code < 200 and code != SWITCHING_PROTOCOLS
