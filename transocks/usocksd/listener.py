"""usocksd's listening-socket options: TCP_DEFER_ACCEPT and TCP Fast Open.

Both are right for a SOCKS server only: its clients always speak first (the
greeting), so the kernel may hold a connection until its first bytes arrive
(DEFER_ACCEPT: the worker wakes once, for a connection it can read at once),
and may take those bytes in the SYN (Fast Open: one round trip less).  Never
on transocks' listeners: a transparent proxy carries server-first protocols
(SMTP, FTP, SSH banners) whose clients send nothing until the server does.
"""

from __future__ import annotations

import logging
import math
import socket

from ..core.netutil import read_sysctl
from ..runtime.listeners import PrepareListener

log = logging.getLogger("usocksd")

TFO_SYSCTL = "/proc/sys/net/ipv4/tcp_fastopen"
TFO_SERVER_ENABLE = 0x2  # the sysctl's bit for server-side Fast Open


def prepare(defer_accept: float, fastopen: int, sysctl: str = TFO_SYSCTL) -> PrepareListener | None:
    """The options to set on every listening socket before bind, or None for none.

    Logs once (the master calls this once) when Fast Open is asked for but
    the network namespace's net.ipv4.tcp_fastopen does not enable the server
    side: the option is then set but the kernel ignores it.  The daemon does
    not change the sysctl; it is the operator's (per network namespace).
    """
    if fastopen:
        enabled = fastopen_server_enabled(sysctl)
        if not enabled:
            log.warning("tcp_fastopen = %d has no effect: net.ipv4.tcp_fastopen %s; set bit 2 "
                        "(sysctl -w net.ipv4.tcp_fastopen=3) to serve data in the SYN", fastopen,
                        "is absent" if enabled is None else "lacks the server bit (2)")
    if not defer_accept and not fastopen:
        return None
    seconds = max(1, math.ceil(defer_accept)) if defer_accept else 0

    def set_options(sock: socket.socket) -> None:
        if seconds:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, seconds)
        if fastopen:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, fastopen)

    return set_options


def fastopen_server_enabled(sysctl: str = TFO_SYSCTL) -> bool | None:
    """Whether net.ipv4.tcp_fastopen has the server bit; None when it cannot be read."""
    value = read_sysctl(sysctl)
    try:
        return None if value is None else bool(int(value, 0) & TFO_SERVER_ENABLE)
    except ValueError:
        return None
