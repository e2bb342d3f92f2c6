"""REDIRECT (and DNAT): the destination is the NAT entry's original one.

Python has no constants for these options.  The query is made on the
accepted socket itself (never a dup): a v4-mapped client on a dual-stack
listener answers only the IPv4 call, a native IPv6 client only the IPv6 one.
Its listeners need no options of their own.
"""

from __future__ import annotations

import socket
import struct

from ...core.netutil import Endpoint

NAME = "redirect"
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SOL_IP = getattr(socket, "SOL_IP", 0)
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)


class NotRedirected(OSError):
    """The connection did not pass through a REDIRECT/DNAT rule."""


prepare_listener = None


def destination(sock: socket.socket, peer: tuple) -> tuple[Endpoint, bytes]:
    """The pre-NAT destination of an accepted connection, and the same as SOCKS5
    puts it on the wire (ATYP, address, port), cut from the kernel's bytes: a
    CONNECT request needs no second conversion of the text."""
    mapped = sock.family == socket.AF_INET6 and peer[0].startswith("::ffff:") and "." in peer[0]
    try:
        if sock.family == socket.AF_INET or mapped:
            raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", raw)
            return Endpoint(socket.inet_ntop(socket.AF_INET, packed), port), b"\x01" + packed + raw[2:4]
        raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port, packed = struct.unpack_from("!2xH4x16s", raw)
        return Endpoint(socket.inet_ntop(socket.AF_INET6, packed), port), b"\x04" + packed + raw[2:4]
    except OSError as exc:
        raise NotRedirected(exc.errno, f"no original destination ({exc.strerror})") from None
