"""Login checks under load: the failed-login limit, one hash per client at a time, a bounded hash pool."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time

import gevent
import pytest

from transocks.core import outcome
from transocks.usocksd import credentials as cr
from transocks.usocksd import logins
from transocks.usocksd import protocol as p
from transocks.usocksd.credentials import Credentials, hash_password
from transocks.usocksd.logins import FailedLogins, LoginGate, source_of

A = ipaddress.ip_address("192.0.2.1")
B = ipaddress.ip_address("192.0.2.2")


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch):
    monkeypatch.setattr(cr, "SCRYPT_LN", 4)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingCredentials(Credentials):
    """Counts the hashes that reach the pool, and how many run at once."""

    def __init__(self, users: dict[str, str], delay: float = 0.0) -> None:
        super().__init__({u: hash_password(pw) for u, pw in users.items()}, verified=cr.VerifiedLogins(64))
        self.delay = delay
        self.hashed = 0
        self.started: list[bytes] = []  # users, in the order their hashes began
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def check(self, user, password, offload=cr._direct):
        def measured(func, *args):
            def run(*a):
                with self._lock:
                    self.started.append(user)
                    self.hashed += 1
                    self.running += 1
                    self.most = max(self.most, self.running)
                try:
                    time.sleep(self.delay)  # in a pool thread: a real sleep, like a real hash
                    return func(*a)
                finally:
                    with self._lock:
                        self.running -= 1
            return offload(run, *args)
        return super().check(user, password, measured)


def login(gate, creds, user, password, client):
    """None when good, else (outcome, reason)."""
    try:
        gate.check(creds, user, password, client)
    except p.Refused as exc:
        return exc.outcome, str(exc)
    return None


@pytest.fixture
def no_hold(monkeypatch):
    """Refusals without a hash are answered at once (their delay is tested on its own)."""
    monkeypatch.setattr(logins, "LIMITED_DELAY", 0.0)


def test_sources_are_addresses_and_ipv6_slash_64s():
    assert source_of(A) == A
    assert source_of(ipaddress.ip_address("2001:db8::1")) == source_of(ipaddress.ip_address("2001:db8::ffff:1"))
    assert source_of(ipaddress.ip_address("2001:db8::1")) != source_of(ipaddress.ip_address("2001:db8:0:1::1"))


def test_limit_refuses_without_hashing_for_one_window_and_logs_once(caplog, no_hold):
    clock = Clock()
    gate = LoginGate(3, 60.0, clock=clock)
    creds = CountingCredentials({"alice": "wonder"})
    caplog.set_level(logging.WARNING, "usocksd")
    for n in range(3):
        assert login(gate, creds, b"alice", b"wrong%d" % n, A) == (outcome.AUTH_FAILED,
                                                                 "wrong user name or password for 'alice'")
    assert creds.hashed == 3
    for _ in range(5):
        assert login(gate, creds, b"alice", b"wonder", A) == (outcome.AUTH_LIMITED,
                                                            "too many failed logins from 192.0.2.1; not checked")
    assert creds.hashed == 3  # refused without hashing, even the right password
    assert login(gate, creds, b"alice", b"wonder", B) is None  # other clients are not affected
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "192.0.2.1: 3 failed logins within 60s" in warnings[0]
    clock.now += 59
    assert login(gate, creds, b"alice", b"wonder", A) is not None
    clock.now += 2
    assert login(gate, creds, b"alice", b"wonder", A) is None  # the window is over


def test_failures_outside_the_window_do_not_add_up():
    clock = Clock()
    limits = FailedLogins(3, 10.0, clock)
    for _ in range(10):
        limits.failed(A)
        limits.failed(A)
        assert not limits.blocked(A)
        clock.now += 11
    assert not FailedLogins(0, 10.0, clock).blocked(A)  # 0 disables


def test_a_flood_from_one_client_hashes_one_at_a_time_and_stops_at_the_limit():
    """Many connections at once, each a different wrong password: the first limit ones are hashed,
    one after another; the rest are refused without a hash once the limit is reached."""
    gate = LoginGate(5, 60.0)
    creds = CountingCredentials({"alice": "wonder"}, delay=0.02)
    jobs = [gevent.spawn(login, gate, creds, b"alice", b"wrong%d" % n, A) for n in range(32)]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert creds.hashed == 5 and creds.most == 1
    assert sum(j.value[0] == outcome.AUTH_LIMITED for j in jobs) == 27


def test_hashing_is_bounded_per_worker():
    """Logins from many clients at once: never more than the pool's threads hash together."""
    gate = LoginGate(5, 60.0, threads=2)
    creds = CountingCredentials({f"u{n}": "pw" for n in range(12)}, delay=0.02)
    sources = [ipaddress.ip_address(f"192.0.2.{n + 10}") for n in range(12)]
    jobs = [gevent.spawn(login, gate, creds, b"u%d" % n, b"pw", sources[n]) for n in range(12)]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert [j.value for j in jobs] == [None] * 12
    assert creds.hashed == 12 and creds.most == 2


def test_one_login_presented_by_many_connections_is_hashed_once():
    gate = LoginGate(5, 60.0)
    creds = CountingCredentials({"alice": "wonder"}, delay=0.05)
    jobs = [gevent.spawn(login, gate, creds, b"alice", b"wonder", ipaddress.ip_address(f"192.0.2.{n + 10}"))
            for n in range(30)]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert [j.value for j in jobs] == [None] * 30
    assert creds.hashed == 1


def test_empty_user_name_fails_without_hashing():
    gate = LoginGate(5, 60.0)
    creds = CountingCredentials({"alice": "wonder"})
    assert login(gate, creds, b"", b"wonder", A) is not None
    assert creds.hashed == 0


def test_a_client_in_good_standing_goes_before_a_flood_from_many(no_hold):
    """100 flooding sources with wrong passwords and failures behind them, many logins each waiting:
    a good client's login takes the thread kept for good standing, so it waits for no flood hash
    (on main it waited behind every source's hash)."""
    gate = LoginGate(0, 60.0, threads=2)
    creds = CountingCredentials({"alice": "wonder", "good": "pw"}, delay=0.05)
    flooders = [ipaddress.ip_address(f"192.0.2.{n}") for n in range(100, 200)]
    for src in flooders:
        gate.failures.failed(source_of(src))
    jobs = [gevent.spawn(login, gate, creds, b"alice", b"wrong-%d-%d" % (n, i), src)
            for n, src in enumerate(flooders) for i in range(2)]
    deadline = time.monotonic() + 5
    while not creds.hashed and time.monotonic() < deadline:  # the flood waits for its hashes
        gevent.sleep(0.01)
    arrived = creds.hashed
    assert login(gate, creds, b"good", b"pw", B) is None
    waiting = len(gate.hashes.waiting)
    gevent.killall(jobs)
    # Hashed next, ahead of every waiting flood login (at most the flood's own thread started one more
    # meanwhile: a loaded machine once took 10 ms to start the first; on main it came after ~200).
    assert arrived >= 1 and creds.started.index(b"good") <= arrived + 1, creds.started[:5]
    assert waiting <= int(logins.QUEUE_SECONDS * 2 / 0.05)  # half a second of 0.05 s hashes: the rest was shed
    assert creds.most <= 2


def test_the_queue_holds_a_bounded_time_of_hashing_and_sheds_the_worst(no_hold):
    gate = LoginGate(0, 60.0, threads=2)
    creds = CountingCredentials({"alice": "wonder"}, delay=0.05)
    sources = [ipaddress.ip_address(f"192.0.2.{n}") for n in range(100, 200)]
    jobs = [gevent.spawn(login, gate, creds, b"alice", b"wrong-%d" % n, src) for n, src in enumerate(sources)]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    shed = [j.value for j in jobs if j.value[0] == outcome.AUTH_LIMITED]
    assert shed and all("hash queue full" in why for _, why in shed)
    assert creds.hashed <= 100 - len(shed) and creds.most <= 2
    assert gate.hashes.hash_seconds > 0.04  # measured, and the capacity with it
    assert gate.hashes.capacity <= int(logins.QUEUE_SECONDS * 2 / 0.04)


def test_an_unhashed_refusal_is_answered_late(monkeypatch):
    """A client refused without a hash waits LIMITED_DELAY for the answer, so a flood that would try
    again at once cannot spin the worker's loop."""
    monkeypatch.setattr(logins, "LIMITED_DELAY", 0.2)
    clock = Clock()
    gate = LoginGate(1, 60.0, clock=clock)
    creds = CountingCredentials({"alice": "wonder"})
    assert login(gate, creds, b"alice", b"wrong", A)[0] == outcome.AUTH_FAILED
    started = time.monotonic()
    assert login(gate, creds, b"alice", b"wonder", A)[0] == outcome.AUTH_LIMITED
    assert time.monotonic() - started >= 0.2
    monkeypatch.setattr(logins, "MAX_HELD", 0)
    started = time.monotonic()
    assert login(gate, creds, b"alice", b"wonder", A)[0] == outcome.AUTH_LIMITED
    assert time.monotonic() - started < 0.2  # too many held already: answered at once
