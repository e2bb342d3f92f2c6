"""Listening sockets: options that accepted connections inherit, IP_TRANSPARENT across reloads, slot groups."""

from __future__ import annotations

import os
import socket

import pytest

from transocks.core.netutil import (
    DEFAULT_USER_TIMEOUT,
    Endpoint,
    configure_user_timeout,
    set_keepalive,
)
from transocks.redirector.methods import tproxy
from transocks.redirector.methods.tproxy import IP_TRANSPARENT, IPV6_TRANSPARENT
from transocks.runtime import listeners, upgrade
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
    [lsock] = ls.take([ep], user_timeout=DEFAULT_USER_TIMEOUT)[ep]
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
        ls.take([v4, v6], per_address=2)  # a TTIN with a socket per slot
        assert [_transparent(s) for s in ls.all()] == [int(transparent)] * 4
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


def test_slots_map_round_robin_onto_an_address_group():
    port = _free_port()
    ep = Endpoint("127.0.0.1", port)
    ls = Listeners()
    try:
        groups = ls.take([ep], per_address=2)
        a, b = groups[ep]
        assert [listeners.slot_sockets(groups, k) for k in (1, 2, 3)] == [[(ep, a)], [(ep, b)], [(ep, a)]]
        assert listeners.held(groups, 1) == [a] and listeners.held(groups, 3) == [a, b]
        assert listeners.exclusive(groups, 2) and not listeners.exclusive(groups, 3)
        assert ls.release([a]) == [] and groups[ep] == [a] and b.fileno() == -1
        assert ls.release([]) == [ep] and a.fileno() == -1
    finally:
        ls.close()


def test_shared_layout_keeps_one_socket_per_address():
    ep = Endpoint("127.0.0.1", _free_port())
    ls = Listeners()
    try:
        groups = ls.take([ep], per_address=1)
        assert len(groups[ep]) == 1 and listeners.exclusive(groups, 1) and not listeners.exclusive(groups, 2)
    finally:
        ls.close()


@pytest.mark.parametrize("content, per_slot", [("1\n", True), ("0\n", False), (None, False)])
def test_per_slot_layout_only_with_migrate_req(tmp_path, content, per_slot):
    path = tmp_path / "tcp_migrate_req"
    if content is not None:
        path.write_text(content)
    got, why = listeners.per_slot_mode(str(path))
    assert got is per_slot
    assert "tcp_migrate_req" in why


def test_upgrade_hands_over_every_socket_of_a_group(monkeypatch):
    ep = Endpoint("127.0.0.1", _free_port())
    ls = Listeners()
    try:
        group = ls.take([ep], per_address=2)[ep]
        monkeypatch.setenv(upgrade.ENV_SOCKETS, ",".join(f"{os.dup(s.fileno())}={ep}" for s in group))
        got, _, _ = upgrade.inherited()
        assert list(got) == [ep] and len(got[ep]) == 2
        assert [s.getsockname() for s in got[ep]] == [s.getsockname() for s in group]
        for s in got[ep]:
            s.close()
    finally:
        ls.close()
