"""SOCKS4 and SOCKS4a client: IPv4 addresses, or a name after 0.0.0.x (4a)."""

from __future__ import annotations

import ipaddress
import socket
import struct

from .. import nio, outcome
from ..netutil import Endpoint
from .base import Dialer, ProtocolError, Reader, UpstreamError, reader

CMD_CONNECT = 1
GRANTED = 0x5A
REPLIES = {
    0x5A: "request granted",
    0x5B: "request rejected or failed",
    0x5C: "rejected: identd unreachable",
    0x5D: "rejected: identd user mismatch",
}


def connect_request(dest: Endpoint, userid: str = "", allow_domain: bool = True) -> bytes:
    """Encode a CONNECT; non-IPv4 hosts use the 4a extension when allowed."""
    head = struct.pack("!BBH", 4, CMD_CONNECT, dest.port)
    user = userid.encode() + b"\0"
    try:
        ip = ipaddress.ip_address(dest.host)
    except ValueError:
        ip = None
    if ip is not None and ip.version == 4:
        return head + ip.packed + user
    if not allow_domain:
        raise UpstreamError(outcome.UPSTREAM_REFUSED, f"socks4 cannot reach {dest.host} (IPv4 only; use socks4a or socks5)")
    return head + b"\0\0\0\x01" + user + dest.host.encode("idna") + b"\0"


def read_reply(read: Reader) -> int:
    vn, cd, _port, _ip = struct.unpack("!BBH4s", read(8))
    if vn != 0:
        raise ProtocolError(f"socks4 bad reply version {vn:#04x}")
    return cd


class Socks4Dialer(Dialer):
    def handshake(self, sock: socket.socket, dest: Endpoint) -> None:
        request = connect_request(dest, self.url.username or "", allow_domain=self.url.scheme == "socks4a")
        nio.sendall(sock, request)
        cd = read_reply(reader(sock))
        if cd != GRANTED:
            text = REPLIES.get(cd, "unknown reply code")
            kind = outcome.AUTH_FAILED if cd in (0x5C, 0x5D) else outcome.UPSTREAM_REFUSED
            raise UpstreamError(kind, f"socks4 reply {cd:02x}: {text}")
