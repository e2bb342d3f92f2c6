"""Is a name one of the addresses a program really connected to?  The check both daemons trust.

A ClientHello's SNI and a request's Host header are what a client says, not
where it connected.  A name is *verified* when the resolver answers it with the
connection's destination address among its A/AAAA records (Squid's "Host header
forgery" check).  CDNs and round-robin DNS answer different subsets per lookup,
so a name keeps the union of the addresses seen for it over `ttl`: a check
against one lookup would flap.  Lookups run in gevent's resolver (a thread pool
by default), never blocking the event loop; concurrent checks of one name share
one lookup; the table is bounded (least recently used names go first).
"""

from __future__ import annotations

import enum
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

import gevent
from gevent.event import Event
from gevent.socket import getaddrinfo

from .config import Setting, seconds
from .names import literal_ip

log = logging.getLogger("transocks")

Resolver = Callable[[str], Iterable[str]]

CAPACITY = 4096  # names remembered per worker; a forger's made-up names push out only the oldest
RETRY_MISS = 1.0  # seconds: an address missing from a fresh union asks the resolver again at most this often


class Verification(enum.Enum):
    """What the check says of a connection's name (the outcomes of the `name_checks` metric)."""

    VERIFIED = "verified"
    UNVERIFIED = "unverified"
    NONE = "none"  # no name was recovered


def settings(section: str) -> list[Setting]:
    """The check's settings, declared once for both daemons."""
    return [
        Setting("name_cache_ttl", seconds, 60.0,
                "a name's addresses are the union of the resolver's answers over this long (round-robin DNS "
                "answers subsets; one lookup would flap); also how long a name is remembered", section=section,
                metavar="SECONDS"),
        Setting("name_check_timeout", seconds, 1.0,
                "a name whose lookup takes longer is unverified for that connection (the lookup goes on for "
                "the next); 0 waits as long as the resolver does", section=section, metavar="SECONDS"),
    ]


def canonical(address: str) -> str:
    """One spelling per address (names.literal_ip's: IPv4-mapped IPv6 is its IPv4 address)."""
    ip = literal_ip(address.split("%", 1)[0])
    if ip is None:
        raise ValueError(f"not an IP address: {address!r}")
    return str(ip)


def system_resolver(name: str) -> list[str]:
    """The host's resolver (libc's getaddrinfo through gevent: in a thread, not in the loop)."""
    return [info[4][0] for info in getaddrinfo(name, None, 0, socket.SOCK_STREAM)]


class _Entry:
    __slots__ = ("addresses", "done", "looked")

    def __init__(self) -> None:
        self.addresses: dict[str, float] = {}  # canonical address -> when an answer last held it
        self.looked = float("-inf")  # when the last lookup ended
        self.done: Event | None = None  # set while a lookup is in flight


class NameCheck:
    """A bounded per-worker table of names and the addresses seen for them."""

    def __init__(self, ttl: float = 60.0, timeout: float = 1.0, resolver: Resolver = system_resolver,
                 capacity: int = CAPACITY) -> None:
        self.ttl = ttl
        self.timeout = timeout or None
        self.resolver = resolver
        self.capacity = capacity
        self._names: OrderedDict[str, _Entry] = OrderedDict()

    def cached(self, name: str, address: str) -> Verification | None:
        """The verdict without waiting, or None when only a lookup can tell."""
        entry = self._names.get(name.lower())
        if entry is None:
            return None
        now = time.monotonic()
        seen = entry.addresses.get(address)
        if seen is None and ":" in address:  # an IPv6 spelling, maybe of an IPv4 address
            try:
                seen = entry.addresses.get(canonical(address))
            except ValueError:
                return Verification.UNVERIFIED  # not an address at all
        if seen is not None and now - seen <= self.ttl:
            return Verification.VERIFIED
        if now - entry.looked < min(RETRY_MISS, self.ttl):
            return Verification.UNVERIFIED
        return None

    def check(self, name: str, address: str) -> Verification:
        """The verdict, waiting (this greenlet only) up to `timeout` for a lookup."""
        return self.cached(name, address) or self.wait(name, address)

    def wait(self, name: str, address: str) -> Verification:
        """The verdict after a lookup (started, or joined when one is in flight), waited for up
        to `timeout`; for a caller that already found `cached` without an answer."""
        self.lookup(name).wait(self.timeout)
        return self.cached(name, address) or Verification.UNVERIFIED

    def lookup(self, name: str) -> Event:
        """Start a lookup of `name` unless one is in flight; the event is set when it ends."""
        key = name.lower()
        entry = self._names.get(key)
        if entry is None:
            entry = self._names[key] = _Entry()
            while len(self._names) > self.capacity:
                self._names.popitem(last=False)
        else:
            self._names.move_to_end(key)
        if entry.done is None:
            entry.done = Event()
            gevent.spawn(self._resolve, key, entry)
        return entry.done

    def _resolve(self, name: str, entry: _Entry) -> None:
        try:
            answers = list(self.resolver(name))
        except (OSError, UnicodeError, ValueError) as exc:
            log.debug("name check: %s does not resolve: %s", name, exc)
            answers = []
        except Exception:
            log.exception("name check: looking up %s failed", name)
            answers = []
        now = time.monotonic()
        addresses = {a: t for a, t in entry.addresses.items() if now - t <= self.ttl}
        for answer in answers:
            try:
                addresses[canonical(answer)] = now
            except ValueError:
                continue
        entry.addresses = addresses
        entry.looked = now
        done, entry.done = entry.done, None
        if done is not None:
            done.set()
