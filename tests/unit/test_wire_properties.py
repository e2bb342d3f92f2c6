"""Property tests for every parser of untrusted bytes: SOCKS5, SOCKS4/4a and HTTP CONNECT responses
(transocks' dialers) and SOCKS requests (usocksd).

Arbitrary bytes never raise anything but the module's own error (ProtocolError, or usocksd's
Malformed/Refused) or EOFError for input that ends too early; what the encoders write, the parsers
read back unchanged.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import socket

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from transocks.core import outcome
from transocks.core.netutil import Endpoint
from transocks.redirector.upstream import http_connect as http_dialer
from transocks.redirector.upstream import make_dialer
from transocks.redirector.upstream.base import ProxyURL
from transocks.usocksd import credentials as cr
from transocks.usocksd import protocol as p
from transocks.usocksd.credentials import Credentials
from transocks.usocksd.logins import LoginGate
from transocks.usocksd.server import Conversation
from transocks.wire import ProtocolError, http, socks4, socks5

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOCKETS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
USOCKSD_ERRORS = (p.Malformed, p.Refused, EOFError)
NEGOTIATION_ENDS = (*USOCKSD_ERRORS, p.NoRequest)  # a close after the method negotiation: a health check
WIRE_ERRORS = (ProtocolError, EOFError)


def reader(data: bytes):
    """read(n) over data: exactly n bytes, or EOFError like nio.recv_exact at EOF."""
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise EOFError(f"{len(data) - pos} of {n} bytes")
        out = data[pos:pos + n]
        pos += n
        return out

    read.rest = lambda: data[pos:]  # type: ignore[attr-defined]
    return read


def ends_as(errors, func, *args):
    """Run a parser; it returns or raises one of errors, nothing else."""
    try:
        return func(*args)
    except errors:
        return None


# --- arbitrary bytes ------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=600))
def test_wire_parsers_raise_only_protocol_error_or_eof(data):
    ends_as(WIRE_ERRORS, socks5.read_method, reader(data))
    ends_as(WIRE_ERRORS, socks5.read_reply, reader(data))
    for atyp in (socks5.ATYP_IPV4, socks5.ATYP_DOMAIN, socks5.ATYP_IPV6, data[0] if data else 0):
        ends_as(WIRE_ERRORS, socks5.read_address, reader(data), atyp)
    ends_as(WIRE_ERRORS, socks4.read_reply, reader(data))


@FUZZ
@given(st.binary(max_size=300), st.binary(max_size=40))
@example(b"\x05\x00\x00\x03\x03abc\x00\x50", b"tunnel")
def test_socks5_parse_reply_agrees_with_read_reply(data, rest):
    """The one-receive reply parser: on every prefix it waits (None), or gives what the
    reader-based parser gives and the length that parser consumed; it may refuse a bad
    version or address type before the reply is complete, never a reply the other takes."""
    whole = data + rest
    read = reader(whole)
    try:
        rep, bound = socks5.read_reply(read)
        expected: object = (rep, bound, len(whole) - len(read.rest()))
    except WIRE_ERRORS as exc:
        expected = exc
    for cut in range(len(whole) + 1):
        try:
            got = socks5.parse_reply(whole[:cut])
        except ProtocolError:
            assert isinstance(expected, BaseException)
            return
        if got is not None:
            assert got == expected
            return
    assert isinstance(expected, EOFError)


@FUZZ
@given(st.binary(max_size=600))
@example(b"HTTP/1.1 \xb2\xb2\xb2 OK\r\n\r\n")
@example("HTTP/1.1 \u0662\u0660\u0660 OK\r\n\r\n".encode())
def test_http_status_parser_raises_only_protocol_error(data):
    result = ends_as(ProtocolError, http.parse_status, data)
    if result is not None:
        code, reason = result
        assert 0 <= code <= 999 and "\r" not in reason and "\n" not in reason


status_like = st.builds(
    lambda version, code, sep, reason: b"HTTP/1." + version + b" " + code + sep + reason + b"\r\n\r\n",
    st.sampled_from([b"0", b"1", b"9", b"\xb9", b"x"]),
    st.one_of(st.binary(min_size=3, max_size=3), st.text("0123456789\u00b2\u0662\uff10", min_size=1, max_size=4)
              .map(lambda t: t.encode())),
    st.sampled_from([b" ", b"", b"  ", b"\t"]),
    st.binary(max_size=40),
)


@FUZZ
@given(status_like)
def test_http_status_lines_near_valid_ones(data):
    result = ends_as(ProtocolError, http.parse_status, data)
    if result is not None:
        line = data.split(b"\r\n", 1)[0]
        assert line[9:12].isdigit() and line[9:12].isascii() and int(line[9:12]) == result[0]


@FUZZ
@given(st.binary(max_size=600))
def test_usocksd_request_parsers_raise_only_their_errors(data):
    ends_as(USOCKSD_ERRORS, p.read_methods, reader(data))
    ends_as(USOCKSD_ERRORS, p.read_userpass, reader(data))
    ends_as(USOCKSD_ERRORS, p.read_socks5_request, reader(data))
    ends_as(USOCKSD_ERRORS, p.read_socks4_request, reader(data))


def socketpair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def _cheap_hash(password: bytes) -> str:
    salt = b"saltsaltsalt"
    digest = hashlib.pbkdf2_hmac("sha256", password, salt, 1000, 32)
    return f"$pbkdf2-sha256$1000${cr._b64(salt)}${cr._b64(digest)}"


CREDENTIALS = Credentials({"alice": _cheap_hash(b"wonder")}, verified=cr.VerifiedLogins(16))
GATE = LoginGate(0, 0.0)

negotiations = st.one_of(
    st.binary(max_size=700),
    st.builds(lambda v, rest: bytes([v]) + rest, st.sampled_from([4, 5]), st.binary(max_size=600)),
    # a well-formed greeting and login, then anything
    st.builds(lambda rest: b"\x05\x01\x02\x01\x05alice\x06wonder" + rest, st.binary(max_size=300)),
    st.builds(lambda methods, rest: b"\x05" + bytes([len(methods)]) + methods + rest,
              st.binary(min_size=1, max_size=4), st.binary(max_size=300)),
)


@SOCKETS
@given(negotiations, st.booleans())
def test_usocksd_negotiation_of_arbitrary_bytes_ends_as_an_outcome(data, with_auth):
    """The whole negotiation, as the server runs it on a socket: greeting, auth, request."""
    server, client = socketpair()
    with server, client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        conv = Conversation(server, CREDENTIALS if with_auth else None, True, GATE, ipaddress.ip_address("127.0.0.1"))
        try:
            request = conv.negotiate()
        except NEGOTIATION_ENDS:
            return
        assert request.version in (4, 5) and 0 <= request.port <= 65535


def run_handshake(gen, chunks: list[bytes]):
    """Feed a dialer's handshake generator the proxy's bytes as they might arrive, then EOF;
    returns ("open", tunnel bytes and those it left unread, sent) or ("failed", exception, sent)."""
    sent = []
    left = [*chunks, b""]
    try:
        sent.append(next(gen))
        while left:
            sent.append(gen.send(left.pop(0)))
        return "stuck", None, sent  # it asked for more after EOF: never acceptable
    except StopIteration as done:
        return "open", done.value + b"".join(left), sent  # what it did not read stays for the relay
    except (outcome.Failure, EOFError) as exc:
        return "failed", exc, sent


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


HTTP_PIECES = st.lists(st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n", b"HTTP/1.1 \xb2\xb2\xb2 OK\r\n\r\n",
                     b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n", b"\r\n\r\n", b"HTTP/1.1 407 Auth\r\n\r\n"]),
), max_size=12).map(b"".join)
SOCKS_PIECES = st.lists(st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"\x05\x00", b"\x05\x02", b"\x05\x80", b"\x05\xff", b"\x01\x00", b"\x01\x01",
                     b"\x05\x00\x00\x01" + bytes(6), b"\x05\x05\x00\x01" + bytes(6), b"\x05\x00\x00\x03\x03abc\x00\x50",
                     b"\x00\x5a" + bytes(6), b"\x00\x5b" + bytes(6)]),
), max_size=8).map(b"".join)
DIALERS = {
    "http": lambda: http_dialer.HttpConnectDialer(ProxyURL("http", "127.0.0.1", 8080)),
    "http-auth": lambda: http_dialer.HttpConnectDialer(ProxyURL("http", "127.0.0.1", 8080, "u", "p")),
    "socks5": lambda: make_dialer(ProxyURL("socks5", "127.0.0.1", 1080), 1, 1),
    "socks5-pipelined": lambda: make_dialer(ProxyURL("socks5", "127.0.0.1", 1080), 1, 1, socks5_pipelining=True),
    "socks5-auth": lambda: make_dialer(ProxyURL("socks5", "127.0.0.1", 1080, "u", "p"), 1, 1),
    "socks4a": lambda: make_dialer(ProxyURL("socks4a", "127.0.0.1", 1080), 1, 1),
}
SPEAKS_ONCE = {"http", "http-auth", "socks4a", "socks5-pipelined"}  # the others wait for an answer, then speak again
ANSWER_OUTCOMES = {outcome.PROTOCOL_ERROR, outcome.AUTH_FAILED, outcome.UPSTREAM_REFUSED, outcome.DEST_UNREACHABLE,
                   outcome.DEST_REFUSED}


@FUZZ
@given(st.sampled_from(sorted(DIALERS)), st.one_of(HTTP_PIECES, SOCKS_PIECES),
       st.lists(st.integers(0, 10**6), max_size=8), st.sampled_from(["sni.example", "203.0.113.5"]))
def test_handshakes_of_arbitrary_bytes_end_the_same_however_they_arrive(kind, data, cuts, host):
    """What a proxy answers, interim responses and all, in any chunking: a tunnel whose first
    bytes are the tail of what it sent, or an outcome of its answer or EOF; never more asked
    after EOF, and, where the client says all it has at once, the same ending as when the
    answer arrives in one piece (otherwise bytes ahead of the client's next message are an error)."""
    dest = Endpoint(host, 443)
    whole = run_handshake(DIALERS[kind]().handshake(dest), [data] if data else [])
    pieces = run_handshake(DIALERS[kind]().handshake(dest), split(data, cuts))
    for ending, value, _sent in (whole, pieces):
        assert ending in ("open", "failed")
        if ending == "open":
            assert data.endswith(value)
        else:
            assert isinstance(value, EOFError) or value.outcome in ANSWER_OUTCOMES, value
    if kind in SPEAKS_ONCE:
        assert pieces[0] == whole[0]
        if whole[0] == "open":
            assert pieces[1] == whole[1]
        else:
            assert type(pieces[1]) is type(whole[1])


# --- encode, then parse ---------------------------------------------------------------------------


labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20).filter(
    lambda t: not t.startswith("-") and not t.endswith("-"))
names = st.lists(labels, min_size=1, max_size=5).map(".".join).filter(
    lambda n: not n.split(".")[-1].isdigit() and len(n) <= 253)
ports = st.integers(1, 65535)
ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None)
hosts = st.one_of(ipv4.map(str), ipv6.map(str), names)


def same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


@FUZZ
@given(hosts, ports)
def test_socks5_request_round_trip(host, port):
    read = reader(socks5.connect_request(Endpoint(host, port)))
    request = p.read_socks5_request(read)
    assert (request.version, request.command, request.port) == (5, socks5.CMD_CONNECT, port)
    assert same_host(request.host, host) and read.rest() == b""


@FUZZ
@given(st.integers(0, 255), st.one_of(ipv4.map(str), ipv6.map(str)), st.integers(0, 65535))
def test_socks5_reply_round_trip(code, host, port):
    read = reader(p.socks5_reply(code, Endpoint(host, port)))
    rep, bound = socks5.read_reply(read)
    assert rep == code and same_host(bound.host, host) and bound.port == port and read.rest() == b""


@FUZZ
@given(st.one_of(ipv4.map(str), names), ports,
       st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=60))
def test_socks4_request_round_trip(host, port, userid):
    data = socks4.connect_request(Endpoint(host, port), userid)
    assert data[0] == socks4.VERSION
    read = reader(data[1:])
    request, got_userid = p.read_socks4_request(read)
    assert (request.version, request.command, request.port, got_userid) == (4, socks4.CMD_CONNECT, port, userid)
    assert same_host(request.host, host) and read.rest() == b""


@FUZZ
@given(st.booleans(), ipv4.map(str), st.integers(0, 65535))
def test_socks4_reply_round_trip(granted, host, port):
    assert socks4.read_reply(reader(p.socks4_reply(granted, Endpoint(host, port)))) == (
        socks4.GRANTED if granted else p.SOCKS4_REJECTED)


@FUZZ
@given(st.binary(min_size=1, max_size=255), st.integers(0, 255))
def test_greeting_and_method_selection_round_trip(methods, method):
    data = socks5.greeting(methods)
    assert data[0] == socks5.VERSION and p.read_methods(reader(data[1:])) == methods
    assert socks5.read_method(reader(p.method_selection(method))) == method


printable_utf8 = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=80).filter(
    lambda t: len(t.encode()) <= 255)


@FUZZ
@given(printable_utf8, printable_utf8)
def test_userpass_round_trip(user, password):
    assert p.read_userpass(reader(socks5.userpass_request(user, password))) == (user.encode(), password.encode())


@FUZZ
@given(st.sampled_from("0123456789"), st.integers(100, 999),
       st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=40),
       st.binary(max_size=100).filter(lambda b: b"\r\n\r\n" not in b))
def test_http_status_round_trip(minor, code, reason, headers):
    head = f"HTTP/1.{minor} {code} {reason}".encode("latin-1") + b"\r\n" + headers + b"\r\n\r\n"
    assert http.parse_status(head) == (code, reason)


@pytest.mark.parametrize("code, interim", [(100, True), (102, True), (103, True), (199, True), (101, False),
                                           (200, False), (99, False)])
def test_interim_codes(code, interim):
    assert http.is_interim(code) is interim
