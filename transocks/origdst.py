"""Recover where a diverted connection was going (netfilter REDIRECT/DNAT, or TPROXY).

Python has no constants for these options.  The query is made on the
accepted socket itself (never a dup): a v4-mapped client on a dual-stack
listener answers only the IPv4 call, a native IPv6 client only the IPv6 one.
"""

from __future__ import annotations

import socket
import struct

from .netutil import Endpoint, sockaddr_endpoint

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SOL_IP = getattr(socket, "SOL_IP", 0)
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)


class NotRedirected(OSError):
    """The connection did not pass through a REDIRECT/DNAT rule."""


def original_destination(sock: socket.socket, peer: tuple) -> Endpoint:
    """Return the pre-NAT destination of an accepted connection."""
    mapped = sock.family == socket.AF_INET6 and peer[0].startswith("::ffff:") and "." in peer[0]
    try:
        if sock.family == socket.AF_INET or mapped:
            raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", raw)
            return Endpoint(socket.inet_ntop(socket.AF_INET, packed), port)
        raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port, packed = struct.unpack_from("!2xH4x16s", raw)
        return Endpoint(socket.inet_ntop(socket.AF_INET6, packed), port)
    except OSError as exc:
        raise NotRedirected(exc.errno, f"no original destination ({exc.strerror})") from None


def tproxy_destination(sock: socket.socket, peer: tuple) -> Endpoint:
    """Where a connection was going on a TPROXY listener.

    A TPROXY-diverted connection keeps its destination as the accepted
    socket's own address; one REDIRECTed to the same listener (the router's
    own traffic) has a NAT entry, asked first.  A connection made straight to
    the listener gets the listen address, which the loop guard refuses.
    """
    try:
        return original_destination(sock, peer)
    except NotRedirected:
        pass
    return sockaddr_endpoint(sock.getsockname())
