"""Per-source limits: the token bucket, the concurrent count, the bounded table, the warnings, and the handler's
pairing of every admission with one release."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import pytest

from tests.unit.test_relay import tcp_pair
from tests.unit.test_sniff import _FakeDialer
from transocks.core.netutil import Endpoint
from transocks.redirector.exits.member import HealthPolicy, Member
from transocks.redirector.exits.registry import DialSettings, Exits, Source
from transocks.redirector.handler import REJECT, LoopGuard, TransparentHandler
from transocks.redirector.limits import MAX_CONNS, RATE, SourceLimits, TokenBucket
from transocks.redirector.route import Router
from transocks.redirector.settings import per_second


class Clock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the token bucket -------------------------------------------------------------------------


def test_bucket_starts_full_then_refills_at_the_rate_up_to_the_burst():
    b = TokenBucket(3, 0.0)
    assert [b.take(2.0, 3, 0.0) for _ in range(4)] == [True, True, True, False]
    assert not b.take(2.0, 3, 0.4)  # 0.8 of a token
    assert b.take(2.0, 3, 0.5)  # the second half-second's token
    assert not b.take(2.0, 3, 0.5)
    assert sum(b.take(2.0, 3, 100.0) for _ in range(10)) == 3  # a long pause fills it to the burst, no more


def test_bucket_below_one_a_second():
    b = TokenBucket(1, 0.0)
    assert b.take(0.1, 1, 0.0)
    assert not b.take(0.1, 1, 9.0)
    assert b.take(0.1, 1, 10.0)


def test_refused_takes_do_not_cost_tokens():
    b = TokenBucket(1, 0.0)
    assert b.take(1.0, 1, 0.0)
    for t in (0.2, 0.4, 0.6, 0.8):  # refused while refilling: the refill still counts
        assert not b.take(1.0, 1, t)
    assert b.take(1.0, 1, 1.0)


# --- the limits -------------------------------------------------------------------------------


def test_both_off_is_no_limiter():
    assert SourceLimits.configured(0, 0.0) is None
    assert SourceLimits.configured(3, 0.0) is not None
    assert SourceLimits.configured(0, 5.0) is not None


def test_burst_defaults_to_one_second_of_rate():
    assert SourceLimits(0, 20.0).burst == 20
    assert SourceLimits(0, 0.5).burst == 1
    assert SourceLimits(0, 2.5).burst == 3
    assert SourceLimits(0, 20.0, 40).burst == 40


def test_rate_setting_type():
    assert per_second("0") == 0.0 and per_second("2.5") == 2.5
    for bad in ("-1", "nan", "inf", "fast"):
        with pytest.raises(ValueError):
            per_second(bad)


def test_concurrent_connections_per_source():
    lim = SourceLimits(2, 0.0, clock=Clock())
    assert lim.admit("192.0.2.2") is None
    assert lim.admit("192.0.2.2") is None
    why = lim.admit("192.0.2.2")
    assert why is not None and "2 connections open" in why and "max_conns_per_source 2" in why
    assert lim.admit("192.0.2.3") is None  # another source is not affected
    lim.release("192.0.2.2")
    assert lim.admit("192.0.2.2") is None  # one ended: one more may open
    assert lim.admit("192.0.2.2") is not None
    assert lim.refused == {MAX_CONNS: 2, RATE: 0}


def test_ipv6_counts_per_address():
    lim = SourceLimits(1, 0.0, clock=Clock())
    assert lim.admit("2001:db8:c::2") is None
    assert lim.admit("2001:db8:c::2") is not None
    assert lim.admit("2001:db8:c::3") is None  # same /64, its own count


def test_rate_with_burst():
    clock = Clock()
    lim = SourceLimits(0, 10.0, 5, clock=clock)
    assert [lim.admit("192.0.2.2") is None for _ in range(6)] == [True] * 5 + [False]
    clock.now += 0.1
    assert lim.admit("192.0.2.2") is None
    assert lim.admit("192.0.2.2") is not None
    assert lim.refused == {MAX_CONNS: 0, RATE: 2}
    assert lim.admit("192.0.2.3") is None


def test_concurrent_refusal_does_not_take_a_token():
    clock = Clock()
    lim = SourceLimits(1, 1.0, 2, clock=clock)
    assert lim.admit("s") is None
    for _ in range(5):
        assert "connections open" in (lim.admit("s") or "")
    lim.release("s")
    assert lim.admit("s") is None  # the second token is still there
    assert lim.refused == {MAX_CONNS: 5, RATE: 0}


def test_idle_sources_are_forgotten_once_their_bucket_is_full():
    clock = Clock()
    lim = SourceLimits(0, 10.0, 20, clock=clock)  # full again 2 s after the last use
    for i in range(100):
        assert lim.admit(f"192.0.2.{i}") is None
        lim.release(f"192.0.2.{i}")
    assert len(lim) == 100
    clock.now += 2.5
    lim.admit("198.51.100.1")  # a new source sweeps the old ones
    assert set(lim.busy) == {"198.51.100.1"} and not lim.idle


def test_a_flood_of_sources_keeps_the_table_bounded_and_busy_sources_counted():
    clock = Clock()
    lim = SourceLimits(2, 1.0, 2, max_idle=50, clock=clock)
    assert lim.admit("192.0.2.2") is None and lim.admit("192.0.2.2") is None  # a real client, two open
    for i in range(10_000):  # each new source: one connection at once, over quickly
        src = f"2001:db8:f::{i:x}"
        assert lim.admit(src) is None
        lim.release(src)
        assert len(lim.idle) <= 50
    assert len(lim) <= 51
    assert lim.admit("192.0.2.2") is not None  # its count survived the flood
    lim.release("192.0.2.2")
    assert "new connections a second" in (lim.admit("192.0.2.2") or "")  # and so did its empty bucket
    clock.now += 1.0
    assert lim.admit("192.0.2.2") is None


def test_a_flood_of_refused_sources_is_bounded_too():
    clock = Clock()
    lim = SourceLimits(0, 1.0, 1, max_idle=50, clock=clock)
    for i in range(5_000):
        src = f"2001:db8:e::{i:x}"
        assert lim.admit(src) is None
        lim.release(src)
        assert lim.admit(src) is not None  # refused: the entry stays idle with an empty bucket
    assert len(lim) <= 50


def test_release_without_admit_is_harmless():
    lim = SourceLimits(1, 0.0, clock=Clock())
    lim.release("192.0.2.9")
    assert len(lim) == 0


def test_one_warning_a_second_per_source(caplog):
    clock = Clock()
    lim = SourceLimits(1, 0.0, clock=clock)
    lim.admit("192.0.2.2")
    lim.admit("192.0.2.3")
    with caplog.at_level(logging.WARNING, logger="transocks"):
        for _ in range(10):
            lim.admit("192.0.2.2")
            lim.admit("192.0.2.3")
            clock.now += 0.05
        clock.now += 0.6  # 1.1 s after the first warning
        lim.admit("192.0.2.2")
    lines = [r.getMessage() for r in caplog.records]
    assert [ln.split(":")[0] for ln in lines] == ["source_limited client=192.0.2.2", "source_limited client=192.0.2.3",
                                                  "source_limited client=192.0.2.2"]
    assert lines[2].endswith("; 9 more refused since the last warning")
    assert lim.refused[MAX_CONNS] == 21


# --- the handler: every admission is released once ----------------------------------------------


def _handler(target, limits: SourceLimits) -> TransparentHandler:
    method = SimpleNamespace(destination=lambda client, peer: (Endpoint("203.0.113.10", 9000), None))
    return TransparentHandler(Router([], target), LoopGuard([Endpoint("127.0.0.1", 1081)]), 0.0, 5.0,
                              method=method, limits=limits)  # type: ignore[arg-type]


def _serve(handler: TransparentHandler) -> tuple:
    """Run one connection through the handler in a thread of its own (its own hub)."""
    outer, client_side = tcp_pair()
    client_side.setblocking(False)
    thread = threading.Thread(target=handler, args=(client_side, outer.getsockname()), daemon=True)
    thread.start()
    return outer, thread


def test_refused_later_on_releases_the_source():
    lim = SourceLimits(1, 0.0)
    handler = _handler(REJECT, lim)
    for _ in range(3):  # with a leak, the second would be source_limited
        outer, thread = _serve(handler)
        thread.join(10)
        outer.close()
    assert lim.refused[MAX_CONNS] == 0 and len(lim.busy) == 0


def test_the_end_of_a_relay_releases_the_source():
    dialer = _FakeDialer("socks5")
    exits = Exits(DialSettings(5.0, 5.0), HealthPolicy(2, 3))
    pool = exits.pool("default", [])
    pool.sources = [Source(dialer.url, [Member(dialer, "fake")])]  # type: ignore[arg-type]
    pool.rebuild()
    lim = SourceLimits(1, 0.0)
    outer, thread = _serve(_handler(pool, lim))
    deadline = time.monotonic() + 10
    while dialer.far is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dialer.far is not None and list(lim.busy.values())[0].active == 1
    outer.close()
    dialer.far.close()
    thread.join(10)
    assert not thread.is_alive()
    assert len(lim.busy) == 0 and len(lim.idle) == 1
