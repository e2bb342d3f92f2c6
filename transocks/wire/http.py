"""HTTP/1.1 CONNECT: the request and the status line of its response."""

from __future__ import annotations

import base64

from ..core.netutil import Endpoint, format_hostport
from . import ProtocolError

MAX_HEADER = 16 * 1024
HEADER_END = b"\r\n\r\n"


def connect_request(dest: Endpoint, username: str | None = None, password: str | None = None) -> bytes:
    target = format_hostport(dest.host, dest.port)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if username is not None:
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_status(header: bytes) -> tuple[int, str]:
    line = header.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
        raise ProtocolError(f"http bad status line {line[:80]!r}")
    return int(parts[1]), parts[2] if len(parts) > 2 else ""
