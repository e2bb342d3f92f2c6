"""Listening sockets: options that accepted connections inherit, and IP_TRANSPARENT across reloads."""

from __future__ import annotations

import os
import socket

import pytest

from transocks.core.netutil import DEFAULT_USER_TIMEOUT, Endpoint, configure_user_timeout, set_keepalive
from transocks.redirector.methods import tproxy
from transocks.redirector.methods.tproxy import IP_TRANSPARENT, IPV6_TRANSPARENT
from transocks.runtime.listeners import Listeners, activate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _transparent(sock: socket.socket) -> int:
    if sock.family == socket.AF_INET6:
        return sock.getsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT)
    return sock.getsockopt(socket.IPPROTO_IP, IP_TRANSPARENT)


def test_accepted_connections_inherit_keepalive_and_nodelay():
    ls = Listeners()
    ep = Endpoint("127.0.0.1", _free_port())
    lsock = ls.take([ep], user_timeout=DEFAULT_USER_TIMEOUT)[ep]
    activate(lsock, 16)
    try:
        with socket.create_connection((ep.host, ep.port), timeout=5):
            lsock.setblocking(True)
            conn, _ = lsock.accept()
            with conn:
                assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 120000
    finally:
        ls.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="IP_TRANSPARENT needs CAP_NET_ADMIN: run as root")
@pytest.mark.parametrize("transparent", [True, False])
def test_transparent_is_set_on_every_socket_bound(transparent):
    port = _free_port()
    v4, v6 = Endpoint("127.0.0.1", port), Endpoint("::1", port)
    ls = Listeners(tproxy.prepare_listener if transparent else None)
    try:
        ls.take([v4])
        ls.take([v4, v6])  # a reload adding an address
        assert [_transparent(s) for s in ls.sockets.values()] == [int(transparent)] * 2
    finally:
        ls.close()


def test_set_keepalive_applies_the_configured_user_timeout():
    """Upstream sockets get it from set_keepalive (the handlers call it), as the worker configured."""
    try:
        for seconds, expected in ((7.5, 7500), (0.0, 0)):
            configure_user_timeout(seconds)
            with socket.socket() as s:
                set_keepalive(s)
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == expected
    finally:
        configure_user_timeout(DEFAULT_USER_TIMEOUT)
