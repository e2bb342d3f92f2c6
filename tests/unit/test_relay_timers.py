"""The relay's deadlines after a half-close: made only for relays that outlive the first EOF
by a sweep, armed from the last activity as before (issue 20, lever: no half-close timer
unless needed)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import gevent
import pytest
from gevent.hub import get_hub

from transocks.core import outcome
from transocks.core import relay as relay_mod
from transocks.core.relay import Relay


class CountingLoop:
    """The hub's loop, counting the timers made through it."""

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        self.timers = 0

    def timer(self, *args: Any, **kwargs: Any) -> Any:
        self.timers += 1
        return self._loop.timer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


def _wait_recv(sock: socket.socket) -> bytes:
    while True:
        try:
            return sock.recv(4096)
        except BlockingIOError:
            gevent.sleep(0.001)


def _chain() -> tuple[socket.socket, ...]:
    """outer_client <-> client_side [relay] upstream_side <-> outer_server, non-blocking."""
    outer_client, client_side = socket.socketpair()
    upstream_side, outer_server = socket.socketpair()
    socks = (outer_client, client_side, upstream_side, outer_server)
    for s in socks:
        s.setblocking(False)
    return socks


def _in_a_thread(fn: Any) -> dict[str, Any]:
    """Run fn in a thread of its own (its own hub and relay state); its return value or error."""
    out: dict[str, Any] = {}

    def main() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    t = threading.Thread(target=main, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive()
    if "error" in out:
        raise out["error"]
    return out


def test_a_short_exchange_makes_no_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Request, response, the server's close, the client's close: with the default half-close
    timeout the relay ends before any deadline timer is made (main made one at the first EOF)."""

    def exchange() -> tuple[int, list[Any]]:
        loop = CountingLoop(get_hub().loop)
        hub = type("Hub", (), {"loop": loop})()
        monkeypatch.setattr(relay_mod, "get_hub", lambda: hub)
        done: list[Any] = []
        for _ in range(3):
            outer_client, client_side, upstream_side, outer_server = _chain()
            outer_client.send(b"GET / HTTP/1.1\r\n\r\n")
            r = Relay(client_side, upstream_side, 0.0, 60.0)
            r.start(lambda r: done.append(r.result))
            assert _wait_recv(outer_server) == b"GET / HTTP/1.1\r\n\r\n"
            outer_server.send(b"HTTP/1.1 200 OK\r\n\r\nhello")
            outer_server.close()
            assert _wait_recv(outer_client) == b"HTTP/1.1 200 OK\r\n\r\nhello"
            assert _wait_recv(outer_client) == b""
            outer_client.close()
            while len(done) < _ + 1:
                gevent.sleep(0.001)
            for s in (client_side, upstream_side):
                s.close()
        return loop.timers, done

    timers, done = _in_a_thread(exchange)["value"]
    assert [r.outcome for r in done] == [outcome.OK] * 3
    assert timers <= 1  # the sweeper, made once per thread; never one per relay


def test_the_sweep_arms_the_deadline_from_the_last_activity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Activity between the EOF and the sweep still counts: the deadline armed by the sweep is
    the last activity plus the timeout, as when the timer was made at the EOF."""
    monkeypatch.setattr(relay_mod, "_SWEEP", 100.0)  # no sweep of its own during the test: it calls it

    def half_closed() -> dict[str, Any]:
        outer_client, client_side, upstream_side, outer_server = _chain()
        done: list[Any] = []
        r = Relay(client_side, upstream_side, 0.0, 300.0)
        r.start(lambda r: done.append(r.result))
        outer_client.shutdown(socket.SHUT_WR)
        assert _wait_recv(outer_server) == b""
        eof_at = r.last_activity
        seen = {"deferred": r.timer is relay_mod._DEFERRED}
        gevent.sleep(0.3)
        outer_server.send(b"still talking")
        assert _wait_recv(outer_client) == b"still talking"
        seen["moved"] = r.last_activity - eof_at
        r.shared.sweep()
        seen["armed"] = r.timer is not None and r.timer is not relay_mod._DEFERRED
        # libev keeps a timer's `at` on the monotonic clock, `now()` is the wall clock's
        seen["deadline"] = (r.timer.at - time.monotonic()) - (r.last_activity + 300.0 - r.loop.now())
        outer_server.close()
        assert _wait_recv(outer_client) == b""
        while not done:
            gevent.sleep(0.001)
        seen["outcome"] = done[0].outcome
        seen["timer_after"] = r.timer
        seen["deferred_after"] = dict(r.shared.deferred)
        for s in (outer_client, client_side, upstream_side):
            s.close()
        return seen

    seen = _in_a_thread(half_closed)["value"]
    assert seen["deferred"]
    assert seen["moved"] >= 0.25
    assert seen["armed"]
    assert abs(seen["deadline"]) < 0.1  # the EOF's time would be 0.3 s off
    assert seen["outcome"] == outcome.OK
    assert seen["timer_after"] is None and seen["deferred_after"] == {}


def test_a_relay_that_ends_before_the_sweep_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deferred relay that ends (or is aborted) is forgotten at once: the sweep finds none
    to arm, and stops."""
    monkeypatch.setattr(relay_mod, "_SWEEP", 100.0)

    def aborted() -> dict[str, Any]:
        outer_client, client_side, upstream_side, outer_server = _chain()
        done: list[Any] = []
        r = Relay(client_side, upstream_side, 0.0, 300.0)
        r.start(lambda r: done.append(r.result))
        outer_server.shutdown(socket.SHUT_WR)
        assert _wait_recv(outer_client) == b""
        seen = {"deferred": r in r.shared.deferred}
        r.abort("worker stopped", outcome.SHUTDOWN)
        seen["left"] = dict(r.shared.deferred)
        r.shared.sweep()
        seen["sweeper_active"] = r.shared.sweeper.active
        seen["outcome"] = done[0].outcome
        for s in (outer_client, outer_server):
            s.close()
        return seen

    seen = _in_a_thread(aborted)["value"]
    assert seen == {"deferred": True, "left": {}, "sweeper_active": False, "outcome": outcome.SHUTDOWN}


def test_half_close_timeout_longer_than_the_sweep_still_fires() -> None:
    """A half-close timeout armed by the sweep (over 2 s) ends a connection left half-open."""

    def half_open() -> Any:
        outer_client, client_side, upstream_side, outer_server = _chain()
        r = Relay(client_side, upstream_side, 0.0, 2.5)
        outer_client.shutdown(socket.SHUT_WR)
        result = r.run()
        for s in (outer_client, outer_server, client_side, upstream_side):
            s.close()
        return result

    result = _in_a_thread(half_open)["value"]
    assert result.outcome == outcome.IDLE_TIMEOUT
    assert "half-closed for 2.5s" in result.detail
