"""UDP through TPROXY, the parts that need no namespace: the slot sockets, the original
destination in ancillary data, the session table's order, the shared reply sockets."""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transocks.core.netutil import Endpoint
from transocks.redirector.flow import Flow
from transocks.redirector.udp import kernel
from transocks.redirector.udp.replies import ReplySockets
from transocks.redirector.udp.session import Session, Table
from transocks.runtime import upgrade
from transocks.runtime.listeners import Listeners

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="IP_TRANSPARENT needs CAP_NET_RAW: run as root")


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@root_only
def test_datagram_listeners_one_per_slot_with_tproxy_options():
    port = _free_udp_port()
    v4, v6 = Endpoint("127.0.0.1", port), Endpoint("::", port + 1)
    ls = Listeners(kernel.prepare_listener, datagram=True)
    try:
        groups = ls.take([v4, v6], per_address=3)
        assert [len(g) for g in groups.values()] == [3, 3]
        for s in ls.all():
            assert s.type == socket.SOCK_DGRAM
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert groups[v4][0].getsockopt(socket.IPPROTO_IP, kernel.IP_TRANSPARENT) == 1
        assert groups[v4][0].getsockopt(socket.IPPROTO_IP, kernel.IP_RECVORIGDSTADDR) == 1
        assert groups[v6][0].getsockopt(socket.IPPROTO_IPV6, kernel.IPV6_TRANSPARENT) == 1
        assert groups[v6][0].getsockopt(socket.IPPROTO_IPV6, kernel.IPV6_RECVORIGDSTADDR) == 1
        assert groups[v6][0].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0  # [::] takes IPv4 too
        assert ls.take([v4], per_address=3)[v4] == groups[v4]  # a reload keeps the very sockets
    finally:
        ls.close()


def test_upgrade_hands_over_the_datagram_sockets(monkeypatch):
    port = _free_udp_port()
    ep = Endpoint("127.0.0.1", port)
    ls = Listeners(datagram=True)
    try:
        group = ls.take([ep], per_address=2)[ep]
        assert upgrade._spec({ep: group}) == f"{group[0].fileno()}={ep},{group[1].fileno()}={ep}"
        dups = [os.dup(s.fileno()) for s in group]  # what the new master finds open after exec
        monkeypatch.setenv(upgrade.ENV_DATAGRAMS, ",".join(f"{fd}={ep}" for fd in dups))
        adopted = upgrade.inherited_datagrams()
        assert list(adopted) == [ep] and len(adopted[ep]) == 2
        assert all(s.type == socket.SOCK_DGRAM and s.getsockname() == ("127.0.0.1", port) for s in adopted[ep])
        assert upgrade.ENV_DATAGRAMS not in os.environ
        for s in adopted[ep]:
            s.close()
    finally:
        ls.close()


def test_original_destination_arrives_with_each_datagram():
    """IP_RECVORIGDSTADDR names the destination a datagram was sent to (for a TPROXY'd one, the
    remote server's); the loopback exchange shows the ancillary data is read right."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        rx.setsockopt(socket.IPPROTO_IP, kernel.IP_RECVORIGDSTADDR, 1)
        rx.bind(("127.0.0.1", 0))
        tx.sendto(b"hi", rx.getsockname())
        _data, anc, _flags, _addr = rx.recvmsg(100, kernel.CMSG_SPACE)
        assert kernel.original_destination(anc) == Endpoint(*rx.getsockname())


def test_original_destination_v6_and_mapped():
    v6 = struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 53) + bytes(4) + \
        socket.inet_pton(socket.AF_INET6, "2001:db8::53") + bytes(4)
    assert kernel.original_destination([(socket.IPPROTO_IPV6, kernel.IPV6_RECVORIGDSTADDR, v6)]) == \
        Endpoint("2001:db8::53", 53)
    mapped = v6[:8] + socket.inet_pton(socket.AF_INET6, "::ffff:198.51.100.53") + bytes(4)
    assert kernel.original_destination([(socket.IPPROTO_IPV6, kernel.IPV6_RECVORIGDSTADDR, mapped)]) == \
        Endpoint("198.51.100.53", 53)
    assert kernel.original_destination([]) is None


@given(st.lists(st.tuples(st.sampled_from([socket.IPPROTO_IP, socket.IPPROTO_IPV6, 1]),
                          st.sampled_from([kernel.IP_RECVORIGDSTADDR, kernel.IPV6_RECVORIGDSTADDR, 8]),
                          st.binary(max_size=40)), max_size=3))
def test_original_destination_never_raises_on_odd_ancillary_data(anc):
    result = kernel.original_destination(anc)
    assert result is None or isinstance(result, Endpoint)


def _session(i: int, dest_port: int, now: float, timeout: float) -> Session:
    client, dest = Endpoint("192.0.2.2", 10000 + i), Endpoint("198.51.100.53", dest_port)
    return Session(i, client, dest, Flow(dest, client), now, timeout)


def test_table_evicts_the_session_idle_longest():
    t = Table(3)
    a, b, c = (_session(i, 7, 0.0, 60.0) for i in range(3))
    for s in (a, b, c):
        t.add(s)
    t.touch(a, 5.0)  # a datagram either way moves it to the back
    assert t.full() and t.oldest() is b
    t.remove(b)
    assert t.oldest() is c and len(t) == 2


def test_table_expiry_honours_each_timeout_and_stops_early():
    t = Table(10)
    dns = _session(1, 53, 0.0, 30.0)
    other = _session(2, 123, 0.0, 60.0)
    fresh = _session(3, 53, 40.0, 30.0)
    for s in (other, dns, fresh):
        t.add(s)
    assert t.expired(31.0, 30.0) == [dns]  # 31 s idle: past port 53's half, not the 60 s
    assert t.expired(61.0, 30.0) == [other, dns]
    assert t.expired(20.0, 30.0) == []


@root_only
def test_reply_sockets_shared_and_closed_with_the_last_session():
    replies = ReplySockets()
    src = Endpoint("198.51.100.53", 53)  # not an address of this host: IP_TRANSPARENT binds it
    a = replies.acquire(src)
    b = replies.acquire(src)
    assert a is b and len(replies) == 1
    assert a.getsockname() == (src.host, src.port)
    replies.release(src)
    assert a.fileno() != -1
    replies.release(src)
    assert a.fileno() == -1 and len(replies) == 0
    six = replies.acquire(Endpoint("2001:db8::53", 53))
    assert six.family == socket.AF_INET6
    replies.close()
    assert six.fileno() == -1
