"""SOCKS5 (RFC 1928) and its username/password sub-negotiation (RFC 1929)."""

from __future__ import annotations

import ipaddress
import socket
import struct

from ..core.netutil import Endpoint
from . import ProtocolError, Reader

VERSION = 5
NO_AUTH = 0x00
USERPASS = 0x02
NO_ACCEPTABLE = 0xFF
PIPELINED = 0x8A
"""A private method (RFC 1928 keeps 0x80-0xFE for them): no authentication, and the
server reads requests sent behind the greeting.  usocksd chooses it when offered;
any other server ignores it, so a client learns which members it may pipeline to."""
NAMED = 0x8B
"""A private method: PIPELINED, and the server takes CMD_CONNECT_NAMED requests.  usocksd
chooses it when offered (an older usocksd chooses PIPELINED, anyone else neither)."""
NAMED_USERPASS = 0x8C
"""A private method: user/password (RFC 1929), then CMD_CONNECT_NAMED requests are taken."""
CMD_CONNECT = 1
CMD_UDP_ASSOCIATE = 3
CMD_CONNECT_NAMED = 0x8B
"""CONNECT to an address, with the name the client claims for it: VER CMD RSV ATYP(1|4)
DST.ADDR DST.PORT NLEN NAME.  The server judges the name against the address and connects
to the address, never to the name's.  Sent only after NAMED or NAMED_USERPASS was chosen;
any other server answers 07 (command not supported) and connects nowhere."""
ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4

REPLIES = {
    0x00: "succeeded",
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}

_LITERALS = ((socket.AF_INET, ATYP_IPV4), (socket.AF_INET6, ATYP_IPV6))
_PORT = struct.Struct("!H")


def greeting(methods: bytes) -> bytes:
    return bytes([VERSION, len(methods)]) + methods


def userpass_request(username: str, password: str) -> bytes:
    u, p = username.encode(), password.encode()
    if not (0 < len(u) <= 255 and 0 < len(p) <= 255):
        raise ValueError("SOCKS5 user name and password must be 1-255 bytes")
    return bytes([1, len(u)]) + u + bytes([len(p)]) + p


def encode_address(dest: Endpoint) -> bytes:
    """ATYP + address + port, choosing IPv4, IPv6 or domain by the host's form."""
    # Fast path for the usual case, a literal from SO_ORIGINAL_DST:
    # inet_pton is ~20x cheaper than ipaddress and packs the same bytes.
    for family, atyp in _LITERALS:
        try:
            return bytes([atyp]) + socket.inet_pton(family, dest.host) + _PORT.pack(dest.port)
        except OSError:
            pass
    try:
        ip = ipaddress.ip_address(dest.host)
    except ValueError:
        name = dest.host.encode("idna")
        if not 0 < len(name) <= 255:
            raise ValueError("domain name must be 1-255 bytes") from None
        return bytes([ATYP_DOMAIN, len(name)]) + name + _PORT.pack(dest.port)
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes([atyp]) + ip.packed + _PORT.pack(dest.port)


def connect_request(dest: Endpoint) -> bytes:
    return bytes([VERSION, CMD_CONNECT, 0]) + encode_address(dest)


def udp_associate_request(source: Endpoint) -> bytes:
    """A UDP ASSOCIATE request; `source` is where the client will send from (0.0.0.0:0 when unknown)."""
    return bytes([VERSION, CMD_UDP_ASSOCIATE, 0]) + encode_address(source)


def named_connect_request(address: bytes, name: str) -> bytes:
    """A CMD_CONNECT_NAMED request; `address` is ATYP + IP + port as encode_address makes it."""
    raw = name.encode("idna")
    if not 0 < len(raw) <= 255:
        raise ValueError("domain name must be 1-255 bytes")
    return bytes([VERSION, CMD_CONNECT_NAMED, 0]) + address + bytes([len(raw)]) + raw


def read_method(read: Reader) -> int:
    ver, method = read(2)
    if ver != VERSION:
        raise ProtocolError(f"socks5 bad version {ver:#04x} in method selection")
    return method


def read_address(read: Reader, atyp: int) -> Endpoint:
    """Read an address of any ATYP whole, so no stray bytes reach the tunnel.

    A fixed-size address and its port are read together: one receive less.
    """
    if atyp == ATYP_IPV4:
        return _decode_address(atyp, read(6))
    if atyp == ATYP_IPV6:
        return _decode_address(atyp, read(18))
    if atyp != ATYP_DOMAIN:
        raise ProtocolError(f"socks5 reply has unknown address type {atyp:#04x}")
    size = read(1)
    return _decode_address(atyp, size + read(size[0] + 2))


def _decode_address(atyp: int, raw: bytes) -> Endpoint:
    """The address and port of a known ATYP, from exactly its bytes (a domain with its length byte)."""
    if atyp == ATYP_DOMAIN:
        return Endpoint(raw[1:-2].decode("ascii", "replace"), _PORT.unpack_from(raw, len(raw) - 2)[0])
    family = socket.AF_INET if atyp == ATYP_IPV4 else socket.AF_INET6
    return Endpoint(socket.inet_ntop(family, raw[:-2]), _PORT.unpack_from(raw, len(raw) - 2)[0])


def parse_reply(buf: bytes) -> tuple[int, Endpoint, int] | None:
    """(REP, bound address, its length) of the reply at the start of `buf`, or None
    while it is incomplete: the reply is taken from what one receive returned,
    and what follows it is the tunnel's."""
    if len(buf) < 4:
        if buf and buf[0] != VERSION:
            raise ProtocolError(f"socks5 bad version {buf[0]:#04x} in reply")
        return None
    ver, rep, _rsv, atyp = buf[0], buf[1], buf[2], buf[3]
    if ver != VERSION:
        raise ProtocolError(f"socks5 bad version {ver:#04x} in reply")
    if atyp == ATYP_IPV4:
        end = 10
    elif atyp == ATYP_IPV6:
        end = 22
    elif atyp == ATYP_DOMAIN:
        if len(buf) < 5:
            return None
        end = 7 + buf[4]
    else:
        raise ProtocolError(f"socks5 reply has unknown address type {atyp:#04x}")
    if len(buf) < end:
        return None
    return rep, _decode_address(atyp, buf[4:end]), end


def read_reply(read: Reader) -> tuple[int, Endpoint]:
    """Read a request reply: (REP code, bound address)."""
    ver, rep, _rsv, atyp = read(4)
    if ver != VERSION:
        raise ProtocolError(f"socks5 bad version {ver:#04x} in reply")
    return rep, read_address(read, atyp)


# --- UDP datagrams (RFC 1928 section 7) ---

UDP_HEADER_MAX = 4 + 1 + 255 + 2
"""The longest header a datagram can carry (a 255-byte name)."""


def udp_datagram(address: bytes, payload: bytes) -> bytes:
    """RSV RSV FRAG=0 ATYP DST.ADDR DST.PORT DATA; `address` as encode_address makes it."""
    return b"\0\0\0" + address + payload


def parse_udp_datagram(buf: bytes) -> tuple[int, Endpoint, int]:
    """(FRAG, destination or source, offset of the data) of one SOCKS5 UDP datagram.

    ProtocolError for anything that is not one whole header: short, RSV not zero,
    an unknown ATYP, an empty name.  The caller decides what to do with FRAG != 0
    (RFC 1928 lets a relay drop what it does not reassemble)."""
    if len(buf) < 4:
        raise ProtocolError(f"socks5 udp datagram of {len(buf)} bytes is shorter than its header")
    if buf[0] or buf[1]:
        raise ProtocolError("socks5 udp datagram has a non-zero RSV")
    frag, atyp = buf[2], buf[3]
    if atyp == ATYP_IPV4:
        end = 10
    elif atyp == ATYP_IPV6:
        end = 22
    elif atyp == ATYP_DOMAIN:
        if len(buf) < 5 or buf[4] == 0:
            raise ProtocolError("socks5 udp datagram has a short or empty domain name")
        end = 7 + buf[4]
    else:
        raise ProtocolError(f"socks5 udp datagram has unknown address type {atyp:#04x}")
    if len(buf) < end:
        raise ProtocolError("socks5 udp datagram ends inside its address")
    return frag, _decode_address(atyp, buf[4:end]), end
