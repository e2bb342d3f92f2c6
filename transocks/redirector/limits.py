"""Per-source limits (gateway mode): concurrent connections and new connections a second per client address.

A gateway serves a whole network; one host that opens connections without end
(a bug, a scanner, a worm) must not take every descriptor of the proxy from
the others.  Excess connections are refused with a reset, counted by reason in
`SourceLimits.refused`, and warned about at most once a second per source.

Per worker, not exact across workers.  The workers share one accept queue and
whichever wakes first takes a connection, so one source's connections land on
any of them; an exact limit would need state shared by all workers on every
accept (shared memory and a lock, or a round trip to the master), which costs
more than the whole per-connection budget and ties the workers together (a
worker that dies holding the lock or a count).  Each worker therefore enforces
the limits on what it sees: a source gets at least the limit and at most
`workers` times it.

IPv6 sources count per address, not per /64: a gateway's LAN is usually one
/64, so grouping by prefix would put every host of the network under one
limit.  A host can evade the limit by taking more addresses of its /64 (as it
can on IPv4 by taking more addresses of the LAN); the table bound below keeps
that from costing memory.

State is bounded.  A source with connections open has an entry (at most one
per connection the worker holds, already bounded by `max_connections`); an
idle source keeps its entry only until its bucket is full again and its warning
interval is over, and at most `max_idle` idle entries are kept, the oldest
forgotten first.  A forgotten source starts again with a full bucket, which is
what it would have had anyway, except when a flood of sources pushes it out
early.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable

log = logging.getLogger("transocks")

MAX_CONNS = "max_conns"  # `refused` reasons: too many open
RATE = "rate"  # too many new a second
REASONS = (MAX_CONNS, RATE)
WARN_INTERVAL = 1.0  # seconds between two warnings about one source
MAX_IDLE_SOURCES = 16384  # idle entries kept, ~300 bytes each with its key (~5 MiB; measured, tracemalloc)


class TokenBucket:
    """`burst` tokens at most, `rate` more a second; a connection takes one.

    The rate and burst are the limiter's, passed in, so that a bucket is two
    floats: there is one per source.
    """

    __slots__ = ("stamp", "tokens")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.stamp = now

    def take(self, rate: float, burst: float, now: float) -> bool:
        """Take a token if one is there (after refilling for the time since the last call)."""
        tokens = self.tokens + (now - self.stamp) * rate
        self.tokens = min(tokens, burst)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class _Source(TokenBucket):
    """One client address: its bucket, its open connections, its warning state."""

    __slots__ = ("active", "idle_since", "unwarned", "warned")

    def __init__(self, burst: float, now: float) -> None:
        super().__init__(burst, now)
        self.active = 0
        self.idle_since = now
        self.warned = -math.inf  # when the last warning about this source was logged
        self.unwarned = 0  # refusals since then, told in the next warning


class SourceLimits:
    """The limits of one worker; `admit` on accept, `release` when an admitted connection ends."""

    def __init__(self, max_conns: int, rate: float, burst: int = 0, *, max_idle: int = MAX_IDLE_SOURCES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_conns = max_conns  # 0: no limit
        self.rate = rate  # 0: no limit
        self.burst = float(burst or max(1, math.ceil(rate)))
        self.max_idle = max_idle
        self.clock = clock
        # An idle entry is worth keeping while its bucket is below full or its warning interval runs.
        self.forget_after = max(WARN_INTERVAL, self.burst / rate if rate else 0.0)
        self.busy: dict[str, _Source] = {}  # sources with connections open
        self.idle: OrderedDict[str, _Source] = OrderedDict()  # the others, oldest first
        self.refused = dict.fromkeys(REASONS, 0)  # for metrics: refusals by reason, since the worker started

    @classmethod
    def configured(cls, max_conns: int, rate: float, burst: int = 0) -> SourceLimits | None:
        """The limits the settings ask for, or None when both are off (nothing to do per connection)."""
        return cls(max_conns, rate, burst) if max_conns or rate else None

    def __len__(self) -> int:
        return len(self.busy) + len(self.idle)

    def admit(self, source: str) -> str | None:
        """None when the connection may go on (release it when it ends); else why it is refused."""
        now = self.clock()
        entry = self.busy.get(source)
        if entry is None:
            entry = self.idle.pop(source, None)
            if entry is None:
                self._forget(now)
                entry = _Source(self.burst, now)
        if self.max_conns and entry.active >= self.max_conns:
            reason = MAX_CONNS
        elif self.rate and not entry.take(self.rate, self.burst, now):
            reason = RATE
        else:
            entry.active += 1
            self.busy[source] = entry
            return None
        if not entry.active:
            entry.idle_since = now
            self.idle[source] = entry
        return self._refuse(source, entry, reason, now)

    def release(self, source: str) -> None:
        """An admitted connection ended (relayed or refused later on)."""
        entry = self.busy.get(source)
        if entry is None:  # cannot happen when every admit is paired with one release
            return
        entry.active -= 1
        if not entry.active:
            del self.busy[source]
            entry.idle_since = now = self.clock()
            self._forget(now)
            self.idle[source] = entry

    def _forget(self, now: float) -> None:
        """Before an idle entry is added: drop those that no longer matter, and the oldest beyond `max_idle`."""
        idle = self.idle
        horizon = now - self.forget_after
        while idle:
            oldest = next(iter(idle.values()))
            if oldest.idle_since > horizon and len(idle) < self.max_idle:
                return
            idle.popitem(last=False)

    def _refuse(self, source: str, entry: _Source, reason: str, now: float) -> str:
        """Count the refusal, warn at most once a second per source, and say why (for the access log)."""
        self.refused[reason] += 1
        if reason == MAX_CONNS:
            why = f"{entry.active} connections open from this source (max_conns_per_source {self.max_conns})"
        else:
            why = (f"more than {self.rate:g} new connections a second from this source "
                   f"(conn_rate_per_source {self.rate:g}, burst {self.burst:g})")
        if now - entry.warned >= WARN_INTERVAL:
            more = f"; {entry.unwarned} more refused since the last warning" if entry.unwarned else ""
            log.warning("source_limited client=%s: %s%s", source, why, more)
            entry.warned = now
            entry.unwarned = 0
        else:
            entry.unwarned += 1
        return why
