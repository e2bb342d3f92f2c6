"""SOCKS4 and its 4a extension: IPv4 addresses, or a name after 0.0.0.x."""

from __future__ import annotations

import ipaddress
import struct

from ..core.netutil import Endpoint
from . import ProtocolError, Reader

VERSION = 4
CMD_CONNECT = 1
GRANTED = 0x5A
REJECTED = 0x5B
REPLIES = {
    0x5A: "request granted",
    0x5B: "request rejected or failed",
    0x5C: "rejected: identd unreachable",
    0x5D: "rejected: identd user mismatch",
}


class NeedsName(ValueError):
    """The destination is not IPv4 and plain SOCKS4 cannot name it."""


def connect_request(dest: Endpoint, userid: str = "", allow_domain: bool = True) -> bytes:
    """Encode a CONNECT; non-IPv4 hosts use the 4a extension when allowed."""
    head = struct.pack("!BBH", VERSION, CMD_CONNECT, dest.port)
    user = userid.encode() + b"\0"
    try:
        ip = ipaddress.ip_address(dest.host)
    except ValueError:
        ip = None
    # 0.0.0.x (x != 0) is how 4a announces a name: such an address can only travel as a name.
    if ip is not None and ip.version == 4 and not (ip.packed[:3] == b"\0\0\0" and ip.packed[3]):
        return head + ip.packed + user
    if not allow_domain:
        raise NeedsName(f"socks4 cannot reach {dest.host} (IPv4 only; use socks4a or socks5)")
    return head + b"\0\0\0\x01" + user + dest.host.encode("idna") + b"\0"


def read_reply(read: Reader) -> int:
    vn, cd, _port, _ip = struct.unpack("!BBH4s", read(8))
    if vn != 0:
        raise ProtocolError(f"socks4 bad reply version {vn:#04x}")
    return cd
