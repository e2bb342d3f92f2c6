"""DNSBL checks of the egress addresses: a listed address leaves the pool.

Why: one abusive client is enough to get an edge address onto a blocklist,
and then every client sharing it is refused by mail and web servers.  Taking
the address out moves only its own clients (rendezvous hashing) until the
listing expires.

The query for 198.51.100.22 in zone bl.example is 22.100.51.198.bl.example
(IPv6: the 32 nibbles reversed, RFC 5782), resolved with gevent's resolver.
An A record in 127.0.0.0/8 means listed, except 127.255.255.0/24, which lists
use for "query refused"; a name that does not exist means not listed; any
other failure keeps the previous answer for that address.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable

import gevent
from gevent.socket import getaddrinfo

from ..core.names import IPAddress, host_name
from .egress import EgressPool

log = logging.getLogger("usocksd")

Resolve = Callable[[str], list[str]]

_LISTED = ipaddress.ip_network("127.0.0.0/8")
_REFUSED = ipaddress.ip_network("127.255.255.0/24")
_NOT_LISTED = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


class LookupFailed(Exception):
    """The list could not be asked; the address keeps its previous state."""


def dnsbl_zone(text: str) -> str:
    """Setting type: a DNS zone name, normalised like destination names."""
    return host_name(text.strip())


def query_name(ip: IPAddress, zone: str) -> str:
    if ip.version == 4:
        labels = reversed(str(ip).split("."))
    else:
        labels = reversed(ip.exploded.replace(":", ""))
    return ".".join(labels) + "." + zone


def gevent_resolve(name: str) -> list[str]:
    """IPv4 answers for name from gevent's resolver (the libc one unless GEVENT_RESOLVER says otherwise)."""
    return [info[4][0] for info in getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)]


def lookup(ip: IPAddress, zone: str, resolve: Resolve) -> str | None:
    """The listing answer (e.g. "127.0.0.2"), or None when ip is not listed in zone."""
    name = query_name(ip, zone)
    try:
        answers = resolve(name)
    except socket.gaierror as exc:
        if exc.errno in _NOT_LISTED:
            return None
        raise LookupFailed(f"{name}: {exc.strerror or exc}") from None
    except OSError as exc:
        raise LookupFailed(f"{name}: {exc.strerror or exc}") from None
    for answer in answers:
        try:
            addr = ipaddress.IPv4Address(answer)
        except ValueError:
            continue
        if addr in _REFUSED:
            raise LookupFailed(f"{name}: the list refused the query ({addr})")
        if addr in _LISTED:
            return answer
    return None


class DnsblMonitor:
    """Checks every egress address in every zone now and each `interval`."""

    def __init__(self, pool: EgressPool, zones: Iterable[str], interval: float, resolve: Resolve = gevent_resolve,
                 timeout: float = 5.0) -> None:
        self.pool = pool
        self.zones = list(zones)
        self.interval = interval
        self.resolve = resolve
        self.timeout = timeout

    def _ask(self, ip: IPAddress, zone: str) -> tuple[str | None, str | None]:
        """(answer, error) for one query, never raising."""
        try:
            return lookup(ip, zone, self.resolve), None
        except LookupFailed as exc:
            return None, str(exc)

    def check(self) -> set[IPAddress]:
        """Ask all lists at once (bounded by `timeout`), then update the pool."""
        pairs = [(ip, zone) for ip in self.pool.addresses for zone in self.zones]
        jobs = [gevent.spawn(self._ask, ip, zone) for ip, zone in pairs]
        gevent.joinall(jobs, timeout=self.timeout)
        listed: set[IPAddress] = set()
        unknown: set[IPAddress] = set()
        for (ip, zone), job in zip(pairs, jobs):
            if job.successful():
                answer, error = job.value
            else:
                answer, error = None, repr(job.exception) if job.ready() else f"no answer within {self.timeout:g}s"
                job.kill(block=False)
            if answer is not None:
                listed.add(ip)
                if ip not in self.pool.listed:
                    log.warning("egress %s is listed in %s (%s): taken out of the pool", ip, zone, answer)
            elif error is not None:
                unknown.add(ip)
                log.warning("DNSBL lookup failed, keeping previous state of %s: %s", ip, error)
        listed |= unknown & self.pool.listed
        for ip in self.pool.listed - listed:
            log.info("egress %s is no longer listed: back in the pool", ip)
        self.pool.set_listed(listed)
        for version in (4, 6):
            configured = self.pool.configured(version)
            if configured and all(ip in listed for ip in configured):
                log.warning("every IPv%d egress address is listed; using them anyway", version)
        return listed

    def run_forever(self) -> None:
        while True:
            gevent.sleep(self.interval)
            try:
                self.check()
            except Exception:  # the monitor must outlive a bug in one round
                log.exception("DNSBL check failed")

    def start(self) -> gevent.Greenlet | None:
        """Check once before serving, then every `interval` in the background (0: only now)."""
        self.check()
        return gevent.spawn(self.run_forever) if self.interval > 0 else None
