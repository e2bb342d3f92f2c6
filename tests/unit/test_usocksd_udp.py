"""usocksd's UDP association pieces that need no namespace: the token bucket, the
access-log line's fields and the metrics an association counts."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from transocks.runtime.metrics import ConnectionStats
from transocks.usocksd import udp
from transocks.usocksd.acl import DestPolicy
from transocks.usocksd.egress import EgressPool
from transocks.usocksd.outbound import Outbound


def test_token_bucket_takes_a_seconds_worth_then_the_rate():
    bucket = udp.TokenBucket(10, now=0.0)
    assert sum(bucket.take(0.0) for _ in range(50)) == 10
    assert sum(bucket.take(0.5) for _ in range(50)) == 5  # half a second refills five
    assert sum(bucket.take(100.0) for _ in range(50)) == 10  # never more than one second's worth


def test_token_bucket_rate_zero_takes_everything():
    bucket = udp.TokenBucket(0, now=0.0)
    assert all(bucket.take(0.0) for _ in range(10_000))


@pytest.fixture
def association():
    """An association on loopback with a socketpair standing in for the control connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    control, _ = listener.accept()
    listener.close()
    outbound = Outbound(DestPolicy([], [], True, frozenset()), EgressPool(), 1.0)
    a = udp.Association(control, ipaddress.ip_address("127.0.0.1"), 0, outbound, 60.0, 100, 1.0)
    yield a
    a.abort("test over")
    client.close()
    control.close()


def test_relay_socket_is_on_the_address_the_client_reached(association):
    assert association.bound.host == "127.0.0.1" and association.bound.port


def test_fields_and_metrics_of_an_association_that_dropped(association):
    a = association
    a.datagrams = [3, 2]
    a.bytes = [120, 400]
    a._drop(udp.FRAGMENT)
    a._drop(udp.RATE)
    a._drop(udp.RATE)
    a._end("ok", "")
    fields = a.fields()
    assert fields["datagrams_sent"] == 3 and fields["received"] == 400
    assert fields["dropped"] == 3 and fields["drops"] == "fragment:1,rate:2"
    assert a.upstream() == "-"
    counters = ConnectionStats()
    udp.declare_metrics(counters)
    a.count(counters)
    assert counters.events[("udp_associations", ("ok",))] == 1
    assert counters.events[("udp_datagrams", ("sent",))] == 3
    assert counters.events[("udp_bytes", ("received",))] == 400
    assert counters.events[("udp_dropped", ("rate",))] == 2
    assert {"udp_associations", "udp_datagrams", "udp_bytes", "udp_dropped"} <= set(counters.families)
