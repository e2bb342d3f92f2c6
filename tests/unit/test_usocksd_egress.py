"""Egress pool: rendezvous stability, families, DNSBL exclusion with a fake resolver (no DNS traffic)."""

from __future__ import annotations

import ipaddress
import socket

import gevent
import pytest

from transocks.usocksd.dnsbl import (
    DnsblMonitor,
    LookupFailed,
    dnsbl_zone,
    lookup,
    query_name,
)
from transocks.usocksd.egress import EgressPool, egress_address, rendezvous

ip = ipaddress.ip_address
POOL4 = [ip(f"198.51.100.{n}") for n in (21, 22, 23, 24)]
POOL6 = [ip(f"2001:db8:1::{n}") for n in (21, 22, 23)]
CLIENTS = [ip(f"10.{i // 250}.{i % 250}.{i % 7 + 1}") for i in range(4000)]


def assignment(pool: EgressPool, clients=CLIENTS, version=4):
    return {c: pool.source_for(c, version) for c in clients}


def test_same_client_same_address_across_pools_built_independently():
    a = assignment(EgressPool(POOL4))
    b = assignment(EgressPool(list(reversed(POOL4))))
    assert a == b


def test_spread_is_even():
    counts = {}
    for chosen in assignment(EgressPool(POOL4)).values():
        counts[chosen] = counts.get(chosen, 0) + 1
    assert set(counts) == set(POOL4)
    for n in counts.values():
        assert abs(n - len(CLIENTS) / 4) < len(CLIENTS) * 0.05


def test_removing_one_of_four_moves_only_its_own_clients():
    before = assignment(EgressPool(POOL4))
    removed = POOL4[1]
    after = assignment(EgressPool([a for a in POOL4 if a != removed]))
    moved = [c for c in CLIENTS if before[c] != after[c]]
    assert all(before[c] == removed for c in moved)
    assert {c for c in CLIENTS if before[c] == removed} == set(moved)
    assert abs(len(moved) / len(CLIENTS) - 0.25) < 0.05


def test_adding_a_fifth_takes_only_about_a_fifth_and_only_to_itself():
    before = assignment(EgressPool(POOL4))
    new = ip("198.51.100.25")
    after = assignment(EgressPool(POOL4 + [new]))
    moved = [c for c in CLIENTS if before[c] != after[c]]
    assert all(after[c] == new for c in moved)
    assert abs(len(moved) / len(CLIENTS) - 0.2) < 0.05


def test_families_have_their_own_pools():
    pool = EgressPool(POOL4 + POOL6)
    client = ip("192.0.2.2")
    assert pool.source_for(client, 4) in POOL4
    assert pool.source_for(client, 6) in POOL6
    assert EgressPool(POOL4).source_for(client, 6) is None  # the kernel chooses
    assert pool.source_for(ip("::ffff:192.0.2.2"), 4) == pool.source_for(client, 4)


def test_listed_addresses_leave_the_pool_and_only_their_clients_move():
    pool = EgressPool(POOL4)
    before = assignment(pool)
    pool.set_listed({POOL4[2]})
    after = assignment(pool)
    assert POOL4[2] not in after.values()
    assert all(before[c] == POOL4[2] for c in CLIENTS if before[c] != after[c])
    pool.set_listed(set(POOL4))  # all listed: better a listed source than no connection
    assert pool.usable(4) == POOL4


def test_rendezvous_empty_and_egress_address_type():
    assert rendezvous("x", []) is None
    assert egress_address("[2001:db8:1::21]") == ip("2001:db8:1::21")
    assert egress_address("::ffff:198.51.100.21") == ip("198.51.100.21")
    for bad in ("0.0.0.0", "::", "224.0.0.1", "example.com"):
        with pytest.raises(ValueError):
            egress_address(bad)


# --- DNSBL ----------------------------------------------------------------------


def test_query_names():
    assert query_name(ip("198.51.100.22"), "bl.test") == "22.100.51.198.bl.test"
    name = query_name(ip("2001:db8:1::21"), "bl.test")
    assert name == "1.2.0.0." + "0.0.0.0." * 3 + "0.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.test"
    assert dnsbl_zone("BL.Test.") == "bl.test"
    with pytest.raises(ValueError):
        dnsbl_zone("127.0.0.1")


class FakeResolver:
    """A DNS zone in a dict; missing names are NXDOMAIN, `broken` names fail temporarily."""

    def __init__(self, records: dict[str, list[str]], broken: set[str] = frozenset()) -> None:
        self.records = records
        self.broken = set(broken)
        self.asked: list[str] = []

    def __call__(self, name: str) -> list[str]:
        self.asked.append(name)
        if name in self.broken:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if name not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.records[name]


def test_lookup_answers():
    resolver = FakeResolver({"22.100.51.198.bl.test": ["127.0.0.2"],
                             "23.100.51.198.bl.test": ["127.255.255.254"],
                             "24.100.51.198.bl.test": ["192.0.2.1"]},
                            broken={"21.100.51.198.other.test"})
    assert lookup(ip("198.51.100.22"), "bl.test", resolver) == "127.0.0.2"
    assert lookup(ip("198.51.100.21"), "bl.test", resolver) is None
    assert lookup(ip("198.51.100.24"), "bl.test", resolver) is None  # not a listing answer
    with pytest.raises(LookupFailed, match="refused"):
        lookup(ip("198.51.100.23"), "bl.test", resolver)
    with pytest.raises(LookupFailed, match="Temporary"):
        lookup(ip("198.51.100.21"), "other.test", resolver)


def test_monitor_takes_listed_addresses_out_and_back_in():
    pool = EgressPool(POOL4 + POOL6)
    records = {query_name(POOL4[1], "bl.test"): ["127.0.0.2"], query_name(POOL6[0], "bl6.test"): ["127.0.0.4"]}
    resolver = FakeResolver(records)
    monitor = DnsblMonitor(pool, ["bl.test", "bl6.test"], 60, resolve=resolver)
    assert monitor.check() == {POOL4[1], POOL6[0]}
    assert POOL4[1] not in pool.usable(4) and POOL6[0] not in pool.usable(6)
    assert len(resolver.asked) == len(POOL4 + POOL6) * 2
    del records[query_name(POOL4[1], "bl.test")]
    assert monitor.check() == {POOL6[0]}
    assert POOL4[1] in pool.usable(4)


def test_monitor_keeps_previous_state_when_the_list_cannot_be_asked():
    pool = EgressPool(POOL4)
    name = query_name(POOL4[0], "bl.test")
    resolver = FakeResolver({name: ["127.0.0.2"]})
    monitor = DnsblMonitor(pool, ["bl.test"], 60, resolve=resolver)
    assert monitor.check() == {POOL4[0]}
    resolver.broken.add(name)
    assert monitor.check() == {POOL4[0]}  # still listed: no answer is not a delisting
    resolver.broken.add(query_name(POOL4[1], "bl.test"))
    assert POOL4[1] not in monitor.check()  # and not listed without an answer either


def test_monitor_start_without_interval_checks_once():
    pool = EgressPool(POOL4)
    resolver = FakeResolver({query_name(POOL4[3], "bl.test"): ["127.0.0.2"]})
    assert DnsblMonitor(pool, ["bl.test"], 0, resolve=resolver).start() is None
    assert pool.listed == {POOL4[3]}


def test_monitor_rechecks_every_interval():
    pool = EgressPool(POOL4)
    records: dict[str, list[str]] = {}
    monitor = DnsblMonitor(pool, ["bl.test"], 0.05, resolve=FakeResolver(records))
    job = monitor.start()
    try:
        assert pool.listed == set()
        records[query_name(POOL4[0], "bl.test")] = ["127.0.0.2"]
        gevent.sleep(0.3)
        assert pool.listed == {POOL4[0]}
        records.clear()
        gevent.sleep(0.3)
        assert pool.listed == set()
    finally:
        job.kill()


def test_monitor_survives_a_resolver_that_raises_or_hangs():
    pool = EgressPool(POOL4[:2])
    pool.set_listed({POOL4[1]})

    def resolve(name: str) -> list[str]:
        if name.startswith("21."):
            raise RuntimeError("resolver bug")
        gevent.sleep(10)
        return []

    assert DnsblMonitor(pool, ["bl.test"], 60, resolve=resolve, timeout=0.2).check() == {POOL4[1]}
