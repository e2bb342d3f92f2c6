"""TPROXY: a router's diverted connections keep their destination as the local address.

The listeners need IP_TRANSPARENT / IPV6_TRANSPARENT (CAP_NET_ADMIN) to accept
connections to addresses that are not this host's; the master sets it before
bind, once: a master that dropped privileges could not set it again.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable

from ...core.netutil import Endpoint, sockaddr_endpoint
from .redirect import NotRedirected
from .redirect import destination as nat_destination

NAME = "tproxy"
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75

log = logging.getLogger("transocks")


def prepare_listener(sock: socket.socket) -> None:
    """Accept connections a TPROXY rule diverts to this socket although their
    destination is not a local address."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)


def check_listen(listens: Iterable[Endpoint]) -> None:
    if not any(ipaddress.ip_address(ep.host).is_unspecified for ep in listens):
        log.warning("transparent (TPROXY) listeners on specific addresses only: TPROXY rules without "
                    "--on-ip find a listener only on 0.0.0.0 or [::]")


def destination(sock: socket.socket, peer: tuple) -> tuple[Endpoint, bytes | None]:
    """Where a connection was going on a TPROXY listener.

    A TPROXY-diverted connection keeps its destination as the accepted
    socket's own address; one REDIRECTed to the same listener (the router's
    own traffic) has a NAT entry, asked first.  A connection made straight to
    the listener gets the listen address, which the loop guard refuses.
    """
    try:
        return nat_destination(sock, peer)
    except NotRedirected:
        pass
    return sockaddr_endpoint(sock.getsockname()), None
