"""Addresses and small socket helpers shared by every module that touches sockets."""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import NamedTuple

import psutil
from gevent.hub import get_hub

from .names import format_hostport, port_number, split_host_port

_LINGER_RST = struct.pack("ii", 1, 0)


class Endpoint(NamedTuple):
    """A host (IP literal or name) and port."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
            return True
        except ValueError:
            return False


def parse_hostport(text: str, default_port: int | None = None) -> Endpoint:
    """Parse `1.2.3.4:80`, `[2001:db8::1]:80`, `name:80` (port optional with a default)."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if not text.startswith("[") and text.count(":") > 1:
        raise ValueError(f"IPv6 address needs brackets: [{text}]:PORT")
    host, port_s = split_host_port(text)
    if text.startswith("["):
        ipaddress.IPv6Address(host.split("%")[0])
    if port_s is None:
        if default_port is None:
            raise ValueError(f"missing port in {text!r}")
        return Endpoint(host, default_port)
    return Endpoint(host, port_number(port_s))


def listen_address(text: str) -> Endpoint:
    """A listen address: an IP literal and port (`[::]:1081` is dual stack)."""
    ep = parse_hostport(text)
    try:
        ipaddress.ip_address(ep.host)
    except ValueError:
        raise ValueError(f"listen address must be an IP literal, got {ep.host!r}") from None
    return ep


def sockaddr_endpoint(addr: tuple) -> Endpoint:
    """Normalise a socket address; v4-mapped IPv6 becomes plain IPv4."""
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return Endpoint(host, addr[1])


def local_addresses() -> set[str]:
    """Every address of this network namespace's interfaces, loopback included (for wildcard listeners)."""
    out = {"127.0.0.1", "::1"}
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                out.add(a.address.split("%")[0])
    return out


KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 15
KEEPALIVE_COUNT = 4
DEFAULT_USER_TIMEOUT = float(KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT)
"""Seconds unacknowledged data may wait: as long as keepalive takes to give up on an idle peer."""

_user_timeout = DEFAULT_USER_TIMEOUT


def read_sysctl(path: str) -> str | None:
    """A /proc/sys value, stripped; None when it cannot be read (e.g. absent on this kernel)."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def configure_user_timeout(seconds: float) -> None:
    """The TCP_USER_TIMEOUT `set_keepalive` applies from now on in this process (0: the kernel's)."""
    global _user_timeout
    _user_timeout = seconds


def set_user_timeout(sock: socket.socket, seconds: float) -> None:
    """Bound how long sent data may stay unacknowledged before the kernel resets.

    Keepalive does not probe while data is outstanding, so without this a
    peer that vanished mid-transfer holds the connection for tcp_retries2
    (about 15 minutes).
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(seconds * 1000))


def set_keepalive(sock: socket.socket, idle: int = KEEPALIVE_IDLE, interval: int = KEEPALIVE_INTERVAL,
                  count: int = KEEPALIVE_COUNT) -> None:
    """Turn on TCP keepalive so dead peers are noticed on idle relays, and
    bound unacknowledged data (`configure_user_timeout`) for busy ones.

    With a user timeout Linux ends an unanswered keepalive by that timeout
    and never reads TCP_KEEPCNT (`tcp_keepalive_timer`): the count is set
    only without one (one setsockopt less per upstream connection)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    if _user_timeout:
        set_user_timeout(sock, _user_timeout)
    else:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


SETTLE_MAX = 2.0
"""Seconds at most between a sweep of `keepalive_soon`'s sockets and the next."""


class _Settling:
    """Sockets waiting for `set_keepalive`, in two generations swept by one timer per process.

    A socket joins `young`; each tick gives the options to every `old` one still open
    and makes `young` the next `old`, so a socket has them after one to two periods.
    The timer runs only while sockets wait and keeps no loop alive.
    """

    __slots__ = ("loop", "old", "timer", "young")

    def __init__(self) -> None:
        self.young: list[socket.socket] = []
        self.old: list[socket.socket] = []
        self.timer = None
        self.loop = None  # the loop the timer runs on

    def start(self) -> None:
        limits = [SETTLE_MAX, KEEPALIVE_IDLE / 4] + ([_user_timeout / 4] if _user_timeout else [])
        period = min(limits)
        self.loop = get_hub().loop
        self.timer = self.loop.timer(period, period, ref=False)
        self.timer.start(self._tick)

    def running(self) -> bool:
        """The timer runs on this thread's loop (tests make hubs anew, and a dead loop never ticks)."""
        return self.timer is not None and self.loop is get_hub().loop

    def _tick(self) -> None:
        for sock in self.old:
            if sock.fileno() != -1:  # closed sockets say -1, and their descriptor may be another's now
                try:
                    set_keepalive(sock)
                except OSError:
                    pass
        self.old, self.young = self.young, []
        if not self.old:
            self.timer.close()  # type: ignore[attr-defined]
            self.timer = None


_settling = _Settling()


def keepalive_soon(sock: socket.socket) -> None:
    """`set_keepalive` within one to two ticks (at most 2 s, a quarter of the keepalive
    idle time and of the user timeout) instead of now: four setsockopt calls that a
    short connection, closed before any of them can matter, never makes.

    None can matter earlier: keepalive probes after KEEPALIVE_IDLE without a segment
    received (TCP_KEEPIDLE set late counts from the last one received, so the first
    probe is as due), and the user timeout clamps the retransmission timer at its next
    re-arm, which before half the timeout has passed is still inside it: a peer that
    vanished is let go after the same time as with the options set at once."""
    settling = _settling
    settling.young.append(sock)
    if not settling.running():
        settling.start()


def close_with_reset(sock: socket.socket) -> None:
    """Close so the peer gets RST: it must learn the connection failed."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass
    sock.close()


def close_quietly(sock: socket.socket | None) -> None:
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass
