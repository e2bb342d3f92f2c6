"""The lab itself works, independently of transocks.

If these fail, transocks tests cannot be trusted: routing, the test servers,
every upstream proxy and the REDIRECT/SO_ORIGINAL_DST plumbing are checked
here with plain sockets, python-socks and curl from the client namespace.
"""

from __future__ import annotations

import base64
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from python_socks import ProxyError
from python_socks.sync import Proxy

from tests.conftest import Upstreams
from tests.lab import servers
from tests.lab.netns import (
    CLIENT_V4,
    CLIENT_V6,
    GW_EXT_V4,
    GW_EXT_V6,
    GW_V4,
    GW_V6,
    INET2_V4,
    INET2_V6,
    INET_V4,
    INET_V6,
    TEST_PORT,
    Lab,
)
from tests.lab.upstreams import Upstream

MIB = 1 << 20
TIMEOUT = 10
SO_ORIGINAL_DST = 80  # same value for IPv4 and IP6T_SO_ORIGINAL_DST
REDIRECT_PORT = 18081

pytestmark = pytest.mark.netns


def _gw_ext(dst: str) -> str:
    return GW_EXT_V6 if ":" in dst else GW_EXT_V4


def _connect_direct(lab: Lab, host: str, port: int = TEST_PORT) -> socket.socket:
    with lab.netns(lab.client):
        return socket.create_connection((host, port), timeout=TIMEOUT)


def _connect_socks(lab: Lab, url: str, dst: str) -> socket.socket:
    with lab.netns(lab.client):
        sock = Proxy.from_url(url).connect(dst, TEST_PORT, timeout=TIMEOUT)
    sock.settimeout(TIMEOUT)
    return sock


def _connect_http(lab: Lab, proxy_host: str, proxy_port: int, dst: str,
                  auth: tuple[str, str] | None = None) -> tuple[socket.socket, str]:
    """Raw HTTP CONNECT; returns the socket and the response status line."""
    target = f"[{dst}]:{TEST_PORT}" if ":" in dst else f"{dst}:{TEST_PORT}"
    request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request += f"Proxy-Authorization: Basic {token}\r\n"
    with lab.netns(lab.client):
        sock = socket.create_connection((proxy_host, proxy_port), timeout=TIMEOUT)
    sock.sendall((request + "\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 8192:
        byte = sock.recv(1)
        if not byte:
            break
        head += byte
    return sock, head.split(b"\r\n", 1)[0].decode(errors="replace")


def _check_get_and_peer(lab: Lab, connect: Callable[[], socket.socket], dst: str) -> None:
    with connect() as sock:
        assert servers.get(sock, MIB, "smoke") == (servers.expected_sha(MIB, "smoke"), MIB)
    with connect() as sock:
        assert servers.peer(sock)[0] == _gw_ext(dst)


@pytest.mark.parametrize("dst", [INET_V4, INET2_V4])
def test_direct_v4_routes_via_gw(lab: Lab, dst: str) -> None:
    route = lab.run(lab.client, ["ip", "route", "get", dst]).stdout
    assert f"via {GW_V4}" in route
    with _connect_direct(lab, dst) as sock:
        assert servers.peer(sock)[0] == CLIENT_V4


@pytest.mark.parametrize("dst", [INET_V6, INET2_V6])
def test_direct_v6_routes_via_gw(lab: Lab, dst: str) -> None:
    route = lab.run(lab.client, ["ip", "-6", "route", "get", dst]).stdout
    assert f"via {GW_V6}" in route
    with _connect_direct(lab, dst) as sock:
        assert servers.peer(sock)[0] == CLIENT_V6


def test_server_protocol_direct(lab: Lab) -> None:
    data = servers.pattern(300_000, "up")
    with _connect_direct(lab, INET_V4) as sock:
        assert servers.put(sock, data) == (servers.sha256(data), len(data))
    with _connect_direct(lab, INET_V6) as sock:
        assert servers.echo(sock, data) == (servers.sha256(data), len(data))
    with _connect_direct(lab, INET_V4) as sock:
        received, error = servers.reset(sock)
    assert received == b"partial\n"
    assert isinstance(error, ConnectionResetError)


def test_pattern_is_prefix_stable() -> None:
    assert servers.pattern(MIB + 7, 3)[:1000] == servers.pattern(1000, 3)
    assert servers.pattern(100, 1) != servers.pattern(100, 2)


@pytest.mark.parametrize("name", ["dante", "dante_auth", "microsocks"])
@pytest.mark.parametrize("proxy_family", ["v4", "v6"])
@pytest.mark.parametrize("dst", [INET_V4, INET_V6])
def test_socks_upstreams(lab: Lab, upstreams: Upstreams, name: str, proxy_family: str,
                         dst: str) -> None:
    up: Upstream = getattr(upstreams, name)
    url = up.url if proxy_family == "v4" else up.url6
    assert url is not None
    _check_get_and_peer(lab, lambda: _connect_socks(lab, url, dst), dst)


def test_dante_rejects_bad_password(lab: Lab, upstreams: Upstreams) -> None:
    url = upstreams.dante_auth.url.replace(":s3cret@", ":wrong@")
    with pytest.raises(ProxyError):
        _connect_socks(lab, url, INET_V4).close()
    no_auth = f"socks5://{GW_V4}:{upstreams.dante_auth.port}"
    with pytest.raises(ProxyError):
        _connect_socks(lab, no_auth, INET_V4).close()


@pytest.mark.parametrize("dst", [INET_V4, INET_V6])
def test_dante_relays_half_close_and_reset(lab: Lab, upstreams: Upstreams, dst: str) -> None:
    data = servers.pattern(200_000, "echo")
    with _connect_socks(lab, upstreams.dante.url, dst) as sock:
        assert servers.echo(sock, data) == (servers.sha256(data), len(data))
    with _connect_socks(lab, upstreams.dante.url, dst) as sock:
        received, error = servers.reset(sock)
    assert received == b"partial\n"
    assert isinstance(error, ConnectionResetError)


@pytest.mark.parametrize(("name", "relays_half_close", "relays_reset"), [
    ("dante", True, True),
    ("microsocks", False, False),
    ("tinyproxy", False, False),
])
def test_upstream_half_close_and_reset_behaviour(lab: Lab, upstreams: Upstreams, name: str,
                                                 relays_half_close: bool,
                                                 relays_reset: bool) -> None:
    """Pins what each real upstream does, so transocks tests expect the right thing.

    Only dante forwards a client FIN as a half-close and a server RST as an
    RST; microsocks and tinyproxy tear the whole tunnel down on the first EOF
    (the ECHO reply never comes) and turn an RST into a clean close.
    """
    up: Upstream = getattr(upstreams, name)

    def connect() -> socket.socket:
        if up.scheme == "http":
            sock, status = _connect_http(lab, up.host, up.port, INET_V4)
            assert " 200 " in status, status
            return sock
        return _connect_socks(lab, up.url, INET_V4)

    with connect() as sock:
        sock.sendall(b"ECHO\nabc")
        sock.shutdown(socket.SHUT_WR)
        reply = servers.recv_all(sock)
    assert (reply == f"{servers.sha256(b'abc')} 3\n".encode()) is relays_half_close, reply
    with connect() as sock:
        received, error = servers.reset(sock)
    assert received == b"partial\n"
    assert isinstance(error, ConnectionResetError) is relays_reset, error


@pytest.mark.parametrize("proxy_host", [GW_V4, GW_V6])
@pytest.mark.parametrize("dst", [INET_V4, INET_V6])
def test_tinyproxy_connect(lab: Lab, upstreams: Upstreams, proxy_host: str, dst: str) -> None:
    def connect() -> socket.socket:
        sock, status = _connect_http(lab, proxy_host, upstreams.tinyproxy.port, dst)
        assert " 200 " in status, status
        return sock

    _check_get_and_peer(lab, connect, dst)


@pytest.mark.parametrize("proxy_host", [GW_V4, GW_V6])
def test_squid_connect(lab: Lab, squid: Upstream, proxy_host: str) -> None:
    sock, status = _connect_http(lab, proxy_host, squid.port, INET2_V6)
    with sock:
        assert " 200 " in status, (status, squid.log_text())
        assert servers.get(sock, MIB, 5) == (servers.expected_sha(MIB, 5), MIB)


@pytest.mark.parametrize("proxy_host", [GW_V4, GW_V6])
def test_tinyproxy_basic_auth(lab: Lab, upstreams: Upstreams, proxy_host: str) -> None:
    port = upstreams.tinyproxy_auth.port
    sock, status = _connect_http(lab, proxy_host, port, INET_V4)
    sock.close()
    assert " 407 " in status, status
    sock, status = _connect_http(lab, proxy_host, port, INET_V4, ("tsk", "wrong"))
    sock.close()
    assert " 401 " in status or " 407 " in status, status
    sock, status = _connect_http(lab, proxy_host, port, INET_V6, upstreams.auth)
    with sock:
        assert " 200 " in status, status
        assert servers.get(sock, MIB, 9) == (servers.expected_sha(MIB, 9), MIB)


def test_curl_through_upstreams(lab: Lab, upstreams: Upstreams, tmp_path: Path) -> None:
    out = tmp_path / "body"
    path = f"{TEST_PORT}/bytes/{MIB}/c"
    cases = [
        ["--socks5", f"{GW_V4}:{upstreams.dante.port}", f"http://{INET_V4}:{path}"],
        ["--proxy", upstreams.dante_auth.url, f"http://[{INET_V6}]:{path}"],
        ["--socks5", f"[{GW_V6}]:{upstreams.microsocks.port}", f"http://{INET2_V4}:{path}"],
        ["--proxytunnel", "--proxy", upstreams.tinyproxy_auth.url, f"http://[{INET2_V6}]:{path}"],
    ]
    for args in cases:
        out.unlink(missing_ok=True)
        res = lab.run(lab.client,
                      ["curl", "-sS", "--max-time", str(TIMEOUT), "-o", str(out), *args],
                      check=False)
        assert res.returncode == 0, (args, res.stderr)
        assert servers.sha256(out.read_bytes()) == servers.expected_sha(MIB, "c"), args


def test_iptables_redirect_and_original_dst(lab: Lab) -> None:
    """The wiring the daemon fixture relies on: REDIRECT keeps SO_ORIGINAL_DST."""
    with lab.netns(lab.client):
        listeners = [socket.create_server(("127.0.0.1", REDIRECT_PORT)),
                     socket.create_server(("::1", REDIRECT_PORT), family=socket.AF_INET6)]
    redirect = lab.iptables_redirect(REDIRECT_PORT)
    try:
        for listener, dst, level in ((listeners[0], INET_V4, socket.SOL_IP),
                                     (listeners[1], INET2_V6, socket.IPPROTO_IPV6)):
            listener.settimeout(TIMEOUT)
            with _connect_direct(lab, dst) as client:
                conn, _ = listener.accept()
                with conn:
                    raw = conn.getsockopt(level, SO_ORIGINAL_DST, 28)
                    if level == socket.SOL_IP:
                        port, addr = struct.unpack_from("!H4s", raw, 2)
                        ip = socket.inet_ntop(socket.AF_INET, addr)
                    else:
                        port, addr = struct.unpack_from("!H", raw, 2)[0], raw[8:24]
                        ip = socket.inet_ntop(socket.AF_INET6, addr)
                    assert (ip, port) == (dst, TEST_PORT)
                    assert client.getpeername()[0] == dst
    finally:
        redirect.remove()
        for listener in listeners:
            listener.close()
    with _connect_direct(lab, INET_V4) as sock:
        assert servers.peer(sock)[0] == CLIENT_V4
