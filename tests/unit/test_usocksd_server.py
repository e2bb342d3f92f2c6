"""The usocksd handler on loopback: replies, codes, auth, limits and log lines, with a fake resolver."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import threading
import time

import gevent
import pytest

from tests.usocksd_fixtures import recv_exact
from transocks.core import logs, nio
from transocks.core.names import network
from transocks.core.netutil import Endpoint
from transocks.usocksd import credentials as cr
from transocks.usocksd import protocol as p
from transocks.usocksd.acl import ClientFilter, DestPolicy, dest_rule
from transocks.usocksd.credentials import Credentials, hash_password
from transocks.usocksd.egress import EgressPool
from transocks.usocksd.loopguard import OwnAddresses
from transocks.usocksd.outbound import Outbound
from transocks.usocksd.server import Limits, SocksHandler


class EchoServer:
    """Says which (ip, port) it saw, then echoes until EOF."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket, peer: tuple) -> None:
        with conn:
            try:
                conn.sendall(f"{peer[0]} {peer[1]}\n".encode())
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


class FakeResolver:
    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records

    def __call__(self, name: str, port: int) -> list:
        if name == "slow.test":
            gevent.sleep(30)
        if name not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ipaddress.ip_address(a) for a in self.records[name]]


class Harness:
    """Runs a SocksHandler behind a loopback listener in its own thread and gevent hub."""

    def __init__(self, handler: SocksHandler) -> None:
        self.handler = handler
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        jobs = []

        def accept_loop() -> None:
            while not self.stop.is_set():
                try:
                    with gevent.Timeout(0.05):
                        nio.wait(self.lsock, 1)
                except gevent.Timeout:
                    continue
                try:
                    conn, peer = self.lsock.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                jobs.append(gevent.spawn(self.handler, conn, peer))

        gevent.spawn(accept_loop).join()
        gevent.joinall(jobs, timeout=5)

    def connect(self, source: str = "127.0.0.1") -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5, source_address=(source, 0))
        return sock

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.lsock.close()


@pytest.fixture
def access_log():
    """Every access-log record's fields, in order."""
    records: list[dict] = []
    logger = logging.getLogger(logs.ACCESS_LOGGER)
    saved = logger.disabled
    logger.disabled = False  # the handler builds the fields only when the log is on
    logs.capture_access(lambda fields: records.append(dict(fields)))
    yield records
    logs.capture_access(None)
    logger.disabled = saved


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def make_server(monkeypatch):
    monkeypatch.setattr(cr, "SCRYPT_LN", 4)
    started: list[Harness] = []

    def make(allow=("127.0.0.0/8",), deny=(), policy="allow", users=None, socks4=True, egress=(),
             allow_from=("127.0.0.0/8",), negotiation_timeout=2.0, connect_timeout=1.0, records=None,
             mismatch="address") -> Harness:
        # allow: the echo servers are on loopback, which usocksd refuses unless a rule names it.
        creds = Credentials({u: hash_password(pw) for u, pw in users.items()}) if users else None
        resolver = FakeResolver(records or {"good.test": ["127.0.0.1"], "evil.test": ["10.1.2.3"],
                                            "mixed.test": ["127.0.0.1", "10.9.9.9"]})
        outbound = Outbound(DestPolicy([dest_rule(r) for r in allow], [dest_rule(r) for r in deny], policy == "allow"),
                            EgressPool([ipaddress.ip_address(a) for a in egress]), connect_timeout, resolver)
        handler = SocksHandler(ClientFilter([network(n) for n in allow_from]), outbound, creds, socks4,
                               Limits(negotiation_timeout, 0.0, 60.0), refuse_mismatch=mismatch == "refuse")
        h = Harness(handler)
        started.append(h)
        return h

    yield make
    for h in started:
        h.close()


def readline(sock: socket.socket) -> str:
    """One line, read byte by byte so nothing behind it is buffered away."""
    buf = b""
    while not buf.endswith(b"\n"):
        buf += recv_exact(sock, 1)
    return buf.decode()


def at_eof(sock: socket.socket, within: float = 3.0) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def socks5_request(host: str, port: int, cmd: int = 1) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
        addr = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
    except ValueError:
        raw = host.encode()
        addr = b"\x03" + bytes([len(raw)]) + raw
    return bytes([5, cmd, 0]) + addr + struct.pack("!H", port)


def socks5(h: Harness, host: str, port: int, cmd: int = 1, auth: tuple[str, str] | None = None,
           source: str = "127.0.0.1") -> tuple[socket.socket, int, tuple[str, int]]:
    """Greeting (+auth) and request; returns (socket, REP, bound address)."""
    s = h.connect(source)
    s.sendall(b"\x05\x01" + (b"\x02" if auth else b"\x00"))
    assert recv_exact(s, 2) == (b"\x05\x02" if auth else b"\x05\x00")
    if auth:
        u, pw = auth[0].encode(), auth[1].encode()
        s.sendall(b"\x01" + bytes([len(u)]) + u + bytes([len(pw)]) + pw)
        assert recv_exact(s, 2) == b"\x01\x00"
    s.sendall(socks5_request(host, port, cmd))
    ver, rep, _, atyp = recv_exact(s, 4)
    assert ver == 5
    if atyp == 1:
        bound = socket.inet_ntoa(recv_exact(s, 4))
    else:
        bound = socket.inet_ntop(socket.AF_INET6, recv_exact(s, 16))
    (bport,) = struct.unpack("!H", recv_exact(s, 2))
    return s, rep, (bound, bport)


def wait_records(records: list, n: int, timeout: float = 5.0) -> list:
    deadline = time.monotonic() + timeout
    while len(records) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(records) >= n, records
    return records


def test_connect_replies_with_the_real_bound_address_and_relays(make_server, echo, access_log):
    h = make_server(egress=["127.0.0.2", "127.0.0.3"])
    s, rep, bound = socks5(h, "127.0.0.1", echo.port)
    assert rep == 0
    seen = readline(s).split()
    assert (seen[0], int(seen[1])) == bound  # what the destination saw is what we were told
    assert bound[0] in ("127.0.0.2", "127.0.0.3")
    s.sendall(b"ping")
    assert recv_exact(s, 4) == b"ping"
    s.close()
    (line,) = wait_records(access_log, 1)
    assert list(line) == ["id", "client", "dest", "upstream", "sent", "received", "duration", "outcome"]
    assert line["dest"] == f"127.0.0.1:{echo.port}" and line["upstream"] == f"{bound[0]}:{bound[1]}"
    assert line["outcome"] == "ok" and line["sent"] == 4


def test_same_client_same_egress(make_server, echo):
    h = make_server(egress=["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    for source in ("127.0.0.1", "127.0.0.5", "127.0.0.6"):
        seen = set()
        for _ in range(4):
            s, _, bound = socks5(h, "127.0.0.1", echo.port, source=source)
            seen.add(bound[0])
            s.close()
        assert len(seen) == 1, (source, seen)


def test_pipelined_greeting_request_and_data(make_server, echo, access_log):
    """Bytes sent behind the request, before the reply, reach the destination first and are counted."""
    h = make_server()
    s = h.connect()
    s.sendall(b"\x05\x01\x00" + socks5_request("good.test", echo.port) + b"early bytes")
    assert recv_exact(s, 2) == b"\x05\x00"
    assert recv_exact(s, 10)[:2] == b"\x05\x00"
    readline(s)
    assert recv_exact(s, 11) == b"early bytes"
    s.sendall(b"later")
    assert recv_exact(s, 5) == b"later"
    s.close()
    (line,) = wait_records(access_log, 1)
    assert line["outcome"] == "ok" and line["sent"] == 16


@pytest.mark.parametrize("host, port_of, code, outcome, words", [
    ("127.0.0.1", "closed", p.CONNECTION_REFUSED, "dest_refused", "Connection refused"),
    ("evil.test", "echo", p.NOT_ALLOWED, "not_allowed", "evil.test resolves to 10.1.2.3"),
    ("mixed.test", "echo", p.NOT_ALLOWED, "not_allowed", "mixed.test resolves to 10.9.9.9"),
    ("10.0.0.1", "echo", p.NOT_ALLOWED, "not_allowed", "matches deny_dest 10.0.0.0/8"),
    ("0x0a.1", "echo", p.NOT_ALLOWED, "not_allowed", "matches deny_dest 10.0.0.0/8"),
    ("::ffff:10.0.0.1", "echo", p.NOT_ALLOWED, "not_allowed", "matches deny_dest 10.0.0.0/8"),
    ("Blocked.TEST.", "echo", p.NOT_ALLOWED, "not_allowed", "matches deny_dest .blocked.test"),
    ("unknown.test", "echo", p.GENERAL_FAILURE, "dest_unreachable", "cannot resolve unknown.test"),
    ("slow.test", "echo", p.GENERAL_FAILURE, "dest_unreachable", "resolving slow.test timed out after 1s"),
    ("bad..name", "echo", p.GENERAL_FAILURE, "protocol_error", "not a valid"),
    ("0.0.0.0", "echo", p.NOT_ALLOWED, "not_allowed", "unspecified"),
    ("127.0.0.1", "zero", p.GENERAL_FAILURE, "protocol_error", "port 0"),
])
def test_failure_reply_codes(make_server, echo, access_log, host, port_of, code, outcome, words):
    h = make_server(deny=["10.0.0.0/8", ".blocked.test"])
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    port = {"echo": echo.port, "closed": closed_port, "zero": 0}[port_of]
    s, rep, bound = socks5(h, host, port)
    assert rep == code and bound == ("0.0.0.0", 0)
    assert at_eof(s)
    s.close()
    (line,) = wait_records(access_log, 1)
    assert line["outcome"] == outcome and words in line["reason"], line
    assert f"reply {code:02x}" in line["reason"]
    assert echo.accepted == 0


def test_connect_timeout_is_ttl_expired(make_server, access_log):
    full = socket.create_server(("127.0.0.1", 0), backlog=0)  # SYNs beyond the queue are dropped
    port = full.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            fillers.append(c)
        time.sleep(0.2)
        h = make_server(connect_timeout=0.5)
        start = time.monotonic()
        s, rep, _ = socks5(h, "127.0.0.1", port)
        assert rep == p.TTL_EXPIRED
        assert 0.4 < time.monotonic() - start < 3
        s.close()
        (line,) = wait_records(access_log, 1)
        assert "timed out after 0.5s" in line["reason"] and line["outcome"] == "dest_unreachable"
    finally:
        for c in fillers:
            c.close()
        full.close()


@pytest.mark.parametrize("cmd", [p.CMD_BIND, p.CMD_UDP_ASSOCIATE, 9])
def test_other_commands_not_supported(make_server, echo, access_log, cmd):
    h = make_server()
    s, rep, _ = socks5(h, "127.0.0.1", echo.port, cmd=cmd)
    assert rep == p.COMMAND_NOT_SUPPORTED
    assert at_eof(s)
    (line,) = wait_records(access_log, 1)
    assert "not supported" in line["reason"] and line["outcome"] == "protocol_error"


def test_unknown_address_type(make_server, access_log):
    h = make_server()
    s = h.connect()
    s.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x09" + bytes(6))
    assert recv_exact(s, 2) == b"\x05\x00"
    assert recv_exact(s, 10) == b"\x05\x08\x00\x01" + bytes(6)
    assert at_eof(s)


def test_user_password(make_server, echo, access_log):
    h = make_server(users={"alice": "wonder"})
    s, rep, _ = socks5(h, "127.0.0.1", echo.port, auth=("alice", "wonder"))
    assert rep == 0
    readline(s)
    s.close()
    wait_records(access_log, 1)  # the tunnel's line is written when its relay ends: before the refusals' lines
    s = h.connect()
    s.sendall(b"\x05\x02\x00\x02\x01\x05alice\x05wrong")
    assert recv_exact(s, 2) == b"\x05\x02"
    assert recv_exact(s, 2) == b"\x01\x01"  # RFC 1929 failure, then close
    assert at_eof(s)
    s = h.connect()
    s.sendall(b"\x05\x01\x00")  # no user/password offered
    assert recv_exact(s, 2) == b"\x05\xff"
    assert at_eof(s)
    s = h.connect()
    s.sendall(struct.pack("!BBH4s", 4, 1, echo.port, socket.inet_aton("127.0.0.1")) + b"alice\0")
    assert recv_exact(s, 8)[:2] == b"\x00\x5b"  # SOCKS4 has no password
    lines = wait_records(access_log, 4)
    assert lines[0]["user"] == "alice" and list(lines[0])[:3] == ["id", "client", "user"]
    assert [r["outcome"] for r in lines] == ["ok", "auth_failed", "auth_failed", "auth_failed"]
    assert "wrong user name or password for 'alice'" in lines[1]["reason"]


def test_socks4_and_4a(make_server, echo):
    h = make_server()
    s = h.connect()
    s.sendall(struct.pack("!BBH4s", 4, 1, echo.port, socket.inet_aton("127.0.0.1")) + b"bob\0")
    vn, cd, port, ip = struct.unpack("!BBH4s", recv_exact(s, 8))
    assert (vn, cd) == (0, 0x5A)
    assert readline(s).split() == [socket.inet_ntoa(ip), str(port)]
    s.close()
    s = h.connect()
    s.sendall(struct.pack("!BBH4s", 4, 1, echo.port, b"\0\0\0\x01") + b"\0good.test\0")
    assert recv_exact(s, 8)[:2] == b"\x00\x5a"
    s.close()
    s = h.connect()
    s.sendall(struct.pack("!BBH4s", 4, 1, echo.port, b"\0\0\0\x01") + b"\0evil.test\0")
    assert recv_exact(s, 8) == b"\x00\x5b" + bytes(6)
    assert at_eof(s)


@pytest.mark.parametrize("data, words", [
    (b"GET / HTTP/1.1\r\n\r\n", "not a SOCKS request (first byte 0x47)"),
    (b"\x05\x00", "offers no methods"),
    (b"\x05\x01\x00\x06\x01\x00\x01" + bytes(6), "socks5 request version 0x06"),
    (struct.pack("!BBH4s", 4, 1, 80, b"\0\0\0\x01") + b"u" * 400, "user id longer than 255 bytes"),
    (b"\x05\x01", "client closed during negotiation"),
    (b"\x05", "negotiation not finished within 0.5s"),
])
def test_malformed_and_slow_clients_are_closed_with_a_log_line(make_server, access_log, data, words):
    h = make_server(negotiation_timeout=0.5)
    s = h.connect()
    s.sendall(data)
    if words.startswith("client closed"):
        s.shutdown(socket.SHUT_WR)
    s.settimeout(3)
    received = b""
    try:
        while chunk := s.recv(100):
            received += chunk
    except ConnectionResetError:
        pass
    assert received in (b"", b"\x05\x00")
    (line,) = wait_records(access_log, 1)
    assert line["outcome"] == "protocol_error" and words in line["reason"], line


def test_socks4_can_be_turned_off(make_server, echo, access_log):
    h = make_server(socks4=False)
    s = h.connect()
    s.sendall(struct.pack("!BBH4s", 4, 1, echo.port, socket.inet_aton("127.0.0.1")) + b"\0")
    assert at_eof(s)
    (line,) = wait_records(access_log, 1)
    assert "socks4 is off" in line["reason"]


def test_clients_outside_allow_from_are_closed(make_server, echo, access_log):
    h = make_server(allow_from=["127.0.0.2/32"])
    s = h.connect("127.0.0.1")
    s.sendall(b"\x05\x01\x00")
    assert at_eof(s)
    (line,) = wait_records(access_log, 1)
    assert line["outcome"] == "not_allowed" and "not in allow_from" in line["reason"]
    s, rep, _ = socks5(h, "127.0.0.1", echo.port, source="127.0.0.2")
    assert rep == 0


def test_no_descriptor_leaks(make_server, echo, access_log):
    h = make_server(deny=["10.0.0.0/8"], negotiation_timeout=0.3)
    s, _, _ = socks5(h, "127.0.0.1", echo.port)  # the relay's lazily made pipe pool exists from now on
    s.sendall(b"x" * 100_000)
    readline(s)
    recv_exact(s, 100_000)
    s.close()
    wait_records(access_log, 1)
    baseline = len(os.listdir("/proc/self/fd"))
    for host in ("127.0.0.1", "evil.test", "unknown.test", "10.1.1.1"):
        s, _, _ = socks5(h, host, echo.port)
        s.close()
    for data in (b"\x05", b"\x47\x45\x54", struct.pack("!BBH4s", 4, 1, 80, b"\0\0\0\x01") + b"u" * 300):
        s = h.connect()
        s.sendall(data)
        at_eof(s)
        s.close()
    wait_records(access_log, 8)
    deadline = time.monotonic() + 5
    while len(os.listdir("/proc/self/fd")) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(os.listdir("/proc/self/fd")) <= baseline


def test_own_listen_address_is_refused_as_a_destination(make_server, echo, access_log):
    """A request to usocksd itself (by address or by a name resolving to it) gets 02 and
    outcome=loop; nothing is dialled, so pipelined requests cannot chain through us."""
    h = make_server(records={"self.test": ["127.0.0.1"], "good.test": ["127.0.0.1"]})
    h.handler.outbound.own = OwnAddresses([Endpoint("127.0.0.1", h.port)])
    s = h.connect()
    hop = b"\x05\x01\x00" + socks5_request("127.0.0.1", h.port)
    s.sendall(hop * 5)  # the chained-hops attack: each hop's request already sent behind the last
    assert recv_exact(s, 2) == b"\x05\x00"
    assert recv_exact(s, 10)[:2] == b"\x05\x02"
    assert at_eof(s)
    s.close()
    s, rep, _ = socks5(h, "self.test", h.port)
    assert rep == 2
    s.close()
    s, rep, _ = socks5(h, "good.test", echo.port)  # another port of the same host is fine
    assert rep == 0
    s.close()
    lines = wait_records(access_log, 3)
    assert [r["outcome"] for r in lines[:2]] == ["loop", "loop"]
    assert lines[0]["reason"].startswith(f"127.0.0.1:{h.port} is this server's listen address (loop)")
    assert "self.test resolves to it" in lines[1]["reason"]


# --- named requests (CMD_CONNECT_NAMED after the NAMED method) ------------------------


def named(h: Harness, address: str, port: int, name: str, greeting: bytes = b"\x05\x02\x00\x8b",
          method: int = 0x8B) -> tuple[socket.socket, int]:
    """NAMED greeting and a named CONNECT; returns (socket, REP)."""
    s = h.connect()
    raw = name.encode()
    s.sendall(greeting + socks5_request(address, port, cmd=0x8B) + bytes([len(raw)]) + raw)
    assert recv_exact(s, 2) == bytes([5, method])
    ver, rep, _, atyp = recv_exact(s, 4)
    assert ver == 5
    recv_exact(s, (4 if atyp == 1 else 16) + 2)
    return s, rep


def test_a_named_request_goes_to_its_address_with_the_name_checked(make_server, echo, access_log):
    h = make_server()
    s, rep = named(h, "127.0.0.1", echo.port, "good.test")
    assert rep == 0
    readline(s)
    s.close()
    (line,) = wait_records(access_log, 1)
    assert list(line)[:5] == ["id", "client", "dest", "host", "name_match"]
    assert line["dest"] == f"127.0.0.1:{echo.port}" and line["host"] == "good.test" and line["name_match"] == "yes"


def test_a_matching_name_meets_the_name_rules(make_server, echo, access_log):
    h = make_server(deny=["good.test"])
    s, rep = named(h, "127.0.0.1", echo.port, "good.test")
    assert rep == p.NOT_ALLOWED and at_eof(s)
    # The address is loopback: a name rule alone does not lift the safety default, a subnet rule does.
    h2 = make_server(allow=["good.test"], policy="deny")
    s, rep = named(h2, "127.0.0.1", echo.port, "good.test")
    assert rep == p.NOT_ALLOWED and at_eof(s)
    h3 = make_server(allow=["good.test", "127.0.0.0/8"], policy="deny")
    s, rep = named(h3, "127.0.0.1", echo.port, "good.test")
    assert rep == 0
    readline(s)  # the echo server has accepted
    s.close()
    assert echo.accepted == 1


def test_a_mismatched_name_is_judged_by_the_address_alone(make_server, echo, access_log):
    """evil.test resolves elsewhere: its deny rule does not apply, the address is reached, never evil.test's."""
    h = make_server(deny=["evil.test"])
    s, rep = named(h, "127.0.0.1", echo.port, "evil.test")
    assert rep == 0
    readline(s)
    s.close()
    (line,) = wait_records(access_log, 1)
    assert line["host"] == "evil.test" and line["name_match"] == "no" and line["dest"] == f"127.0.0.1:{echo.port}"
    # A name allowed by name but claimed for another address gets no allowance from it.
    h2 = make_server(allow=["good.test"], policy="deny", records={"good.test": ["127.0.0.9"]})
    s, rep = named(h2, "127.0.0.1", echo.port, "good.test")
    assert rep == p.NOT_ALLOWED and at_eof(s)
    assert echo.accepted == 1


def test_dest_name_mismatch_refuse(make_server, echo, access_log):
    h = make_server(mismatch="refuse")
    s, rep = named(h, "127.0.0.1", echo.port, "evil.test")
    assert rep == p.NOT_ALLOWED and at_eof(s)
    s, rep = named(h, "127.0.0.1", echo.port, "nowhere.test")  # does not resolve at all
    assert rep == p.NOT_ALLOWED and at_eof(s)
    assert echo.accepted == 0
    lines = wait_records(access_log, 2)
    assert all(line["outcome"] == "not_allowed" and line["name_match"] == "no" for line in lines)


def test_a_named_request_without_the_named_method_is_not_supported(make_server, echo, access_log):
    h = make_server()
    s, rep = named(h, "127.0.0.1", echo.port, "good.test", greeting=b"\x05\x02\x00\x8a", method=0x8A)
    assert rep == p.COMMAND_NOT_SUPPORTED and at_eof(s)
    assert echo.accepted == 0


def test_named_with_user_password(make_server, echo, access_log):
    h = make_server(users={"alice": "secret"})
    s = h.connect()
    s.sendall(b"\x05\x02\x02\x8c")
    assert recv_exact(s, 2) == b"\x05\x8c"
    s.sendall(b"\x01\x05alice\x06secret")
    assert recv_exact(s, 2) == b"\x01\x00"
    s.sendall(socks5_request("127.0.0.1", echo.port, cmd=0x8B) + b"\x09good.test")
    assert recv_exact(s, 10)[:2] == b"\x05\x00"
    readline(s)
    s.close()
    (line,) = wait_records(access_log, 1)
    assert line["user"] == "alice" and line["host"] == "good.test" and line["name_match"] == "yes"


@pytest.mark.parametrize("body, code", [
    (b"\x03\x09good.test\x00\x50\x00", p.ADDRESS_TYPE_NOT_SUPPORTED),  # a name where the address goes
    (b"\x01\x7f\x00\x00\x01\x00\x50\x05a b c", p.GENERAL_FAILURE),  # not a host name
])
def test_bad_named_requests(make_server, echo, access_log, body, code):
    h = make_server()
    s = h.connect()
    s.sendall(b"\x05\x02\x00\x8b" + b"\x05\x8b\x00" + body)
    assert recv_exact(s, 2) == b"\x05\x8b"
    assert recv_exact(s, 10)[:2] == bytes([5, code])
    assert at_eof(s)
    assert echo.accepted == 0


def wait_outcome(h: Harness, name: str, n: int = 1, timeout: float = 5.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while h.handler.counters.outcomes.get(name, 0) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return dict(h.handler.counters.outcomes)


@pytest.mark.parametrize("users, steps", [
    (None, [(b"\x05\x01\x00", b"\x05\x00")]),
    (None, [(b"\x05\x02\x00\x8a", b"\x05\x8a")]),  # transocks' greeting with pipelining on offer
    ({"alice": "wonder"}, [(b"\x05\x01\x02", b"\x05\x02")]),
    ({"alice": "wonder"}, [(b"\x05\x01\x02", b"\x05\x02"), (b"\x01\x05alice\x06wonder", b"\x01\x00")]),
], ids=["no-auth", "pipelined", "before-login", "after-login"])
def test_a_health_check_is_no_request_counted_and_quiet(make_server, access_log, caplog, users, steps):
    """Greeting, method reply (and a login), close: a health check, not a protocol error."""
    h = make_server(users=users)
    caplog.set_level(logging.INFO, logger="usocksd")
    s = h.connect()
    for sent, answer in steps:
        s.sendall(sent)
        assert recv_exact(s, len(answer)) == answer
    s.close()
    outcomes = wait_outcome(h, "no_request")
    assert outcomes == {"no_request": 1}
    assert access_log == [] and caplog.records == []
    caplog.set_level(logging.DEBUG, logger="usocksd")  # at debug level it has its access-log line
    s = h.connect()
    s.sendall(steps[0][0])
    recv_exact(s, 2)
    s.close()
    (line,) = wait_records(access_log, 1)
    assert line["outcome"] == "no_request" and "before" in line["reason"], line
    assert wait_outcome(h, "no_request", 2) == {"no_request": 2}
    s = h.connect()  # the first byte of the next message, then the end: a protocol error still
    for sent, answer in steps:
        s.sendall(sent)
        assert recv_exact(s, len(answer)) == answer
    s.sendall(b"\x01" if steps[-1][1] == b"\x05\x02" else b"\x05")  # a login's or a request's first byte
    s.shutdown(socket.SHUT_WR)
    line = wait_records(access_log, 2)[1]
    assert line["outcome"] == "protocol_error" and "client closed during negotiation" in line["reason"], line
