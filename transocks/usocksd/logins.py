"""Login checks under load: few hashes at a time, one per client, and a failed-login limit.

Measured before this module (scrypt ln=14: ~70 ms and 16 MiB a hash, run in
gevent's shared 10-thread pool): 32 connections from one client sending wrong
passwords pushed other clients' uncached logins to 1.1-2.8 s, some past a 3 s
negotiation_timeout, and grew a worker from 19 MB to about 200 MB (each pool
thread's malloc arena keeps its 16 MiB).  Now:

- hashing runs in a pool of its own with `HASH_THREADS` threads, so at most
  that many hashes (and arenas) exist per worker;
- one client (an IPv4 address, an IPv6 /64) hashes one login at a time, so a
  flood from one client waits behind itself, not in front of everyone else;
- a client with `auth_fail_limit` failed logins within `auth_fail_window`
  is refused without hashing for the next `auth_fail_window`: logged once
  in the error log, and `outcome=auth_limited` in the access log.  The count
  is per worker.

A flood from many clients at once defeats the last two: 100 sources sending
new wrong passwords as fast as they could pushed a good client's first
login to 2.1 s median, some past a 3 s negotiation_timeout (`python -m
bench.logins`: on a loaded 2-core machine 3 of 5 good logins failed).  So
logins wait for a hash thread in a `HashQueue`, best standing first: a
client with no recent failed, shed or waiting logins goes before the
flooding ones, which have them after their first try.  The queue holds at
most `QUEUE_SECONDS` of hashing (by the measured hash time); beyond that
the worst-standing waiting login is refused unhashed (`outcome=auth_limited`)
rather than left to time out after using a hash's worth of the budget.
"""

from __future__ import annotations

import enum
import ipaddress
import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.event import Event
from gevent.lock import Semaphore
from gevent.threadpool import ThreadPool

from ..core import outcome
from ..core.names import IPAddress
from . import protocol as p
from .credentials import Credentials

log = logging.getLogger("usocksd")

HASH_THREADS = 2  # hashes at once per worker: the machine's cores are shared by the workers
MAX_SOURCES = 65536  # clients whose failures are remembered; the oldest are forgotten first
IPV6_PREFIX = 64  # an IPv6 client is its /64: one host usually has the whole subnet
QUEUE_SECONDS = 0.5  # hashing that may wait per worker, by the measured time of a hash
FIRST_HASH_GUESS = 0.05  # seconds a hash is taken to cost until one is measured
MAX_WAITING = 256  # logins waiting at most, however cheap the hashes (each wait is a scan of them)
LIMITED_DELAY = 1.0  # an unhashed refusal (auth_limited) is answered this late ...
MAX_HELD = 256  # ... unless this many are being held already

Clock = Callable[[], float]


class Throttled(Exception):
    """The login is refused unhashed: its client reached auth_fail_limit while it waited,
    or the hash queue was full of better-standing logins."""

    def __init__(self, why: str = "") -> None:
        super().__init__(why)
        self.why = why


def source_of(ip: IPAddress) -> IPAddress | ipaddress.IPv6Network:
    """What the per-client limits count by."""
    if ip.version == 6:
        return ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False)
    return ip


@dataclass
class _Record:
    """One client's failed and shed logins in its current window; `blocked_until` is set once
    the limit is hit."""

    window_start: float
    failures: int = 0
    shed: int = 0
    blocked_until: float = 0.0


class FailedLogins:
    """`auth_fail_limit` failures per `auth_fail_window` per client, then refused for one window."""

    def __init__(self, limit: int, window: float, clock: Clock = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._records: OrderedDict[Any, _Record] = OrderedDict()

    def _record(self, source: Any) -> _Record | None:
        rec = self._records.get(source)
        if rec is None:
            return None
        now = self.clock()
        if rec.blocked_until:
            if now < rec.blocked_until:
                return rec
        elif now - rec.window_start < self.window:
            return rec
        del self._records[source]
        return None

    def blocked(self, source: Any) -> bool:
        rec = self._record(source)
        return rec is not None and rec.blocked_until > 0

    def standing(self, source: Any) -> int:
        """The client's failed and shed logins in its window: 0 for a client in good standing."""
        rec = self._record(source)
        return 0 if rec is None else rec.failures + rec.shed

    def _current(self, source: Any) -> _Record:
        rec = self._record(source)
        if rec is None:
            rec = self._records[source] = _Record(self.clock())
            while len(self._records) > MAX_SOURCES:
                self._records.popitem(last=False)
        return rec

    def was_shed(self, source: Any) -> None:
        """Count a login refused unhashed for a full queue: standing only, not the limit."""
        if self.window:
            self._current(source).shed += 1

    def failed(self, source: Any) -> None:
        """Count one failure; log when it is the one that reaches the limit."""
        if not self.window:
            return
        rec = self._current(source)
        rec.failures += 1
        if self.limit and rec.failures >= self.limit and not rec.blocked_until:
            rec.blocked_until = self.clock() + self.window
            log.warning("client %s: %d failed logins within %gs; refusing its logins without checking for %gs",
                        source, rec.failures, self.window, self.window)


class _PerSource:
    """One lock per client, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Any, tuple[Semaphore, list[int]]] = {}

    def waiting(self, source: Any) -> int:
        """The client's logins waiting behind the one it is hashing."""
        entry = self._locks.get(source)
        return 0 if entry is None else max(0, entry[1][0] - 1)

    def run(self, source: Any, func: Callable[[], Any]) -> Any:
        entry = self._locks.get(source)
        if entry is None:
            entry = self._locks[source] = (Semaphore(), [0])
        lock, users = entry
        users[0] += 1
        try:
            with lock:
                return func()
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[source]


class _Turn(enum.Enum):
    WAITING = "waiting"
    HASHING = "hashing"
    SHED = "shed"


class _Job:
    """One login waiting for a hash thread; `low` once it runs on a thread anyone may take."""

    __slots__ = ("event", "low", "seq", "source", "turn")

    def __init__(self, source: Any, seq: int) -> None:
        self.source = source
        self.seq = seq
        self.turn = _Turn.WAITING
        self.low = False
        self.event = Event()


class HashQueue:
    """At most `threads` hashes at once, one thread of them kept for clients in good standing.

    Waiting logins go in order of their client's standing (`rank(source)`,
    lower first; then first come); at most `budget` seconds of hashing wait.
    A client of rank 0 (no failed, shed or waiting logins) may take any
    thread; others only those not kept, so a good login waits at most for
    the good logins ahead of it, never for a flood's hashes.
    """

    def __init__(self, threads: int, rank: Callable[[Any], int], budget: float = QUEUE_SECONDS) -> None:
        self.threads = threads
        self.kept = min(1, threads - 1)  # threads only rank-0 clients may take
        self.rank = rank
        self.budget = budget
        self.running = 0
        self.running_low = 0  # of them, hashing for clients not in good standing
        self.waiting: list[_Job] = []
        self.hash_seconds = FIRST_HASH_GUESS  # a moving average of measured hashes
        self._seq = itertools.count()
        self._pool: ThreadPool | None = None
        self._pool_pid = 0

    def _hash_pool(self) -> ThreadPool:
        """Made in the process that hashes: a pool's threads do not survive a fork."""
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPool(self.threads)
            self._pool_pid = os.getpid()
        return self._pool

    @property
    def capacity(self) -> int:
        """Logins that may wait: `budget` seconds of hashing on every thread."""
        return max(self.threads, min(MAX_WAITING, int(self.budget * self.threads / self.hash_seconds)))

    def run(self, source: Any, func: Callable[..., Any], args: tuple) -> Any:
        """func(*args) in a hash thread once it is this login's turn; Throttled when shed."""
        job = _Job(source, next(self._seq))
        self._enqueue(job)
        self._next()
        if job.turn is not _Turn.HASHING:
            self._wait(job)
        started = time.monotonic()
        try:
            return self._hash_pool().apply(func, args)
        finally:
            self.hash_seconds = 0.8 * self.hash_seconds + 0.2 * (time.monotonic() - started)
            self._done(job)

    def _enqueue(self, job: _Job) -> None:
        """Wait in line; with the line full, the worst-standing login (this one, or one
        already waiting) is shed."""
        if len(self.waiting) >= self.capacity:
            worst = max(self.waiting, key=self._order)
            if self._order(worst) < self._order(job):
                raise Throttled(f"hash queue full ({len(self.waiting)} logins waiting); not checked")
            self.waiting.remove(worst)
            worst.turn = _Turn.SHED
            worst.event.set()
        self.waiting.append(job)

    def _wait(self, job: _Job) -> None:
        try:
            job.event.wait()
        except BaseException:  # the connection's deadline, or the worker stopping
            if job.turn is _Turn.WAITING:
                self.waiting.remove(job)
            elif job.turn is _Turn.HASHING:  # given a thread it will not use
                self._done(job)
            raise
        if job.turn is _Turn.SHED:
            raise Throttled(f"hash queue full of better-standing logins ({self.capacity}); not checked")

    def _order(self, job: _Job) -> tuple[int, int]:
        return self.rank(job.source), job.seq

    def _next(self) -> None:
        """Give each free thread to the best waiting login that may take it (taken now, so no
        newcomer slips in between its wake-up and its hash)."""
        while self.waiting and self.running < self.threads:
            best = min(self.waiting, key=self._order)
            low = self.rank(best.source) > 0
            if low and self.running_low >= self.threads - self.kept:
                return  # the best is not in good standing: nor is anyone waiting
            self.waiting.remove(best)
            best.turn, best.low = _Turn.HASHING, low
            self.running += 1
            self.running_low += low
            best.event.set()

    def _done(self, job: _Job) -> None:
        self.running -= 1
        self.running_low -= job.low
        self._next()


class LoginGate:
    """Checks one connection's user and password for the server (see the module docstring)."""

    def __init__(self, limit: int, window: float, threads: int = HASH_THREADS, clock: Clock = time.monotonic) -> None:
        self.failures = FailedLogins(limit, window, clock)
        self._per_source = _PerSource()
        self.hashes = HashQueue(threads, self.standing)
        self.held = 0  # refused logins waiting out LIMITED_DELAY

    def standing(self, source: Any) -> int:
        """Lower goes first: the client's failed, shed and waiting logins."""
        return self.failures.standing(source) + self._per_source.waiting(source)

    def check(self, credentials: Credentials, user: bytes, password: bytes, client: IPAddress) -> None:
        """Returns when the login is good, else raises Refused saying why."""
        source = source_of(client)
        limited = p.Refused(p.NOT_ALLOWED, outcome.AUTH_LIMITED, f"too many failed logins from {source}; not checked")
        if self.failures.blocked(source):
            self._hold()
            raise limited
        if not user:
            ok = False
        else:
            def offload(func: Callable[..., Any], *args: Any) -> Any:
                return self._per_source.run(source, lambda: self._hash(source, func, args))

            try:
                ok = credentials.check(user, password, offload)
            except Throttled as exc:
                self._hold()
                if exc.why:
                    self.failures.was_shed(source)
                    raise p.Refused(p.NOT_ALLOWED, outcome.AUTH_LIMITED, exc.why) from None
                raise limited from None
        if not ok:
            self.failures.failed(source)
            shown = user.decode("utf-8", "backslashreplace")
            raise p.Refused(p.NOT_ALLOWED, outcome.AUTH_FAILED, f"wrong user name or password for {shown!r}")

    def _hold(self) -> None:
        """Answer a login refused unhashed only after `LIMITED_DELAY` (at most `MAX_HELD` at once).

        A flooding client that is refused at once tries again at once: 200 such
        connections took ~700 refusals a second, and the worker's loop, from
        everyone else (a good login's greeting waited 0.2-0.3 s for it)."""
        if self.held >= MAX_HELD:
            return
        self.held += 1
        try:
            gevent.sleep(LIMITED_DELAY)
        finally:
            self.held -= 1

    def _hash(self, source: Any, func: Callable[..., Any], args: tuple) -> Any:
        if self.failures.blocked(source):  # reached while this login waited for the client's lock
            raise Throttled()
        return self.hashes.run(source, func, args)
