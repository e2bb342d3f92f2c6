"""Issue 20's dial levers (perf-dial): what a new connection's dial no longer does.

Each test counts or compares what a lever changes (handshake objects, syscalls through a
socket subclass), so none depends on timing.
"""

from __future__ import annotations

import socket
import time

import gevent
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_dial import handler_for, serve_one
from tests.unit.test_open_path import (  # noqa: F401 (socks5_member: a fixture)
    OK_REPLY as PIPELINED_OK,
    counted,
    ends_as_the_generator,
    socks5_member,
)
from tests.unit.test_wire_properties import SOCKS_PIECES, run_handshake, split
from transocks.core import netutil
from transocks.core.config import AUTO
from transocks.core.netutil import Endpoint
from transocks.redirector.upstream import ProxyURL, make_dialer
from transocks.redirector.upstream.socks5 import InlineConnect, Stage

OK_REPLY = b"\x05\x00\x00\x01" + bytes([192, 0, 2, 1]) + b"\x04\x38"


def two_step_dialer(pipelining):
    return make_dialer(ProxyURL("socks5", "127.0.0.1", 1080), 1, 1, socks5_pipelining=pipelining)


def test_a_member_that_does_not_pipeline_gets_the_inline_check_too():
    """dante's way (greeting, method reply, request, reply) runs without a generator."""
    d = two_step_dialer(AUTO)
    h = d.handshake(Endpoint("203.0.113.10", 80), b"\x01" + bytes([203, 0, 113, 10]) + b"\x00\x50")
    assert isinstance(h, InlineConnect) and h.stage is Stage.METHOD
    ending, tail, sent = run_handshake(h, [b"\x05\x00", OK_REPLY + b"first"])
    assert (ending, tail) == ("open", b"first")
    assert sent == [b"\x05\x03\x00\x8a\x8b", b"\x05\x01\x00\x01\xcb\x00q\n\x00P"]
    assert h.slow is None  # both replies were checked inline
    assert not d.pipelines and not d.names


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([AUTO, False]),
       st.one_of(SOCKS_PIECES, st.sampled_from([b"\x05\x00" + OK_REPLY, b"\x05\x8a" + OK_REPLY, b"\x05\x8b" + OK_REPLY,
                                                b"\x05\x00" + OK_REPLY + b"tail", b"\x05\x00\x05\x05\x00\x01" + bytes(6),
                                                b"\x05\x00\x05\x00\x00\x04" + bytes(18), b"\x05\x02" + OK_REPLY,
                                                b"\x05\x00\x05\x00\x00\x03\x03abc\x00\x50"])),
       st.lists(st.integers(0, 10**6), max_size=6), st.sampled_from(["sni.example", "203.0.113.5"]))
def test_the_two_step_inline_check_ends_as_the_generator_does(pipelining, data, cuts, host):
    """Whatever a member that is not pipelined to answers, in any chunking: the inline
    handshake sends the same messages, ends the same way (tunnel bytes, or a failure of
    the same type and text) and leaves the dialer knowing the same as the generator."""
    ends_as_the_generator(two_step_dialer(pipelining), two_step_dialer(pipelining), host, split(data, cuts), False)


def test_upstream_keepalive_comes_a_tick_later_and_skips_closed_sockets():
    """keepalive_soon: no setsockopt now; set_keepalive's options within two ticks on a
    socket still open (one closed by then is passed over); the sweep stops when nothing waits."""
    _until(lambda: netutil._settling.timer is None)  # a sweep left by another test, at its own period
    netutil.configure_user_timeout(0.4)  # ticks of 0.1 s
    try:
        kept, closed = socket.socket(), socket.socket()
        netutil.keepalive_soon(kept)
        netutil.keepalive_soon(closed)
        assert kept.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        closed.close()
        _until(lambda: kept.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1)
        assert kept.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == netutil.KEEPALIVE_IDLE
        assert kept.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == netutil.KEEPALIVE_INTERVAL
        assert kept.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 400
        _until(lambda: netutil._settling.timer is None)
        kept.close()
    finally:
        netutil.configure_user_timeout(netutil.DEFAULT_USER_TIMEOUT)
    gevent.sleep(0)


def _until(check, limit: float = 10.0) -> None:
    end = time.monotonic() + limit
    while not check():
        assert time.monotonic() < end, "not within the generous limit"
        gevent.sleep(0.02)


def test_the_open_path_sets_only_nodelay_on_the_upstream_socket(counted):
    """Through the handler to a relay: TCP_NODELAY before the connect, and nothing else
    until the keepalive sweep (on main: SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL and
    TCP_USER_TIMEOUT as well, on every connection)."""
    _until(lambda: netutil._settling.timer is None)
    lsock, got, g = socks5_member(PIPELINED_OK)
    h = handler_for(lsock.getsockname()[1])
    outer, served = serve_one(h)
    _until(lambda: h.counters.active and len(got) == 2)  # greeting, then the request: the tunnel is open
    gevent.sleep(0.05)
    assert [c for c in counted if c[0] == "set"] == [("set", socket.IPPROTO_TCP, socket.TCP_NODELAY)]
    assert netutil._settling.young  # the upstream socket waits for its keepalive options
    outer.close()
    lsock.close()
    g.kill()
    served.kill()
