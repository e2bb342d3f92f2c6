"""Dials on callbacks, through the handler: what a stop or a timeout does to one under way.

The member is a real listening socket that never accepts: the kernel completes the
TCP handshake from its backlog, so the dial connects, sends its greeting and waits.
"""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import gevent
import pytest

from tests.unit.test_relay import tcp_pair
from transocks.core import logs, outcome
from transocks.core.netutil import Endpoint
from transocks.redirector.exits.member import HealthPolicy
from transocks.redirector.exits.registry import DialSettings, Exits
from transocks.redirector.handler import LoopGuard, TransparentHandler
from transocks.redirector.route import Router
from transocks.redirector.upstream import parse_proxy_url
from transocks.redirector.upstream.dial import Phase


@pytest.fixture
def lines():
    """The access-log lines written during the test, as field dicts."""
    got: list[dict] = []
    logs.capture_access(got.append)
    yield got
    logs.capture_access(None)


@pytest.fixture
def silent_member():
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    yield lsock.getsockname()[1]
    lsock.close()


def handler_for(port: int, connect_timeout: float = 5.0, handshake_timeout: float = 5.0) -> TransparentHandler:
    exits = Exits(DialSettings(connect_timeout, handshake_timeout), HealthPolicy(2, 3))
    pool = exits.pool("default", [parse_proxy_url(f"socks5://127.0.0.1:{port}")])
    method = SimpleNamespace(destination=lambda client, peer: (Endpoint("203.0.113.10", 443), None))
    return TransparentHandler(Router([], pool), LoopGuard([Endpoint("127.0.0.1", 1081)]), 0.0, 5.0,
                              method=method)  # type: ignore[arg-type]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def serve_one(handler: TransparentHandler):
    outer, inner = tcp_pair()
    inner.setblocking(False)
    outer.settimeout(5)
    g = gevent.spawn(handler, inner, outer.getsockname())
    return outer, g


def wait_until(cond, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if cond():
            return
        gevent.sleep(0.01)
    raise AssertionError("condition not met")


def test_a_stop_resets_a_dial_under_way_and_logs_it(silent_member, lines):
    h = handler_for(silent_member)
    gevent.sleep(0)  # the hub's own descriptors exist from here on
    before = open_fds()
    outer, g = serve_one(h)
    wait_until(lambda: h._in_flight.dials)
    (opening,) = h._in_flight.dials
    assert opening.current is not None and opening.current.phase is Phase.NEGOTIATING
    assert not g.dead  # the keeper stands for the dial
    assert h._in_flight.abort("worker stopped") == 1
    wait_until(lambda: g.dead)
    with pytest.raises(ConnectionResetError):
        outer.recv(1)
    outer.close()
    assert h.counters.active == 0 and not h._in_flight.dials
    assert [(f["outcome"], f["reason"]) for f in lines] == [(outcome.SHUTDOWN, "worker stopped")]
    assert open_fds() <= before  # client, upstream socket and watcher all closed


def test_a_handshake_timeout_on_callbacks_resets_the_client(silent_member, lines):
    h = handler_for(silent_member, handshake_timeout=0.2)
    outer, g = serve_one(h)
    wait_until(lambda: g.dead)
    with pytest.raises(ConnectionResetError):
        outer.recv(1)
    outer.close()
    assert [(f["outcome"], f["reason"]) for f in lines] == [(outcome.UPSTREAM_TIMEOUT,
                                                             "socks5 handshake timed out after 0.2s")]
    assert h.router.default.members[0].fails == 1  # a passive health failure of the member


def test_a_refused_member_fails_at_once_and_counts_against_it(lines):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: the connect is refused
    h = handler_for(port)
    outer, g = serve_one(h)
    wait_until(lambda: g.dead)
    with pytest.raises(ConnectionResetError):
        outer.recv(1)
    outer.close()
    assert [f["outcome"] for f in lines] == [outcome.UPSTREAM_UNREACHABLE] and "refused" in lines[0]["reason"]
    assert h.router.default.members[0].fails == 1
