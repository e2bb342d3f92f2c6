"""What the kernel gives and needs for TPROXY'd UDP: the original destination of each
datagram, and transparent sockets that send replies from it.

A TPROXY rule delivers a datagram to our socket unchanged: its destination
is still the remote server's address, which arrives with it as ancillary data
(IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR).  A reply must reach the client
from that address and port, as NAT would send it, so it goes out of a second
socket bound there: IP_TRANSPARENT lets a socket bind an address that is not
this host's (and needs CAP_NET_RAW or CAP_NET_ADMIN at the setsockopt), and
SO_REUSEADDR lets the workers of two generations (a reload, an upgrade) hold
one each.  Python has no constants for the ancillary types.
"""

from __future__ import annotations

import socket
import struct

from ...core.netutil import Endpoint, sockaddr_endpoint
from ..methods.tproxy import IP_TRANSPARENT, IPV6_TRANSPARENT

SOL_IP = socket.IPPROTO_IP
SOL_IPV6 = socket.IPPROTO_IPV6
IP_RECVORIGDSTADDR = 20  # and IP_ORIGDSTADDR, the cmsg type, is the same number
IPV6_RECVORIGDSTADDR = 74
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = 78
CMSG_SPACE = socket.CMSG_SPACE(28)  # the larger of sockaddr_in and sockaddr_in6
MAX_DATAGRAM = 65535

_IN4 = struct.Struct("!2xH4s")  # sockaddr_in: family (host order, skipped), port, address
_IN6 = struct.Struct("!2xH4x16s")  # sockaddr_in6: family, port, flowinfo, address (scope id ignored)


def prepare_listener(sock: socket.socket) -> None:
    """Before bind: take what TPROXY diverts, and learn each datagram's original destination.
    A dual-stack [::] socket gets IPv4 datagrams too, so it asks for both kinds."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        sock.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
        try:
            sock.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)
        except OSError:
            pass  # an IPv6-only socket on a kernel that refuses the IPv4 option
    else:
        sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)


def original_destination(ancdata: list[tuple[int, int, bytes]]) -> Endpoint | None:
    """The destination a datagram had before TPROXY, from recvmsg's ancillary data; None
    when it has none (the datagram was sent to the socket itself, not diverted)."""
    for level, kind, data in ancdata:
        if level == SOL_IP and kind == IP_RECVORIGDSTADDR and len(data) >= _IN4.size:
            port, raw = _IN4.unpack_from(data)
            return Endpoint(socket.inet_ntop(socket.AF_INET, raw), port)
        if level == SOL_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(data) >= _IN6.size:
            port, raw = _IN6.unpack_from(data)
            return sockaddr_endpoint((socket.inet_ntop(socket.AF_INET6, raw), port))
    return None


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def reply_socket(source: Endpoint) -> socket.socket:
    """A non-blocking UDP socket that sends from `source`, an address of another host."""
    family = family_of(source.host)
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            sock.setsockopt(SOL_IPV6, IPV6_FREEBIND, 1)
            sock.bind((source.host, source.port, 0, 0))
        else:
            sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(SOL_IP, IP_FREEBIND, 1)
            sock.bind((source.host, source.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # it only sends; the kernel's minimum
    except BaseException:
        sock.close()
        raise
    return sock


def peer_socket(dest: Endpoint) -> socket.socket:
    """A non-blocking UDP socket connected to `dest`: the kernel keeps every other sender out."""
    family = family_of(dest.host)
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    try:
        sock.connect((dest.host, dest.port) if family == socket.AF_INET else (dest.host, dest.port, 0, 0))
    except BaseException:
        sock.close()
        raise
    return sock
