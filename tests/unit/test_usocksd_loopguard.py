"""usocksd's own listen addresses are refused as destinations."""

from __future__ import annotations

import ipaddress

from transocks.core.netutil import Endpoint
from transocks.usocksd import loopguard
from transocks.usocksd.loopguard import OwnAddresses

ip = ipaddress.ip_address


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_exact_listeners_cover_their_address_in_every_spelling():
    own = OwnAddresses([Endpoint("192.0.2.1", 1080), Endpoint("2001:db8::1", 1080)], read=lambda: set())
    assert (ip("192.0.2.1"), 1080) in own
    assert (ip("::ffff:192.0.2.1"), 1080) in own
    assert (ip("2001:db8::1"), 1080) in own
    assert (ip("192.0.2.1"), 1081) not in own
    assert (ip("192.0.2.2"), 1080) not in own
    assert (ip("127.0.0.1"), 1080) not in own  # not a wildcard: loopback is another socket


def test_wildcard_listeners_cover_every_local_address_and_loopback():
    reads = []

    def read():
        reads.append(1)
        return {ip("198.51.100.7"), ip("2001:db8:1::7"), ip("127.0.0.1"), ip("::1")}

    own = OwnAddresses([Endpoint("::", 1080), Endpoint("127.0.0.1", 9000)], read=read)
    for host in ("198.51.100.7", "2001:db8:1::7", "127.0.0.1", "127.3.4.5", "::1", "::ffff:198.51.100.7"):
        assert (ip(host), 1080) in own, host
    assert (ip("127.0.0.1"), 9000) in own and (ip("127.0.0.2"), 9000) not in own
    assert (ip("203.0.113.10"), 1080) not in own
    assert (ip("203.0.113.10"), 443) not in own


def test_local_addresses_are_read_again_at_most_once_a_second():
    clock = Clock()
    current = {ip("198.51.100.7")}
    reads = []

    def read():
        reads.append(1)
        return set(current)

    own = OwnAddresses([Endpoint("0.0.0.0", 1080)], read=read, clock=clock)
    current.add(ip("198.51.100.8"))  # an address added after the start
    assert (ip("198.51.100.8"), 1080) not in own  # read less than a second ago
    clock.now += 1.5
    assert (ip("198.51.100.8"), 1080) in own
    for _ in range(10):
        assert (ip("203.0.113.1"), 1080) not in own
    assert len(reads) == 2


def test_real_local_addresses_include_loopback():
    addrs = loopguard.local_addresses()
    assert ip("127.0.0.1") in addrs and ip("::1") in addrs


def test_nat64_and_6to4_spellings_of_our_address_are_ours():
    own = OwnAddresses([Endpoint("192.0.2.1", 1080), Endpoint("0.0.0.0", 1081)], read=lambda: {ip("198.51.100.7")})
    assert (ip("64:ff9b::c000:201"), 1080) in own and (ip("2002:c000:201::1"), 1080) in own
    assert (ip("64:ff9b::198.51.100.7"), 1081) in own and (ip("64:ff9b::127.0.0.9"), 1081) in own
    assert (ip("64:ff9b::c000:202"), 1080) not in own


def test_host_addresses_are_read_again_at_most_once_a_second_and_shared():
    clock = Clock()
    current = {ip("198.51.100.7")}
    reads = []

    def read():
        reads.append(1)
        return set(current)

    host = loopguard.HostAddresses(read, clock)
    own = OwnAddresses([Endpoint("::", 1080)], host=host)
    current.add(ip("198.51.100.8"))
    assert ip("198.51.100.8") not in host
    clock.now += 1.5
    assert (ip("198.51.100.8"), 1080) in own and ip("198.51.100.8") in host
    for _ in range(10):
        assert ip("203.0.113.1") not in host
    assert len(reads) == 2
