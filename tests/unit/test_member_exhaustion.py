"""Local descriptor exhaustion says nothing about an exit member: it counts neither for nor against it."""

from __future__ import annotations

import errno
import socket

import pytest

from transocks.core import nio
from transocks.core.netutil import Endpoint
from transocks.redirector.exits.member import Health, HealthPolicy
from transocks.redirector.exits.registry import DialSettings, Exits
from transocks.redirector.health import HealthChecker
from transocks.redirector.upstream import parse_proxy_url


def _no_descriptor(family: int) -> None:
    raise nio.ResourceExhausted(OSError(errno.EMFILE, "Too many open files"))


@pytest.fixture
def member_server():
    server = socket.create_server(("127.0.0.1", 0))
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def _exits(port: int) -> Exits:
    ex = Exits(DialSettings(1.0, 1.0), HealthPolicy(rise=1, fall=1))
    ex.pool("p", [parse_proxy_url(f"socks5://127.0.0.1:{port}")])
    return ex


@pytest.mark.parametrize("target", [None, Endpoint("203.0.113.10", 80)])
def test_probe_without_a_descriptor_counts_for_nothing(monkeypatch, member_server, target):
    """Out of descriptors, a probe cannot be made: the member is neither failed nor passed (on main
    a single such probe with fall=1 took it down)."""
    ex = _exits(member_server)
    m = ex.checked_members()[0]
    monkeypatch.setattr(nio, "new_socket", _no_descriptor)
    assert not HealthChecker(ex, 5, 0.5, target).check(m)
    assert m.state is Health.UP and m.fails == 0 and m.oks == 0 and m.last_error == ""


def test_a_dial_without_a_descriptor_counts_for_nothing_and_tries_no_other_member():
    """The dial's own socket could not be made: the member is neither failed nor passed (on main it
    counted as a success, "the destination said no"), and the next member is not tried."""
    from tests.unit.test_pool import fake_pool, flow, open_tunnel

    exhausted = nio.ResourceExhausted(OSError(errno.EMFILE, "Too many open files"))
    ex, pool = fake_pool([exhausted], ["ok"], rise=1, fall=2)
    a, b = pool.members
    a.fails = 1  # one more failure would take it down, a success would clear this
    conn = flow()
    with pytest.raises(nio.ResourceExhausted):
        open_tunnel(pool, conn)
    assert conn.tries == 1 and b.dialer.dialed == []
    assert a.state is Health.UP and a.oks == 0 and a.fails == 1 and a.failures == 0
