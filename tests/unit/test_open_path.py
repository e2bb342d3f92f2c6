"""Issue 20's open-path levers: what a new connection's dial and accept no longer do.

Each test counts the calls a lever removes (syscalls through a socket subclass,
handshake objects), so none depends on timing.
"""

from __future__ import annotations

import socket

import gevent
import gevent.event
import pytest
from gevent import socket as gsocket

from transocks.core import nio
from transocks.core.netutil import Endpoint
from transocks.redirector.upstream import ProxyURL, make_dialer
from transocks.redirector.upstream.dial import Dial


class CountingSocket(socket.socket):
    """A real socket that records the options it is asked for and given."""

    calls: list[tuple] = []

    def getsockopt(self, *args):  # type: ignore[override]
        CountingSocket.calls.append(("get", *args[:2]))
        return super().getsockopt(*args)

    def setsockopt(self, *args):  # type: ignore[override]
        CountingSocket.calls.append(("set", *args[:2]))
        return super().setsockopt(*args)


@pytest.fixture
def counted(monkeypatch):
    CountingSocket.calls = []
    monkeypatch.setattr(nio, "new_socket", lambda family: CountingSocket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK))
    return CountingSocket.calls


def socks5_member(replies: bytes, pipelined: bool = False):
    """A SOCKS5 server on 127.0.0.1 that answers one connection with `replies` (after the
    greeting, and after the request unless `pipelined`) and records what it got."""
    lsock = gsocket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    got: list[bytes] = []

    def serve():
        conn, _ = lsock.accept()
        got.append(conn.recv(4096))
        if not pipelined:
            conn.sendall(replies[:2])
            got.append(conn.recv(4096))
            conn.sendall(replies[2:])
        else:
            conn.sendall(replies)
        gevent.sleep(0.5)
        conn.close()

    g = gevent.spawn(serve)
    return lsock, got, g


OK_REPLY = b"\x05\x00" + b"\x05\x00\x00\x01" + bytes([192, 0, 2, 1]) + b"\x04\x38"
DEST = Endpoint("203.0.113.10", 80)
WIRE = b"\x01" + bytes([203, 0, 113, 10]) + b"\x00\x50"


def test_the_first_send_proves_the_connect_without_so_error(counted):
    lsock, got, g = socks5_member(OK_REPLY)
    d = make_dialer(ProxyURL("socks5", "127.0.0.1", lsock.getsockname()[1]), 5, 5)
    stream = d.dial(DEST, WIRE)
    stream.close()
    lsock.close()
    g.kill()
    assert got[1] == b"\x05\x01\x00" + WIRE
    assert ("get", socket.SOL_SOCKET, socket.SO_ERROR) not in counted


def test_a_refusal_shown_by_the_first_send_moves_on_to_the_next_address(counted):
    lsock, got, g = socks5_member(OK_REPLY)
    port = lsock.getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()  # nothing listens there: the connect is refused
    d = make_dialer(ProxyURL("socks5", "127.0.0.1", port), 5, 5)
    done = gevent.event.AsyncResult()
    dial = Dial(d, [(socket.AF_INET, ("127.0.0.1", refused_port)), (socket.AF_INET, ("127.0.0.1", port))],
                d.handshake(DEST, WIRE), done.set)
    dial.start()
    assert done.get(timeout=5) is dial and dial.error is None
    assert dial.addr == ("127.0.0.1", port)
    dial.stream().close()
    lsock.close()
    g.kill()
    assert ("get", socket.SOL_SOCKET, socket.SO_ERROR) not in counted


def test_a_dial_with_nothing_to_send_still_checks_its_connect(counted):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()
    d = make_dialer(ProxyURL("direct", "", 0), 5, 5)
    with pytest.raises(Exception) as exc:
        d.dial(Endpoint("127.0.0.1", refused_port))
    assert "refused" in str(exc.value)


def test_an_upstream_socket_gets_keepalive_without_the_count_a_user_timeout_overrides(counted):
    """Lever d: accepted sockets inherit every option from the listener (test_listeners);
    an upstream socket gets keepalive and the user timeout, and TCP_KEEPCNT only when no
    user timeout makes the kernel ignore it."""
    from transocks.core.netutil import DEFAULT_USER_TIMEOUT, configure_user_timeout, set_keepalive

    try:
        for seconds, count_set in ((DEFAULT_USER_TIMEOUT, False), (0.0, True)):
            configure_user_timeout(seconds)
            CountingSocket.calls.clear()
            with nio.new_socket(socket.AF_INET) as s:
                set_keepalive(s)
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 15
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == int(seconds * 1000)
                assert (("set", socket.IPPROTO_TCP, socket.TCP_KEEPCNT) in counted) is count_set
                assert len([c for c in counted if c[0] == "set"]) == 4
    finally:
        configure_user_timeout(DEFAULT_USER_TIMEOUT)
