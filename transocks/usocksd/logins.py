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
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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

Clock = Callable[[], float]


class Throttled(Exception):
    """The client reached auth_fail_limit while its login waited to be hashed."""


def source_of(ip: IPAddress) -> IPAddress | ipaddress.IPv6Network:
    """What the per-client limits count by."""
    if ip.version == 6:
        return ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False)
    return ip


@dataclass
class _Record:
    """One client's failures in its current window; `blocked_until` is set once the limit is hit."""

    window_start: float
    failures: int = 0
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

    def failed(self, source: Any) -> None:
        """Count one failure; log when it is the one that reaches the limit."""
        if not self.limit:
            return
        rec = self._record(source)
        if rec is None:
            rec = self._records[source] = _Record(self.clock())
            while len(self._records) > MAX_SOURCES:
                self._records.popitem(last=False)
        rec.failures += 1
        if rec.failures >= self.limit and not rec.blocked_until:
            rec.blocked_until = self.clock() + self.window
            log.warning("client %s: %d failed logins within %gs; refusing its logins without checking for %gs",
                        source, rec.failures, self.window, self.window)


class _PerSource:
    """One lock per client, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Any, tuple[Semaphore, list[int]]] = {}

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


class LoginGate:
    """Checks one connection's user and password for the server (see the module docstring)."""

    def __init__(self, limit: int, window: float, threads: int = HASH_THREADS, clock: Clock = time.monotonic) -> None:
        self.failures = FailedLogins(limit, window, clock)
        self.threads = threads
        self._per_source = _PerSource()
        self._pool: ThreadPool | None = None
        self._pool_pid = 0

    def _hash_pool(self) -> ThreadPool:
        """Made in the process that hashes: a pool's threads do not survive a fork."""
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPool(self.threads)
            self._pool_pid = os.getpid()
        return self._pool

    def check(self, credentials: Credentials, user: bytes, password: bytes, client: IPAddress) -> None:
        """Returns when the login is good, else raises Refused saying why."""
        source = source_of(client)
        limited = p.Refused(p.NOT_ALLOWED, outcome.AUTH_LIMITED, f"too many failed logins from {source}; not checked")
        if self.failures.blocked(source):
            raise limited
        if not user:
            ok = False
        else:
            def offload(func: Callable[..., Any], *args: Any) -> Any:
                return self._per_source.run(source, lambda: self._hash(source, func, args))

            try:
                ok = credentials.check(user, password, offload)
            except Throttled:
                raise limited from None
        if not ok:
            self.failures.failed(source)
            shown = user.decode("utf-8", "backslashreplace")
            raise p.Refused(p.NOT_ALLOWED, outcome.AUTH_FAILED, f"wrong user name or password for {shown!r}")

    def _hash(self, source: Any, func: Callable[..., Any], args: tuple) -> Any:
        if self.failures.blocked(source):  # reached while this login waited for the client's lock
            raise Throttled()
        return self._hash_pool().apply(func, args)
