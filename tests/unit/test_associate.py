"""The SOCKS5 UDP ASSOCIATE client against scripted fake servers on loopback."""

from __future__ import annotations

import socket

import gevent
import gevent.socket
import pytest

from transocks.core import outcome
from transocks.core.netutil import Endpoint
from transocks.core.outcome import Failure
from transocks.redirector.exits.member import Member
from transocks.redirector.upstream import make_dialer, parse_proxy_url
from transocks.redirector.upstream.associate import ANY, associate
from transocks.wire import socks5


class FakeServer:
    """One scripted SOCKS5 server connection: records what it got, answers with `script`."""

    def __init__(self, script) -> None:
        self.sock = gevent.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.got: list[bytes] = []
        self.conn = None
        self.task = gevent.spawn(self._serve, script)

    def _serve(self, script) -> None:
        conn, _ = self.sock.accept()
        self.conn = conn
        script(self, conn)

    def read(self, conn, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                break
            buf += chunk
        self.got.append(buf)
        return buf

    def close(self) -> None:
        self.task.kill()
        if self.conn is not None:
            self.conn.close()
        self.sock.close()


def member(port: int, auth: str = "") -> Member:
    url = parse_proxy_url(f"socks5://{auth}127.0.0.1:{port}")
    return Member(make_dialer(url, 2.0, 2.0), str(url))


def reply(rep: int, bound: bytes) -> bytes:
    return bytes([5, rep, 0]) + bound


def greet_and_request(srv: FakeServer, conn, method: int = 0) -> bytes:
    head = srv.read(conn, 2)
    srv.read(conn, head[1])
    conn.sendall(bytes([5, method]))
    if method == socks5.USERPASS:
        ver_ulen = srv.read(conn, 2)
        srv.read(conn, ver_ulen[1])
        plen = srv.read(conn, 1)
        srv.read(conn, plen[0])
        conn.sendall(b"\x01\x00")
    return srv.read(conn, 10)  # VER CMD RSV ATYP(1) 4 + 2


def replying(answer: bytes, method: int = 0):
    """A server script: the greeting (choosing `method`) and the request, then `answer`, then silence."""
    def script(srv: FakeServer, conn) -> None:
        greet_and_request(srv, conn, method)
        conn.sendall(answer)
        gevent.sleep(5)
    return script


@pytest.fixture
def server():
    made = []

    def make(script) -> FakeServer:
        srv = FakeServer(script)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.close()


def test_associate_sends_the_request_and_reads_the_relay(server):
    srv = server(replying(reply(0, socks5.encode_address(Endpoint("127.0.0.9", 4444)))))
    a = associate(member(srv.port), 2.0, Endpoint("0.0.0.0", 5353))
    try:
        assert a.relay == Endpoint("127.0.0.9", 4444)
        assert srv.got[-1] == socks5.udp_associate_request(Endpoint("0.0.0.0", 5353))
        assert srv.got[-1][1] == socks5.CMD_UDP_ASSOCIATE
    finally:
        a.close()
    assert a.control.fileno() == -1


def test_unspecified_bound_address_means_the_proxy_reached(server):
    srv = server(replying(reply(0, socks5.encode_address(Endpoint("0.0.0.0", 4445)))))
    a = associate(member(srv.port), 2.0, ANY)
    a.close()
    assert a.relay == Endpoint("127.0.0.1", 4445)


def test_userpass_from_the_member_url(server):
    srv = server(replying(reply(0, socks5.encode_address(Endpoint("127.0.0.1", 4446))), socks5.USERPASS))
    a = associate(member(srv.port, "alice:s3cret@"), 2.0, ANY)
    a.close()
    assert b"".join(srv.got).startswith(b"\x05\x03\x00\x02\x8c\x01\x05alice\x06s3cret")
    assert a.relay.port == 4446


@pytest.mark.parametrize("rep, name", [(7, outcome.UPSTREAM_REFUSED), (2, outcome.UPSTREAM_REFUSED),
                                       (1, outcome.UPSTREAM_REFUSED)])
def test_refusal_is_a_failure_with_the_reply_code(server, rep, name):
    srv = server(replying(reply(rep, socks5.encode_address(Endpoint("0.0.0.0", 0)))))
    with pytest.raises(Failure) as e:
        associate(member(srv.port), 2.0, ANY)
    assert e.value.outcome == name
    assert f"socks5 reply {rep:02x}" in str(e.value)


def test_silent_server_times_out_within_the_timeout(server):
    def script(srv, conn):
        gevent.sleep(10)

    srv = server(script)
    with pytest.raises(Failure) as e:
        associate(member(srv.port), 0.3, ANY)
    assert e.value.outcome == outcome.UPSTREAM_TIMEOUT


@pytest.mark.parametrize("tail", [b"\x03\x04host\x10\x00", b"\x01\x7f\x00\x00\x01\x00\x00",
                                  b"\x01\x7f\x00\x00\x01\x10\x00EXTRA"])
def test_unusable_relay_is_a_protocol_error(server, tail):
    srv = server(replying(b"\x05\x00\x00" + tail))
    with pytest.raises(Failure) as e:
        associate(member(srv.port), 2.0, ANY)
    assert e.value.outcome == outcome.PROTOCOL_ERROR


def test_closed_before_reply_fails(server):
    def script(srv, conn):
        greet_and_request(srv, conn)
        conn.close()

    srv = server(script)
    with pytest.raises((Failure, EOFError)):
        associate(member(srv.port), 2.0, ANY)


def test_not_a_socks5_member():
    m = Member(make_dialer(parse_proxy_url("http://127.0.0.1:1"), 1.0, 1.0), "http")
    with pytest.raises(Failure) as e:
        associate(m, 1.0, ANY)
    assert e.value.outcome == outcome.UPSTREAM_REFUSED
