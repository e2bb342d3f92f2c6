"""Listening sockets, bound once by the master and inherited by every worker.

Why one shared socket per address rather than one SO_REUSEPORT socket per
worker: Linux resets every connection waiting in a reuseport socket's accept
queue when that socket is closed, which is what a per-worker socket does when
its worker exits, is recycled, or is retired by a HUP or TTOU (gunicorn's
reuse_port mode loses connections this way).  A socket inherited by all
workers keeps its queue no matter which worker comes or goes; the master
closes it only when its address leaves the configuration.  SO_REUSEPORT is
still set so a changed configuration, or a second master started for an
upgrade, can bind the same port while the old socket drains.  The cost,
thundering herd among a handful of workers, is small: an idle worker wakes,
finds EAGAIN, and sleeps again.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

from ..core.netutil import Endpoint, set_keepalive

PrepareListener = Callable[[socket.socket], None]
"""A daemon's own options for its listening sockets, set before bind (e.g. TPROXY's IP_TRANSPARENT)."""


def bind(ep: Endpoint, backlog: int = 1024, prepare: PrepareListener | None = None) -> socket.socket:
    """Bind and listen; `[::]` is dual stack, other IPv6 addresses IPv6 only.

    Keepalive and TCP_NODELAY are set here once: Linux copies a listener's
    socket options into every connection it accepts, which saves five
    setsockopt calls per connection in the workers.
    """
    ip = ipaddress.ip_address(ep.host)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if ip.is_unspecified else 1)
        set_keepalive(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if prepare is not None:
            prepare(sock)
        sock.bind((ep.host, ep.port))
        sock.listen(backlog)
        sock.setblocking(False)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


class Listeners:
    """The set of bound sockets, keyed by address, kept across reloads.

    `prepare` is fixed for the master's lifetime: TPROXY's option needs
    CAP_NET_ADMIN, which a master that dropped privileges no longer has, and
    workers of both kinds would share the sockets during a reload.
    """

    def __init__(self, prepare: PrepareListener | None = None) -> None:
        self.sockets: dict[Endpoint, socket.socket] = {}
        self.prepare = prepare

    def update(self, wanted: list[Endpoint], backlog: int) -> list[socket.socket]:
        """Bind addresses not yet bound; returns the sockets no longer wanted (still open)."""
        new: dict[Endpoint, socket.socket] = {}
        try:
            for ep in wanted:
                if ep in self.sockets or ep in new:
                    continue
                new[ep] = bind(ep, backlog, self.prepare)
        except OSError:
            for s in new.values():
                s.close()
            raise
        removed = [s for ep, s in self.sockets.items() if ep not in wanted]
        self.sockets = {ep: self.sockets.get(ep) or new[ep] for ep in dict.fromkeys(wanted)}
        return removed

    def for_worker(self) -> list[tuple[Endpoint, socket.socket]]:
        return list(self.sockets.items())

    def close(self) -> None:
        for s in self.sockets.values():
            s.close()
        self.sockets.clear()
