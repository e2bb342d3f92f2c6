from __future__ import annotations

import pytest

from transocks.core.netutil import (
    Endpoint,
    listen_address,
    parse_hostport,
    sockaddr_endpoint,
)
from transocks.redirector.handler import LoopGuard


@pytest.mark.parametrize(
    "text, ep",
    [
        ("127.0.0.1:1081", Endpoint("127.0.0.1", 1081)),
        ("[::1]:1081", Endpoint("::1", 1081)),
        ("[::]:1081", Endpoint("::", 1081)),
        ("0.0.0.0:5", Endpoint("0.0.0.0", 5)),
    ],
)
def test_listen_address(text, ep):
    assert listen_address(text) == ep
    assert str(ep) == text


@pytest.mark.parametrize("text", ["::1:1081", "[::1]", "1.2.3.4", "1.2.3.4:0", "1.2.3.4:70000", "host:80", "[::1]x:1"])
def test_listen_address_rejects(text):
    with pytest.raises(ValueError):
        listen_address(text)


def test_parse_hostport_names_and_default_port():
    assert parse_hostport("proxy.example", 1080) == Endpoint("proxy.example", 1080)


def test_sockaddr_endpoint_unmaps_v4():
    assert sockaddr_endpoint(("::ffff:192.0.2.7", 5, 0, 0)) == Endpoint("192.0.2.7", 5)


def test_loop_guard():
    g = LoopGuard([Endpoint("127.0.0.1", 1081), Endpoint("::", 2000)], [Endpoint("192.0.2.1", 1080)])
    assert g.is_loop(Endpoint("127.0.0.1", 1081))
    assert g.is_loop(Endpoint("192.0.2.1", 1080))
    assert g.is_loop(Endpoint("::ffff:192.0.2.1", 1080))
    assert g.is_loop(Endpoint("::1", 2000))  # wildcard listener covers local addresses
    assert not g.is_loop(Endpoint("203.0.113.10", 1081))
    assert not g.is_loop(Endpoint("127.0.0.1", 1082))
    # Discovery replaces the members' addresses; the listeners stay.
    g.set_upstreams([Endpoint("192.0.2.7", 1080), Endpoint("2001:db8::7", 1090)])
    assert g.is_loop(Endpoint("192.0.2.7", 1080)) and g.is_loop(Endpoint("2001:db8::7", 1090))
    assert not g.is_loop(Endpoint("192.0.2.1", 1080))
    assert g.is_loop(Endpoint("127.0.0.1", 1081))


def test_loop_guard_sees_addresses_added_after_start(monkeypatch):
    """A router's outside address may change (DHCP, PPPoE): a new local address on a wildcard
    listener's port is still a loop, looked up again at most once a second."""
    from transocks.redirector import handler

    addresses = {"127.0.0.1", "::1"}
    monkeypatch.setattr(handler, "local_addresses", lambda: set(addresses))
    clock = [100.0]
    monkeypatch.setattr(handler.time, "monotonic", lambda: clock[0])
    g = LoopGuard([Endpoint("::", 2000)])
    addresses.add("198.51.100.9")
    assert not g.is_loop(Endpoint("198.51.100.9", 2000))  # read less than a second ago
    clock[0] += 1.5
    assert g.is_loop(Endpoint("198.51.100.9", 2000))
    assert not g.is_loop(Endpoint("198.51.100.10", 2000))
