"""Background work of a worker's exits: active health checks and DNS discovery.

Both run as greenlets in each worker's hub.  Why not in the master: it has no
gevent and no dialers, and a worker would still need the results at once, per
connection, without IPC.  The cost of each worker checking for itself is one
probe per member per `health_interval` per worker, and each worker's view is
consistent with its own passive ejection (dials that failed there).
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Callable, Sequence

import gevent
from gevent.socket import getaddrinfo

from ..core import outcome
from ..core.netutil import Endpoint
from ..core.nio import Deadline, ResourceExhausted
from .exits.balance import Pool
from .exits.member import Member
from .exits.registry import Exits, Source
from .upstream.associate import ANY, associate

log = logging.getLogger("transocks")


class _ProbeTimeout(Exception):
    pass


class _Periodic:
    """A task that runs every `interval` in a greenlet of the worker's hub (0: never)."""

    interval: float
    greenlet: gevent.Greenlet | None = None

    def wanted(self) -> bool:
        return bool(self.interval)

    def start(self) -> None:
        if self.wanted() and self.greenlet is None:
            self.greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self.greenlet is not None:
            self.greenlet.kill(block=False)
            self.greenlet = None

    def _run(self) -> None:
        gevent.sleep(self.first_delay())
        while True:
            self.tick()
            gevent.sleep(self.interval)

    def first_delay(self) -> float:
        return self.interval

    def tick(self) -> None:
        raise NotImplementedError


class HealthChecker(_Periodic):
    """Probes every checked member each `interval`: TCP connect plus the scheme's handshake,
    or a whole tunnel to `target` when one is set, within `timeout`.  With UDP on, a SOCKS5
    member of a pool that UDP flows reach (`udp_pools`) must then open a UDP ASSOCIATE too:
    that result is its UDP state (`UdpHealth`), apart from its TCP state."""

    def __init__(self, exits: Exits, interval: float, timeout: float, target: Endpoint | None,
                 udp_pools: Sequence[object] = ()) -> None:
        self.exits = exits
        self.interval = interval
        self.timeout = timeout or None
        self.target = target
        self.udp_pools = [p for p in udp_pools if isinstance(p, Pool)]  # direct and reject have nothing to check

    def first_delay(self) -> float:
        return random.uniform(0, self.interval)  # workers started together do not probe together

    def tick(self) -> None:
        self.check_all()

    def check_all(self) -> None:
        probes = [gevent.spawn(self.check, m) for m in self.exits.checked_members()]
        gevent.joinall(probes)

    def check(self, m: Member) -> bool:
        """One probe; the result counts toward the member's rise/fall.  A probe this host
        could not make (out of descriptors) says nothing about the member and counts for neither.
        When the TCP probe passes and the member carries UDP flows, its UDP ASSOCIATE is checked."""
        try:
            with Deadline(self.timeout, _ProbeTimeout):
                m.dialer.probe(self.target)
        except ResourceExhausted:
            return False
        except _ProbeTimeout:
            why = f"health check timed out after {self.timeout:g}s"
        except outcome.Failure as exc:
            why = f"health check: {exc}"
        except (OSError, EOFError) as exc:
            why = f"health check: {exc}"
        else:
            m.record(True, self.exits.policy, "", "checks")
            if self.checks_udp(m):
                self.check_udp(m)
            return True
        m.record(False, self.exits.policy, why, "checks")
        return False

    def checks_udp(self, m: Member) -> bool:
        """A SOCKS5 member of a pool that UDP flows reach (a member shared with a TCP-only pool included)."""
        return m.associates and any(m in p.members for p in self.udp_pools)

    def check_udp(self, m: Member) -> bool:
        """A UDP ASSOCIATE opened and closed at once, within `timeout`: its result counts toward
        the member's UDP state only (ANY: the server takes this probe's address as the source)."""
        try:
            associate(m, self.timeout or 0, ANY).close()  # its timeout bounds connect, login and request
        except ResourceExhausted:
            return False
        except (outcome.Failure, OSError, EOFError) as exc:
            why = f"udp associate check: {exc}"
        else:
            m.record_udp(True, self.exits.policy, "", "udp associate checks")
            return True
        m.record_udp(False, self.exits.policy, why, "udp associate checks")
        return False


class Discovery(_Periodic):
    """Resolves the member URLs given by name, at start and every `interval`: each A/AAAA
    address is a member of its own.  Never per connection."""

    def __init__(self, exits: Exits, interval: float, on_change: Callable[[], None] | None = None) -> None:
        self.exits = exits
        self.interval = interval
        self.on_change = on_change
        self._errors: dict[str, str] = {}

    def wanted(self) -> bool:
        return bool(self.interval and self.names())

    def tick(self) -> None:
        self.resolve_all()

    def names(self) -> list[Source]:
        return [s for s in self.exits.sources.values() if s.is_name]

    def resolve_all(self) -> None:
        changed = False
        for src in self.names():
            changed |= self.resolve(src)
        if changed and self.on_change is not None:
            self.on_change()

    def resolve(self, src: Source) -> bool:
        """Look the name up once; on failure keep the addresses it had. True when they changed."""
        host, port = src.url.host, src.url.port
        try:
            infos = getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            why = str(exc)
            if self._errors.get(host) != why:
                log.warning("exit %s: cannot resolve %s (%s); keeping %d address(es)", src.url, host, why,
                            len(src.members))
            self._errors[host] = why
            return False
        self._errors.pop(host, None)
        addresses: list[str] = []
        for _fam, _type, _proto, _canon, sockaddr in infos:
            addr = sockaddr[0]
            if addr not in addresses:
                addresses.append(addr)
        added, removed = self.exits.set_addresses(src, addresses)
        if added or removed:
            log.info("exit %s: %s resolves to %s (added %s, removed %s)", src.url, host, ", ".join(addresses) or "-",
                     ", ".join(added) or "-", ", ".join(removed) or "-")
            return True
        return False
