"""transocks trusts a sniffed name only when it resolves to the connection's own destination."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import gevent
import pytest

from tests.unit.test_relay import tcp_pair
from tests.unit.test_sniff import _FakeDialer, real_client_hello
from transocks.core import logs
from transocks.core.namecheck import NameCheck
from transocks.core.netutil import Endpoint
from transocks.redirector import sniff as s
from transocks.redirector.exits.member import HealthPolicy, Member
from transocks.redirector.exits.registry import DialSettings, Exits, Source
from transocks.redirector.handler import LoopGuard, TransparentHandler
from transocks.redirector.route import Router, parse_rule

DEST = Endpoint("203.0.113.10", 443)


@pytest.fixture
def access_log():
    records: list[dict] = []
    logger = logging.getLogger(logs.ACCESS_LOGGER)
    saved = logger.disabled
    logger.disabled = False
    logs.capture_access(lambda fields: records.append(dict(fields)))
    yield records
    logs.capture_access(None)
    logger.disabled = saved


def _pool(exits: Exits, name: str, scheme: str, send_domain: bool = False):
    dialer = _FakeDialer(scheme)
    pool = exits.pool(name, [], send_domain=send_domain)
    pool.sources = [Source(dialer.url, [Member(dialer, "fake")])]  # type: ignore[arg-type]
    pool.rebuild()
    return pool, dialer


def _serve_one(handler: TransparentHandler, dialers: list, while_open=lambda: None) -> None:
    """One TLS connection to DEST carrying SNI sni.example, relayed to whichever fake dialer is chosen;
    `while_open` runs once a dialer has it, before the client closes."""
    outer, client_side = tcp_pair()
    client_side.setblocking(False)
    thread = threading.Thread(target=handler, args=(client_side, outer.getsockname()), daemon=True)
    thread.start()
    outer.sendall(real_client_hello("sni.example"))
    deadline = time.monotonic() + 10
    while all(d.far is None for d in dialers) and time.monotonic() < deadline:
        time.sleep(0.01)
    while_open()
    outer.close()
    for d in dialers:
        if d.far is not None:
            d.far.close()
    thread.join(10)


@pytest.mark.parametrize("answers, verified", [(["203.0.113.10"], True), (["198.51.100.99"], False), ([], False)])
def test_only_a_verified_name_matches_domain_routes_and_is_logged_as_host(answers, verified, access_log):
    exits = Exits(DialSettings(5.0, 5.0), HealthPolicy(2, 3))
    by_name, named_dialer = _pool(exits, "byname", "direct")
    default, default_dialer = _pool(exits, "default", "socks5", send_domain=True)
    router = Router([(parse_rule("domain=sni.example -> byname"), by_name)], default)
    names = NameCheck(60, 1, lambda name: answers)
    method = SimpleNamespace(destination=lambda client, peer: (DEST, None))
    handler = TransparentHandler(router, LoopGuard([Endpoint("127.0.0.1", 1081)]), 0.0, 5.0, method=method,
                                 sniffer=s.Sniffer(frozenset({443}), 5.0), names=names)  # type: ignore[arg-type]
    _serve_one(handler, [named_dialer, default_dialer])
    if verified:
        assert named_dialer.dialed == [DEST] and default_dialer.dialed == []
    else:
        # By address: the default pool, and its SOCKS5 member gets the claim with the address (the fake shows
        # the claim as the name it dialed); a third-party server would get the address alone.
        assert named_dialer.dialed == [] and default_dialer.dialed == [Endpoint("sni.example", 443)]
    deadline = time.monotonic() + 5
    while not access_log and time.monotonic() < deadline:
        time.sleep(0.01)
    (line,) = access_log
    assert line.get("host") == ("sni.example" if verified else None)
    assert line.get("host_unverified") == (None if verified else "sni.example")
    outcome = "verified" if verified else "unverified"
    assert handler.counters.events[("name_checks", (outcome,))] == 1


def test_a_member_that_checks_names_itself_is_dialed_without_waiting_for_the_lookup(access_log):
    """usocksd (NAMED) judges the name with the address, so when the name changes no route here the
    dial does not wait for this worker's lookup; the log line takes the lookup's verdict."""
    exits = Exits(DialSettings(5.0, 5.0), HealthPolicy(2, 3))
    default, dialer = _pool(exits, "default", "socks5", send_domain=True)
    dialer.names = True  # as after the member chose NAMED
    router = Router([], default)
    released = threading.Event()

    def slow(name: str) -> list[str]:
        while not released.is_set():
            gevent.sleep(0.01)
        return ["203.0.113.10"]

    names = NameCheck(60, 30, slow)
    method = SimpleNamespace(destination=lambda client, peer: (DEST, None))
    handler = TransparentHandler(router, LoopGuard([Endpoint("127.0.0.1", 1081)]), 0.0, 5.0, method=method,
                                 sniffer=s.Sniffer(frozenset({443}), 5.0), names=names)  # type: ignore[arg-type]
    def dialed_before_the_lookup_ended() -> None:
        assert dialer.dialed == [Endpoint("sni.example", 443)]  # dialed with the claim while the lookup runs
        released.set()
        time.sleep(0.1)

    _serve_one(handler, [dialer], dialed_before_the_lookup_ended)
    deadline = time.monotonic() + 5
    while not access_log and time.monotonic() < deadline:
        time.sleep(0.01)
    (line,) = access_log
    assert line.get("host") == "sni.example"
    assert handler.counters.events[("name_checks", ("verified",))] == 1
