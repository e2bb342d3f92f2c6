"""The bench's floor (bench/floor.py) relays a redirected connection through a SOCKS5 upstream.

The bench reads transocks' CPU per connection against this proxy, so it must
move every byte and fail closed; bench code otherwise has no tests here.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from bench.setups import FloorSetup
from tests.conftest import Upstreams
from tests.lab import servers
from tests.lab.netns import GW_EXT_V4, GW_EXT_V6, INET_V4, INET_V6, TEST_PORT, Lab

pytestmark = pytest.mark.netns
TIMEOUT = 10
CLOSED_PORT = TEST_PORT + 1  # nothing listens there in the inet namespace


@pytest.fixture
def floor(lab: Lab, upstreams: Upstreams) -> Iterator[FloorSetup]:
    setup = FloorSetup("floor", "floor via dante")
    try:
        setup.start(lab, upstreams.dante)
        yield setup
    finally:
        setup.stop(lab)


def _connect(lab: Lab, host: str, port: int = TEST_PORT) -> socket.socket:
    with lab.netns(lab.client):
        sock = socket.create_connection((host, port), timeout=TIMEOUT)
    sock.settimeout(TIMEOUT)
    return sock


@pytest.mark.parametrize(("dst", "egress"), [(INET_V4, GW_EXT_V4), (INET_V6, GW_EXT_V6)])
def test_floor_relays_through_the_upstream(lab: Lab, floor: FloorSetup, dst: str, egress: str) -> None:
    with _connect(lab, dst) as sock:
        assert servers.peer(sock)[0] == egress  # the server saw dante's egress, not the client
    n = 3 << 20  # more than the shared buffer and the socket buffers: the pause-and-resume path too
    with _connect(lab, dst) as sock:
        assert servers.get(sock, n, "floor") == (servers.expected_sha(n, "floor"), n)
    with _connect(lab, dst) as sock:
        data = servers.pattern(n, "up")
        assert servers.put(sock, data) == (servers.sha256(data), n)


def test_floor_closes_the_client_when_the_upstream_refuses(lab: Lab, floor: FloorSetup) -> None:
    with _connect(lab, INET_V4, CLOSED_PORT) as sock:
        sock.sendall(b"GET 10\n")
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass
