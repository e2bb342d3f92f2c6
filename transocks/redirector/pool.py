"""Exits chosen per connection: pools of members, their balance order and failover.

A pool is a list of configured proxy URLs.  Each URL stands for one member,
or, when its host is a name, for one member per address the name resolves to
(see `health.Discovery`).  A member is shared by every pool that lists its URL, so it
is checked once and its health and live connections are one state.  All of it
is per worker: health, passive ejection and least-conn counts are what this
worker has seen.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import itertools
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gevent.hub import get_hub

from ..core import outcome
from ..core.config import AUTO, boolean
from ..core.netutil import Endpoint, ip_literal
from ..core.nio import Stream
from ..runtime.metrics import ConnectionStats
from .upstream import Dialer, ProxyURL, UpstreamError, make_dialer, parse_proxy_url
from .upstream.base import at_member
from .upstream.dial import Dial

log = logging.getLogger("transocks")

DEFAULT_POOL = "default"
DIRECT = "direct"
REJECT = "reject"
RESERVED = (DEFAULT_POOL, DIRECT, REJECT)
BALANCES = ("sticky", "round-robin", "least-conn")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$")


NAMED_SCHEMES = frozenset({"socks5", "socks4a", "http"})  # exits whose request can carry a name


# --- configuration -------------------------------------------------------------------


@dataclass(frozen=True)
class PoolSpec:
    """A pool as configured: `pool = NAME URL [URL...] [balance=...] [send_domain=...]`."""

    name: str
    urls: tuple[ProxyURL, ...]
    balance: str = "sticky"
    send_domain: bool = False

    def __str__(self) -> str:
        """The pool as a config line would state it, without passwords."""
        return " ".join([self.name, *map(str, self.urls), f"balance={self.balance}",
                         f"send_domain={'true' if self.send_domain else 'false'}"])


def pool_name(text: str) -> str:
    if not _NAME.match(text):
        raise ValueError(f"bad pool name {text!r} (a letter, then letters, digits, '_', '-', '.')")
    return text


def balance(text: str) -> str:
    v = text.strip().lower()
    if v not in BALANCES:
        raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {text!r}")
    return v


def parse_pool(text: str) -> PoolSpec:
    """Parse the value of one `pool` line."""
    words = text.split()
    if len(words) < 2:
        raise ValueError("expected NAME URL [URL...] [balance=sticky|round-robin|least-conn] [send_domain=BOOL]")
    name = pool_name(words[0])
    if name in RESERVED:
        raise ValueError(f"{name!r} is reserved (route targets {', '.join(RESERVED)} exist already)")
    urls: list[ProxyURL] = []
    options: dict[str, str] = {}
    for word in words[1:]:
        if "://" in word:
            urls.append(parse_proxy_url(word))
            continue
        key, eq, value = word.partition("=")
        if not eq or key not in ("balance", "send_domain"):
            raise ValueError(f"unknown pool option {word!r} (balance=, send_domain=)")
        if key in options:
            raise ValueError(f"{key} given twice")
        options[key] = value
    if not urls:
        raise ValueError(f"pool {name} has no member URL")
    if any(u.scheme == REJECT for u in urls):
        raise ValueError("reject:// cannot be a pool member (route to `reject` instead)")
    return PoolSpec(name, tuple(urls), balance(options.get("balance", "sticky")),
                    boolean(options.get("send_domain", "false")))


ALL = "all"


def retries(text: str) -> int | str:
    """Members tried after the first fails: a number, or `all`."""
    v = text.strip().lower()
    if v == ALL:
        return ALL
    n = int(v)
    if n < 0:
        raise ValueError("must not be negative")
    return n


# --- members and their health ---------------------------------------------------------


class Health(enum.Enum):
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class HealthPolicy:
    """HAProxy's counters: `fall` failures in a row take a member out, `rise` successes bring it back."""

    rise: int = 2
    fall: int = 3


class Member:
    """One proxy address of a pool: its dialer, health and this worker's live connections through it."""

    __slots__ = ("active", "dialer", "dials", "fails", "failures", "key", "label", "last_error", "oks", "state")

    def __init__(self, dialer: Dialer, label: str) -> None:
        self.dialer = dialer
        self.label = label  # the configured URL when its name was resolved to this address
        self.key = str(dialer).encode()  # the sticky hash seed: the same in every worker and after restarts
        self.state = Health.UP  # until a check or a dial says otherwise: no start-up delay
        self.fails = 0
        self.oks = 0
        self.active = 0
        self.dials = 0  # tunnels this worker tried through it, and those that failed at the member
        self.failures = 0
        self.last_error = ""

    def __str__(self) -> str:
        return str(self.dialer)

    @property
    def up(self) -> bool:
        return self.state is Health.UP

    def record(self, ok: bool, policy: HealthPolicy, why: str, how: str) -> None:
        """Count one check or dial (`how` says which); log a change of state once."""
        if ok:
            self.fails = 0
            self.oks += 1
            if self.state is Health.DOWN and self.oks >= policy.rise:
                self.state = Health.UP
                log.warning("exit %s is up again (%d good %s in a row)", self.describe(), self.oks, how)
            return
        self.oks = 0
        self.fails += 1
        self.last_error = why
        if self.state is Health.UP and self.fails >= policy.fall:
            self.state = Health.DOWN
            log.warning("exit %s is down after %d failed %s in a row: %s", self.describe(), self.fails, how, why)

    def describe(self) -> str:
        return str(self) if self.label == str(self) else f"{self} ({self.label})"


@dataclass
class Source:
    """The members one configured URL stands for: itself, or one per address of its name."""

    url: ProxyURL
    members: list[Member] = field(default_factory=list)

    @property
    def is_name(self) -> bool:
        if self.url.scheme in (DIRECT, REJECT):
            return False
        try:
            ipaddress.ip_address(self.url.host)
            return False
        except ValueError:
            return True


@dataclass(frozen=True)
class DialSettings:
    connect_timeout: float
    handshake_timeout: float
    socks5_pipelining: bool | str = AUTO  # AUTO: per member, as each says
    fastopen: bool = False


class Exits:
    """Every member of every pool of this worker, one per configured URL and address."""

    def __init__(self, dial: DialSettings, policy: HealthPolicy) -> None:
        self.dial = dial
        self.policy = policy
        self.sources: dict[ProxyURL, Source] = {}
        self.pools: list[Pool] = []

    def source(self, url: ProxyURL) -> Source:
        src = self.sources.get(url)
        if src is None:
            src = self.sources[url] = Source(url)
            if not src.is_name:
                src.members = [Member(self._dialer(url), str(url))]
        return src

    def _dialer(self, url: ProxyURL) -> Dialer:
        return make_dialer(url, self.dial.connect_timeout, self.dial.handshake_timeout, self.dial.socks5_pipelining,
                           self.dial.fastopen)

    def set_addresses(self, src: Source, addresses: Sequence[str]) -> tuple[list[str], list[str]]:
        """Make `src`'s members the given addresses, keeping the state of those that stay.

        Returns the addresses added and removed.
        """
        old = {m.dialer.url.host: m for m in src.members}
        members = []
        for addr in addresses:
            m = old.get(addr)
            if m is None:
                m = Member(self._dialer(replace(src.url, host=addr)), str(src.url))
            members.append(m)
        src.members = members
        for pool in self.pools:
            pool.rebuild()
        return [a for a in addresses if a not in old], [a for a in old if a not in addresses]

    def members(self) -> list[Member]:
        return [m for src in self.sources.values() for m in src.members]

    def endpoints(self) -> set[Endpoint]:
        """Every member's proxy address, for the loop guard."""
        return {m.dialer.upstream for m in self.members() if m.dialer.upstream is not None}

    def pool(self, name: str, urls: Iterable[ProxyURL], balance: str = "sticky", send_domain: bool = False,
             retries: int | str = ALL, checked: bool = True) -> Pool:
        p = Pool(name, [self.source(u) for u in urls], self, balance, send_domain, retries, checked)
        self.pools.append(p)
        return p

    def checked_members(self) -> list[Member]:
        """Members that active health checks probe (not the built-in direct exit)."""
        seen: dict[int, Member] = {}
        for p in self.pools:
            if p.checked:
                for m in p.members:
                    seen[id(m)] = m
        return list(seen.values())


# --- pools ----------------------------------------------------------------------------


class Pool:
    """Members in balance order; `begin` fails over to the next member before the client sees anything."""

    def __init__(self, name: str, sources: list[Source], exits: Exits, balance: str = "sticky",
                 send_domain: bool = False, retries: int | str = ALL, checked: bool = True) -> None:
        self.name = name
        self.sources = sources
        self.exits = exits
        self.balance = balance
        self.send_domain = send_domain
        self.retries = retries
        self.checked = checked
        self.members: list[Member] = []
        self._turn = itertools.count()
        dial = exits.dial
        # One deadline for every try: what a single member may take, spread over the failover.
        self.budget = dial.connect_timeout + dial.handshake_timeout if dial.connect_timeout and dial.handshake_timeout else None
        self.rebuild()

    def rebuild(self) -> None:
        self.members = [m for src in self.sources for m in src.members]

    def __str__(self) -> str:
        return self.name

    def order(self, dest: Endpoint) -> list[Member]:
        """Every member, best first for this destination."""
        members = self.members
        if len(members) < 2:
            return list(members)
        if self.balance == "sticky":
            return sorted(members, key=lambda m: _score(m.key, dest.host), reverse=True)
        start = next(self._turn) % len(members)
        rotated = members[start:] + members[:start]
        if self.balance == "least-conn":
            rotated.sort(key=lambda m: m.active)  # stable: ties keep the round-robin turn
        return rotated

    def candidates(self, dest: Endpoint) -> list[Member]:
        """Members to try in order: the healthy ones; when none is, the best one anyway
        (its checks may lag behind a recovery), so a pool never refuses without trying."""
        ordered = self.order(dest)
        up = [m for m in ordered if m.up]
        chosen = up or ordered[:1]
        if self.retries != ALL:
            chosen = chosen[: 1 + int(self.retries)]
        return chosen

    def begin(self, conn: Flow, on_done: Callable[..., None], context: Any = None) -> Opening:
        """Start opening a tunnel for `conn` on callbacks; `on_done(opening, context)` gets
        the result (possibly before this returns)."""
        opening = Opening(self, conn, on_done, context)
        opening.start()
        return opening


class Opening:
    """One connection's way through its pool, on callbacks.

    Members are tried in balance order within connect_timeout +
    handshake_timeout in all (a single try is bounded by its dial's own
    timer); a failure at a member moves on, the destination's own answer
    (refused, unreachable) from a member that works ends it.  `conn.member`
    and `conn.tries` say who was tried; at the end `error` is None and
    `stream()` is the tunnel, or `error` says why there is none.
    """

    __slots__ = (
        "conn",
        "context",
        "current",
        "dest",
        "error",
        "last",
        "left",
        "named",
        "on_done",
        "pool",
        "timer",
        "tunnel",
    )

    def __init__(self, pool: Pool, conn: Flow, on_done: Callable[..., None], context: Any = None) -> None:
        assert conn.dest is not None
        self.context = context
        self.pool = pool
        self.conn = conn
        self.on_done = on_done
        self.dest = conn.dest
        self.named = Endpoint(conn.name, conn.dest.port) if pool.send_domain and conn.name else conn.dest
        self.left: Iterator[Member] = iter(())
        self.current: Dial | None = None
        self.tunnel: Dial | None = None
        self.timer: Any = None
        self.last: BaseException | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        pool = self.pool
        candidates = pool.candidates(self.dest)
        if not candidates:
            self._end(UpstreamError(outcome.UPSTREAM_UNREACHABLE, f"pool {pool.name} has no members (name not resolved?)"))
            return
        if pool.budget and len(candidates) > 1:
            self.timer = get_hub().loop.timer(pool.budget)
            self.timer.start(self._out_of_time, update=True)
        self.left = iter(candidates)
        self._next()

    @property
    def done(self) -> bool:
        return self.error is not None or self.tunnel is not None

    def stream(self) -> Stream:
        """The tunnel (after a success), or the failure raised."""
        if self.error is not None:
            raise self.error
        assert self.tunnel is not None
        return self.tunnel.stream()

    def abort(self, detail: str, name: str = outcome.SHUTDOWN) -> None:
        """Give up now (a worker stopping): on_done sees outcome `name`."""
        if not self.done:
            self._end(outcome.Failure(name, detail))

    def _next(self) -> None:
        m = next(self.left, None)
        if m is None:
            assert self.last is not None
            self._end(self.last)
            return
        conn = self.conn
        conn.member = m
        conn.tries += 1
        m.dials += 1
        if self.named is not self.dest and m.dialer.url.scheme in NAMED_SCHEMES:
            d = m.dialer.begin(self.named, None, self._tried)
        else:
            d = m.dialer.begin(self.dest, conn.wire, self._tried)
        if d.under_way:  # not already ended within begin
            self.current = d

    def _tried(self, d: Dial) -> None:
        self.current = None
        m = self.conn.member
        assert m is not None
        policy = self.pool.exits.policy
        exc = d.error
        if exc is None:
            m.record(True, policy, "", "dials")
            self.tunnel = d
            self._end(None)
            return
        if not isinstance(exc, outcome.Failure):
            self._end(exc)  # not a dial's failure (a bug): the handler logs it
            return
        if not at_member(exc):
            m.record(True, policy, "", "dials")  # the member works; the destination said no
            self._end(exc)
            return
        m.record(False, policy, str(exc), "dials")
        m.failures += 1
        self.last = exc
        self._next()

    def _out_of_time(self) -> None:
        pool = self.pool
        self._end(UpstreamError(outcome.UPSTREAM_TIMEOUT,
                                f"pool {pool.name}: no tunnel within {pool.budget:g}s ({self.conn.tries} tried)"))

    def _end(self, error: BaseException | None) -> None:
        self.error = error
        if self.current is not None:
            self.current.cancel()
            self.current = None
        if self.timer is not None:
            self.timer.close()
            self.timer = None
        self.on_done(self, self.context)


def _score(key: bytes, host: str) -> bytes:
    """Rendezvous (highest random weight) hashing: each member's score for a destination
    depends on that pair only, so removing a member moves only the destinations it held."""
    return hashlib.blake2b(key + b"|" + host.encode(), digest_size=8).digest()


class Flow:
    """One connection as routing and the dial see it, filled in as it goes: the handler
    sets the destination (and the name, when one was recovered), the router the rule,
    the pool the member it went through and how many it tried."""

    __slots__ = ("dest", "listen_port", "member", "name", "peer", "pool", "rule", "tries", "wire")

    def __init__(self, dest: Endpoint | None, peer: Endpoint, listen_port: int | None = None,
                 name: str | None = None) -> None:
        self.dest = dest
        self.peer = peer
        self.listen_port = listen_port  # the port of the listener it arrived on, when the worker says
        self.name = name  # the destination's host name when one was recovered, else None
        self.wire: bytes | None = None  # dest as SOCKS5 puts it (ATYP, address, port), from the kernel's bytes
        self.pool: Pool | None = None
        self.member: Member | None = None
        self.tries = 0
        self.rule: object | None = None

    @property
    def dest_addr(self) -> tuple[int, int]:
        """The destination address as (length in bytes, integer), for dst= rules."""
        assert self.dest is not None
        return _as_int(self.dest.host)

    @property
    def peer_addr(self) -> tuple[int, int]:
        return _as_int(self.peer.host)


def _as_int(host: str) -> tuple[int, int]:
    literal = ip_literal(host)
    if literal is None:
        raise ValueError(f"not an IP address: {host!r}")
    packed = literal[1]
    return len(packed), int.from_bytes(packed, "big")


__all__ = [
    "DialSettings",
    "Exits",
    "Flow",
    "Health",
    "HealthPolicy",
    "Member",
    "Opening",
    "Pool",
    "PoolSpec",
    "parse_pool",
    "retries",
]


def member_views(exits: Exits) -> list[tuple[str, Member]]:
    """(pool name, member) for every member of every pool, for metrics and status."""
    return [(p.name, m) for p in exits.pools for m in p.members]


def report_members(exits: Exits, stats: ConnectionStats) -> None:
    """Give this worker's members to the metrics (refreshed each heartbeat) and to the status."""
    stats.declare("gauge", "upstream_up", ("pool", "member"), "1 when every worker sees the member healthy")
    stats.declare("counter", "upstream_dials", ("pool", "member"), "tunnels tried through the member")
    stats.declare("counter", "upstream_failures", ("pool", "member"), "tries that failed at the member")

    def refresh() -> None:
        for pool, m in member_views(exits):
            labels = (pool, str(m))
            stats.gauges[("upstream_up", labels)] = 1.0 if m.up else 0.0
            stats.events[("upstream_dials", labels)] = m.dials
            stats.events[("upstream_failures", labels)] = m.failures

    def report() -> list[dict]:
        return [{"pool": pool, "member": str(m), "up": m.up, "active": m.active, "dials": m.dials,
                 "failures": m.failures, "last_error": m.last_error[:200]} for pool, m in member_views(exits)]

    stats.refresh.append(refresh)
    stats.report = report
