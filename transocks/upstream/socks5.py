"""SOCKS5 client (RFC 1928) with username/password authentication (RFC 1929)."""

from __future__ import annotations

import ipaddress
import socket
import struct

from .. import nio, outcome
from ..netutil import Endpoint
from .base import Dialer, ProtocolError, ProxyURL, Reader, UpstreamError, reader

VERSION = 5
NO_AUTH = 0x00
USERPASS = 0x02
NO_ACCEPTABLE = 0xFF
CMD_CONNECT = 1
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

REPLY_OUTCOMES = {
    0x02: outcome.UPSTREAM_REFUSED,
    0x03: outcome.DEST_UNREACHABLE,
    0x04: outcome.DEST_UNREACHABLE,
    0x05: outcome.DEST_REFUSED,
    0x06: outcome.DEST_UNREACHABLE,
}


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
        return bytes([ATYP_DOMAIN, len(name)]) + name + struct.pack("!H", dest.port)
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes([atyp]) + ip.packed + struct.pack("!H", dest.port)


_LITERALS = ((socket.AF_INET, ATYP_IPV4), (socket.AF_INET6, ATYP_IPV6))
_PORT = struct.Struct("!H")


def connect_request(dest: Endpoint) -> bytes:
    return bytes([VERSION, CMD_CONNECT, 0]) + encode_address(dest)


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
        raw = read(6)
        return Endpoint(socket.inet_ntop(socket.AF_INET, raw[:4]), _PORT.unpack_from(raw, 4)[0])
    if atyp == ATYP_IPV6:
        raw = read(18)
        return Endpoint(socket.inet_ntop(socket.AF_INET6, raw[:16]), _PORT.unpack_from(raw, 16)[0])
    if atyp != ATYP_DOMAIN:
        raise ProtocolError(f"socks5 reply has unknown address type {atyp:#04x}")
    size = read(1)[0]
    raw = read(size + 2)
    return Endpoint(raw[:size].decode("ascii", "replace"), _PORT.unpack_from(raw, size)[0])


def read_reply(read: Reader) -> tuple[int, Endpoint]:
    """Read a request reply: (REP code, bound address)."""
    ver, rep, _rsv, atyp = read(4)
    if ver != VERSION:
        raise ProtocolError(f"socks5 bad version {ver:#04x} in reply")
    return rep, read_address(read, atyp)


def check_reply(rep: int) -> None:
    if rep != 0:
        text = REPLIES.get(rep, "unassigned reply code")
        raise UpstreamError(REPLY_OUTCOMES.get(rep, outcome.UPSTREAM_REFUSED), f"socks5 reply {rep:02x}: {text}")


class Socks5Dialer(Dialer):
    """CONNECT through a SOCKS5 proxy; greeting and request go in one write when possible."""

    def __init__(self, url: ProxyURL, *args: object, pipelining: bool = False, **kwargs: object) -> None:
        super().__init__(url, *args, **kwargs)  # type: ignore[arg-type]
        self.pipelining = pipelining
        if url.username is not None:
            self._greeting = greeting(bytes([NO_AUTH, USERPASS]))
        else:
            self._greeting = greeting(bytes([NO_AUTH]))

    def handshake(self, sock: socket.socket, dest: Endpoint) -> None:
        read = reader(sock)
        request = connect_request(dest)
        pipelined = self.pipelining and self.url.username is None
        nio.sendall(sock, self._greeting + request if pipelined else self._greeting)
        nio.wait(sock, nio.READ)  # the answer needs a round trip: wait rather than fail a recv first
        method = read_method(read)
        if method == NO_ACCEPTABLE:
            raise UpstreamError(outcome.AUTH_FAILED, "socks5 server accepted none of our auth methods")
        if method == USERPASS and self.url.username is not None:
            nio.sendall(sock, userpass_request(self.url.username, self.url.password or ""))
            _ver, status = read(2)
            if status != 0:
                raise UpstreamError(outcome.AUTH_FAILED, f"socks5 user/pass rejected for {self.url.username!r} (status {status:#04x})")
        elif method != NO_AUTH:
            raise ProtocolError(f"socks5 server chose method {method:#04x} we did not offer")
        if not pipelined:
            nio.sendall(sock, request)
            nio.wait(sock, nio.READ)
        rep, _bound = read_reply(read)
        check_reply(rep)
