"""Encoding and parsing of each upstream dialer, against scripted fake servers."""

from __future__ import annotations

import base64
import socket
import struct

import gevent
import pytest

from tests.unit.readers import reader_of
from transocks.core import outcome
from transocks.core.netutil import Endpoint
from transocks.core.outcome import Failure
from transocks.redirector.upstream import http_connect as http_dialer
from transocks.redirector.upstream import make_dialer, parse_proxy_url
from transocks.redirector.upstream import socks5 as socks5_dialer
from transocks.redirector.upstream.base import Claim
from transocks.wire import http as http_connect
from transocks.wire import socks4, socks5

# --- proxy URLs ------------------------------------------------------------


def test_parse_proxy_url_variants():
    u = parse_proxy_url("socks5://alice:p%40ss@[2001:db8::1]:1090")
    assert (u.scheme, u.host, u.port, u.username, u.password) == ("socks5", "2001:db8::1", 1090, "alice", "p@ss")
    assert str(u) == "socks5://alice@[2001:db8::1]:1090"
    assert parse_proxy_url("http://proxy.example").port == 8080
    assert parse_proxy_url("socks4a://bob@10.0.0.1:1080").username == "bob"
    assert parse_proxy_url("direct://").scheme == "direct"
    with pytest.raises(ValueError, match="unsupported proxy scheme"):
        parse_proxy_url("ftp://x:1")
    with pytest.raises(ValueError, match="missing host"):
        parse_proxy_url("socks5://:1080")


# --- SOCKS5 ------------------------------------------------------------------


@pytest.mark.parametrize(
    "dest, encoded",
    [
        (Endpoint("203.0.113.5", 443), b"\x01\xcb\x00\x71\x05\x01\xbb"),
        (Endpoint("2001:db8::1", 80), b"\x04" + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + b"\x00\x50"),
        (Endpoint("example.com", 8080), b"\x03\x0bexample.com\x1f\x90"),
    ],
)
def test_socks5_address_encoding(dest, encoded):
    assert socks5.encode_address(dest) == encoded
    assert socks5.connect_request(dest) == b"\x05\x01\x00" + encoded


def test_socks5_userpass_encoding_and_limits():
    assert socks5.userpass_request("u", "pw") == b"\x01\x01u\x02pw"
    with pytest.raises(ValueError):
        socks5.userpass_request("u" * 256, "x")
    with pytest.raises(ValueError):
        socks5.userpass_request("", "x")


@pytest.mark.parametrize(
    "reply, bound",
    [
        (b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38", Endpoint("127.0.0.1", 1080)),
        (b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x00\x50", Endpoint("::1", 80)),
        (b"\x05\x00\x00\x03\x04host\x00\x16", Endpoint("host", 22)),
    ],
)
def test_socks5_reply_any_atyp_read_whole(reply, bound):
    read = reader_of(reply + b"TUNNEL")
    assert socks5.read_reply(read) == (0, bound)
    assert read(6) == b"TUNNEL"


def test_socks5_reply_errors():
    with pytest.raises(Failure) as e:
        socks5.read_reply(reader_of(b"\x04\x00\x00\x01" + bytes(6)))
    assert e.value.outcome == outcome.PROTOCOL_ERROR
    with pytest.raises(Failure, match="unknown address type"):
        socks5.read_reply(reader_of(b"\x05\x00\x00\x09" + bytes(6)))
    with pytest.raises(Failure) as e:
        socks5_dialer.check_reply(5)
    assert e.value.outcome == outcome.DEST_REFUSED
    assert str(e.value) == "socks5 reply 05: connection refused"


# --- SOCKS4 ------------------------------------------------------------------


def test_socks4_and_4a_requests():
    assert socks4.connect_request(Endpoint("203.0.113.5", 80), "me") == b"\x04\x01\x00\x50\xcb\x00\x71\x05me\x00"
    assert socks4.connect_request(Endpoint("example.com", 80)) == b"\x04\x01\x00\x50\x00\x00\x00\x01\x00example.com\x00"
    with pytest.raises(socks4.NeedsName, match="IPv4 only"):
        socks4.connect_request(Endpoint("2001:db8::1", 80), allow_domain=False)
    assert socks4.read_reply(reader_of(b"\x00\x5a" + bytes(6))) == 0x5A
    with pytest.raises(Failure):
        socks4.read_reply(reader_of(b"\x04\x5a" + bytes(6)))


# --- HTTP CONNECT ------------------------------------------------------------


def test_http_connect_request_brackets_ipv6_and_auth():
    req = http_connect.connect_request(Endpoint("2001:db8::1", 443), "u", "p")
    token = base64.b64encode(b"u:p").decode()
    assert req == (
        f"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n"
        f"Proxy-Authorization: Basic {token}\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("line, code, reason", [
    (b"HTTP/1.1 200 Connection established", 200, "Connection established"), (b"HTTP/1.0 204 OK", 204, "OK"),
    (b"HTTP/1.1 200", 200, ""), (b"HTTP/1.1 407 Proxy \xe9", 407, "Proxy \xe9"),
])
def test_http_status_line(line, code, reason):
    assert http_connect.parse_status(line + b"\r\n\r\n") == (code, reason)


@pytest.mark.parametrize("line", [
    b"HTTP/1.1 \xb2\xb2\xb2 OK",  # superscript two: str.isdigit() says yes, int() says no
    "HTTP/1.1 \u0662\u0660\u0660 OK".encode(), "HTTP/1.1 \uff12\uff10\uff10 OK".encode(),
    b"HTTP/1.1 +20 OK", b"HTTP/1.1 2_0 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1 -200 OK",
    b"HTTP/1.1  200 OK", b"HTTP/2 200 OK", b"HTTP/1.\xb9 200 OK", b"", b"SSH-2.0-OpenSSH",
])
def test_http_status_line_digits_are_ascii_only(line):
    with pytest.raises(Failure, match="bad status line") as info:
        http_connect.parse_status(line + b"\r\n\r\n")
    assert info.value.outcome == outcome.PROTOCOL_ERROR


def test_http_status_errors():
    with pytest.raises(Failure, match="bad status line"):
        http_connect.parse_status(b"SSH-2.0-OpenSSH\r\n\r\n")
    assert http_dialer.status_error(407, "Proxy Auth").outcome == outcome.AUTH_FAILED
    assert http_dialer.status_error(503, "").outcome == outcome.DEST_UNREACHABLE
    assert http_dialer.status_error(403, "Forbidden").outcome == outcome.UPSTREAM_REFUSED


# --- dialers against scripted servers -------------------------------------------


def serve_script(script):
    """Listen on loopback; run script(conn) in a greenlet for the first connection."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.setblocking(False)

    def run():
        from transocks.core import nio

        nio.wait(lsock, 1)
        conn, _ = lsock.accept()
        conn.setblocking(False)
        try:
            script(conn)
        finally:
            lsock.close()

    g = gevent.spawn(run)
    return lsock.getsockname()[1], g


def recv_n(conn, n):
    from transocks.core import nio

    return nio.recv_exact(conn, n)


def send(conn, data):
    from transocks.core import nio

    nio.sendall(conn, data)


def test_socks5_dialer_pipelined_no_auth():
    seen = {}

    def script(conn):
        seen["all"] = recv_n(conn, 4 + 10)
        send(conn, b"\x05\x00" + b"\x05\x00\x00\x01" + bytes(6) + b"hello")
        gevent.sleep(0.05)
        conn.close()

    port, g = serve_script(script)
    d = make_dialer(parse_proxy_url(f"socks5://127.0.0.1:{port}"), 2, 2, socks5_pipelining=True)
    s = d.dial(Endpoint("203.0.113.5", 80))
    from transocks.core import nio

    # Tunnel bytes that came with the reply are kept for the relay, not eaten.
    assert s.extra + nio.recv_exact(s.sock, 5 - len(s.extra)) == b"hello"
    g.join()
    assert seen["all"] == b"\x05\x02\x00\x8b\x05\x01\x00\x01\xcb\x00\x71\x05\x00\x50"
    s.close()


def test_socks5_dialer_userpass_wrong_credentials():
    def script(conn):
        assert recv_n(conn, 5) == b"\x05\x03\x00\x02\x8c"
        send(conn, b"\x05\x02")
        assert recv_n(conn, 2 + 1 + 1 + 3) == b"\x01\x01u\x03bad"
        send(conn, b"\x01\x01")
        conn.close()

    port, g = serve_script(script)
    d = make_dialer(parse_proxy_url(f"socks5://u:bad@127.0.0.1:{port}"), 2, 2)
    with pytest.raises(Failure) as e:
        d.dial(Endpoint("203.0.113.5", 80))
    assert e.value.outcome == outcome.AUTH_FAILED
    g.join()


def test_socks5_dialer_handshake_timeout():
    def script(conn):
        gevent.sleep(1.0)
        conn.close()

    port, g = serve_script(script)
    d = make_dialer(parse_proxy_url(f"socks5://127.0.0.1:{port}"), 2, 0.2)
    with pytest.raises(Failure) as e:
        d.dial(Endpoint("203.0.113.5", 80))
    assert e.value.outcome == outcome.UPSTREAM_TIMEOUT
    g.kill()


def test_connect_refused_is_upstream_unreachable():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    d = make_dialer(parse_proxy_url(f"socks5://127.0.0.1:{port}"), 2, 2)
    with pytest.raises(Failure) as e:
        d.dial(Endpoint("203.0.113.5", 80))
    assert e.value.outcome == outcome.UPSTREAM_UNREACHABLE
    assert "Connection refused" in str(e.value)


def test_http_dialer_header_split_and_tunnel_bytes_kept():
    def script(conn):
        req = b""
        while not req.endswith(b"\r\n\r\n"):
            req += conn.recv(100) if _readable(conn) else b""
        send(conn, b"HTTP/1.1 200 Connection established\r")
        gevent.sleep(0.05)
        send(conn, b"\nX-Test: 1\r\n\r\nDATA")
        gevent.sleep(0.05)
        conn.close()

    port, g = serve_script(script)
    d = make_dialer(parse_proxy_url(f"http://127.0.0.1:{port}"), 2, 2)
    s = d.dial(Endpoint("203.0.113.5", 443))
    assert s.extra == b"DATA"  # read with the header's end: the relay sends it first
    g.join()
    s.close()


def test_http_dialer_oversized_header():
    def script(conn):
        recv_n(conn, 10)
        send(conn, b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 20000)
        gevent.sleep(0.2)
        conn.close()

    port, g = serve_script(script)
    d = make_dialer(parse_proxy_url(f"http://127.0.0.1:{port}"), 2, 2)
    with pytest.raises(Failure, match="exceeds 16384"):
        d.dial(Endpoint("203.0.113.5", 443))
    g.kill()


def http_dial(*chunks: bytes):
    """Dial through a scripted HTTP proxy that answers with chunks (sent apart) and then DATA."""
    def script(conn):
        req = b""
        while not req.endswith(b"\r\n\r\n"):
            req += conn.recv(100) if _readable(conn) else b""
        for chunk in chunks:
            send(conn, chunk)
            gevent.sleep(0.02)
        gevent.sleep(0.2)
        conn.close()

    port, g = serve_script(script)
    d = make_dialer(parse_proxy_url(f"http://127.0.0.1:{port}"), 2, 2)
    try:
        return d.dial(Endpoint("203.0.113.5", 443))
    finally:
        g.join(5)


def test_http_dialer_skips_interim_responses():
    from transocks.core import nio

    s = http_dial(b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 1",
                  b"02 Processing\r\n\r\n", b"HTTP/1.1 200 Connection established\r\n\r\nDATA")
    got = s.extra  # what came with the final header; the rest follows on the socket
    while len(got) < 4:
        got += nio.recv_some(s.sock, 4 - len(got))
    assert got == b"DATA"
    s.close()


@pytest.mark.parametrize("chunks, kind, words", [
    ([b"HTTP/1.1 100 Continue\r\n\r\n" * 9], outcome.PROTOCOL_ERROR, "more than 8 interim responses"),
    ([b"HTTP/1.1 101 Switching Protocols\r\n\r\n"], outcome.UPSTREAM_REFUSED, "status 101"),
    ([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 407 Auth\r\n\r\n"], outcome.AUTH_FAILED, "status 407 Auth"),
    ([b"HTTP/1.1 \xb2\xb2\xb2 OK\r\n\r\n"], outcome.PROTOCOL_ERROR, "bad status line"),
    ([b"HTTP/1.1 100 Continue\r\n\r\n"], outcome.PROTOCOL_ERROR, "closed during handshake"),
])
def test_http_dialer_failures_are_outcomes(chunks, kind, words):
    with pytest.raises(Failure, match=words) as info:
        http_dial(*chunks)
    assert info.value.outcome == kind


def _readable(conn):
    from transocks.core import nio

    nio.wait(conn, 1)
    return True


def test_socks4_dialer_rejected():
    def script(conn):
        recv_n(conn, 9)
        send(conn, struct.pack("!BBH4s", 0, 0x5B, 0, bytes(4)))
        conn.close()

    port, g = serve_script(script)
    d = make_dialer(parse_proxy_url(f"socks4://127.0.0.1:{port}"), 2, 2)
    with pytest.raises(Failure, match="socks4 reply 5b"):
        d.dial(Endpoint("203.0.113.5", 80))
    g.join()


def _socks5_server(method: int, connections: int, seen: list):
    """A scripted SOCKS5 server for `connections` tunnels that answers the greeting with
    `method` and records, per connection, what it had received when it answered."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(connections)
    lsock.setblocking(False)

    def run():
        from transocks.core import nio

        for _ in range(connections):
            nio.wait(lsock, 1)
            conn, _ = lsock.accept()
            conn.setblocking(False)
            greeting = recv_n(conn, 2)
            greeting += recv_n(conn, greeting[1])
            gevent.sleep(0.05)  # a pipelined request arrives meanwhile
            try:
                early = conn.recv(100)
            except BlockingIOError:
                early = b""
            seen.append((greeting, early))
            send(conn, bytes([5, method]))
            if not early:
                early = recv_n(conn, 10)
            send(conn, b"\x05\x00\x00\x01" + bytes(6))
            conn.close()
        lsock.close()

    return lsock.getsockname()[1], gevent.spawn(run)


@pytest.mark.parametrize("method, pipelines", [(socks5.PIPELINED, True), (socks5.NO_AUTH, False)])
def test_socks5_auto_pipelining_learns_from_the_method_reply(method, pipelines):
    """auto offers PIPELINED beside no-auth; a member that chooses it gets the next requests
    behind the greeting, one that chooses no-auth (any other server) never does."""
    seen: list = []
    port, g = _socks5_server(method, 3, seen)
    d = make_dialer(parse_proxy_url(f"socks5://127.0.0.1:{port}"), 2, 2)
    for _ in range(3):
        d.dial(Endpoint("203.0.113.5", 80)).close()
    g.join(5)
    assert [greeting for greeting, _ in seen] == [b"\x05\x03\x00\x8a\x8b"] * 3
    assert [bool(early) for _, early in seen] == [False, pipelines, pipelines]


def test_socks5_auto_pipelining_is_unlearnt_when_the_member_stops_choosing_it():
    seen: list = []
    port, g = _socks5_server(socks5.PIPELINED, 1, seen)
    d = make_dialer(parse_proxy_url(f"socks5://127.0.0.1:{port}"), 2, 2)
    d.dial(Endpoint("203.0.113.5", 80)).close()
    g.join(5)
    assert d.pipelines
    port2, g2 = _socks5_server(socks5.NO_AUTH, 1, seen)
    d.addrs = [(socket.AF_INET, ("127.0.0.1", port2))]  # another server behind the same member
    d.dial(Endpoint("203.0.113.5", 80)).close()  # pipelined; this server reads the request after answering
    g2.join(5)
    assert not d.pipelines


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "203.0.113.10"), (socket.AF_INET6, "2001:db8:2::10")])
def test_redirect_destination_wire_bytes_are_the_socks5_encoding(family, host):
    """The CONNECT request cut from SO_ORIGINAL_DST's bytes equals the one built from the text."""
    from types import SimpleNamespace

    from transocks.redirector.methods import redirect

    packed = socket.inet_pton(family, host)
    if family == socket.AF_INET:
        raw = struct.pack("=H", family) + struct.pack("!H", 8443) + packed + bytes(8)
    else:
        raw = struct.pack("=H", family) + struct.pack("!H", 8443) + bytes(4) + packed + bytes(4)
    sock = SimpleNamespace(family=family, getsockopt=lambda level, opt, size: raw)
    dest, wire = redirect.destination(sock, ("192.0.2.2" if family == socket.AF_INET else "2001:db8:c::2", 1))
    assert dest == Endpoint(host, 8443)
    assert socks5_dialer.CONNECT_HEAD + wire == socks5.connect_request(dest)


# --- names: a claim with the address to usocksd, a verified name to anyone else ---------


@pytest.mark.parametrize("method, verified, request_sent", [
    # usocksd (NAMED): the name, verified or not, with the original address; the edge judges the pair
    (socks5.NAMED, False, b"\x05\x8b\x00\x01\xcb\x00\x71\x05\x01\xbb\x0bwww.example"),
    (socks5.NAMED, True, b"\x05\x8b\x00\x01\xcb\x00\x71\x05\x01\xbb\x0bwww.example"),
    # a third-party server: only a name verified here replaces the address
    (socks5.NO_AUTH, False, b"\x05\x01\x00\x01\xcb\x00\x71\x05\x01\xbb"),
    (socks5.NO_AUTH, True, b"\x05\x01\x00\x03\x0bwww.example\x01\xbb"),
])
def test_socks5_claim_goes_with_the_address_only_to_a_server_that_judges_it(method, verified, request_sent):
    seen = {}

    def script(conn):
        assert recv_n(conn, 5) == b"\x05\x03\x00\x8a\x8b"
        send(conn, bytes([5, method]))
        seen["request"] = recv_n(conn, len(request_sent))
        send(conn, b"\x05\x00\x00\x01" + bytes(6))
        gevent.sleep(0.05)
        conn.close()

    port, g = serve_script(script)
    d = make_dialer(parse_proxy_url(f"socks5://127.0.0.1:{port}"), 2, 2)
    s = d._wait(d.target_addrs(None), d.handshake(Endpoint("203.0.113.5", 443), None, Claim("www.example", verified)))
    s.close()
    g.join()
    assert seen["request"] == request_sent
    assert d.names is (method == socks5.NAMED)


def test_socks5_a_pipelined_claim_waits_until_the_member_said_named():
    """The first request goes after the method reply; once the member chose NAMED, named requests are pipelined."""
    seen: list = []
    port, g = _socks5_server(socks5.NAMED, 2, seen)
    d = make_dialer(parse_proxy_url(f"socks5://127.0.0.1:{port}"), 2, 2)
    for _ in range(2):
        d._wait(d.target_addrs(None), d.handshake(Endpoint("203.0.113.5", 443), None, Claim("a.example", False))).close()
    g.join(5)
    assert [bool(early) for _, early in seen] == [False, True]
    assert seen[1][1].startswith(b"\x05\x8b\x00\x01")
