"""The server side of SOCKS5 (RFC 1928, RFC 1929) and SOCKS4/4a on the wire.

Constants and the address encoder come from `transocks.wire`, which the
redirector's dialers use too; this module adds what a server
reads and writes.  Parsers take a ``read(n)`` callable that returns exactly n
bytes, so they read a message whole and never a byte of the tunnel behind it.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from ..core import outcome
from ..core.netutil import Endpoint
from ..wire import Reader, socks4, socks5

SOCKS4_VERSION = 4
AUTH_VERSION = 1
CMD_BIND = 2
CMD_UDP_ASSOCIATE = 3
COMMANDS = {socks5.CMD_CONNECT: "CONNECT", CMD_BIND: "BIND", CMD_UDP_ASSOCIATE: "UDP ASSOCIATE"}
SOCKS4_REJECTED = 0x5B
MAX_SOCKS4_FIELD = 255

# SOCKS5 reply codes (texts in socks5.REPLIES)
SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
TTL_EXPIRED = 0x06
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08

_NO_ADDRESS = Endpoint("0.0.0.0", 0)


class Malformed(Exception):
    """The client broke the protocol: close without a reply and log why."""


class NoRequest(Exception):
    """The client closed where a message would begin, after the method negotiation and before
    a request: what a health check does (greeting, method reply, close), not an error."""


class Refused(outcome.Failure):
    """The request gets a failure reply: `code` is the SOCKS5 REP (SOCKS4 says 0x5B)."""

    def __init__(self, code: int, outcome_name: str, reason: str) -> None:
        super().__init__(outcome_name, reason)
        self.code = code


@dataclass(frozen=True)
class Request:
    """A parsed request; `host` is as the client sent it (not yet canonical)."""

    version: int
    command: int
    host: str
    port: int
    name: str | None = None  # CMD_CONNECT_NAMED: the client's name for the address in `host`


def read_methods(read: Reader) -> bytes:
    """The rest of a SOCKS5 greeting after its version byte: the offered methods."""
    count = read(1)[0]
    if count == 0:
        raise Malformed("socks5 greeting offers no methods")
    return read(count)


def read_userpass(read: Reader) -> tuple[bytes, bytes]:
    """An RFC 1929 request: (user name, password) as raw bytes."""
    version = read(1)[0]
    if version != AUTH_VERSION:
        raise Malformed(f"user/password request version {version:#04x}, expected 0x01")
    user = read(read(1)[0])
    password = read(read(1)[0])
    return user, password


def read_socks5_request(read: Reader, named: bool = False) -> Request:
    """VER CMD RSV ATYP DST.ADDR DST.PORT, read whole; with `named` (the client chose
    NAMED or NAMED_USERPASS), a CMD_CONNECT_NAMED request is a CONNECT to an address
    with NLEN NAME behind it."""
    version, command, _reserved, atyp = read(4)
    if version != socks5.VERSION:
        raise Malformed(f"socks5 request version {version:#04x}")
    if named and command == socks5.CMD_CONNECT_NAMED:
        if atyp not in (socks5.ATYP_IPV4, socks5.ATYP_IPV6):
            raise Refused(ADDRESS_TYPE_NOT_SUPPORTED, outcome.PROTOCOL_ERROR,
                          f"named connect to address type {atyp:#04x} (an IP address is required)")
        dest = socks5.read_address(read, atyp)
        raw = read(read(1)[0])
        return Request(socks5.VERSION, socks5.CMD_CONNECT, dest.host, dest.port,
                       raw.decode("ascii", "backslashreplace"))
    if atyp == socks5.ATYP_DOMAIN:
        raw = read(read(1)[0])
        (port,) = struct.unpack("!H", read(2))
        return Request(socks5.VERSION, command, raw.decode("utf-8", "backslashreplace"), port)
    if atyp not in (socks5.ATYP_IPV4, socks5.ATYP_IPV6):
        raise Refused(ADDRESS_TYPE_NOT_SUPPORTED, outcome.PROTOCOL_ERROR, f"address type {atyp:#04x} not supported")
    dest = socks5.read_address(read, atyp)
    return Request(socks5.VERSION, command, dest.host, dest.port)


def _read_cstring(read: Reader, what: str) -> bytes:
    out = bytearray()
    while True:
        byte = read(1)
        if byte == b"\0":
            return bytes(out)
        if len(out) >= MAX_SOCKS4_FIELD:
            raise Malformed(f"socks4 {what} longer than {MAX_SOCKS4_FIELD} bytes")
        out += byte


def read_socks4_request(read: Reader) -> tuple[Request, str]:
    """The rest of a SOCKS4/4a request after its version byte: (request, user id).

    DSTIP 0.0.0.x with x != 0 announces SOCKS4a: a host name follows the user id.
    """
    command, port, packed = struct.unpack("!BH4s", read(7))
    userid = _read_cstring(read, "user id").decode("utf-8", "backslashreplace")
    if packed[:3] == b"\0\0\0" and packed[3] != 0:
        name = _read_cstring(read, "host name").decode("utf-8", "backslashreplace")
        return Request(SOCKS4_VERSION, command, name, port), userid
    return Request(SOCKS4_VERSION, command, socket.inet_ntoa(packed), port), userid


def method_selection(method: int) -> bytes:
    return bytes([socks5.VERSION, method])


def auth_status(ok: bool) -> bytes:
    """RFC 1929 reply: status 0 is success, anything else failure."""
    return bytes([AUTH_VERSION, 0 if ok else 1])


def socks5_reply(code: int, bound: Endpoint | None = None) -> bytes:
    """VER REP RSV + the bound address (0.0.0.0:0 on failure)."""
    return bytes([socks5.VERSION, code, 0]) + socks5.encode_address(bound or _NO_ADDRESS)


def socks4_reply(granted: bool, bound: Endpoint | None = None) -> bytes:
    """VN=0 CD DSTPORT DSTIP; an IPv6 bound address cannot be told, so 0.0.0.0."""
    ip = b"\0\0\0\0"
    port = 0
    if bound is not None:
        port = bound.port
        if bound.family == socket.AF_INET:
            ip = socket.inet_aton(bound.host)
    return struct.pack("!BBH4s", 0, socks4.GRANTED if granted else SOCKS4_REJECTED, port, ip)


def reply_text(code: int) -> str:
    return f"{code:02x} {socks5.REPLIES.get(code, 'unassigned')}"
