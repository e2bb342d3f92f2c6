"""The destination's name recovered from the first bytes, through real iptables REDIRECT.

Clients in the client namespace (curl, openssl s_client, Python sockets) reach
the inet namespace's servers (openssl s_server with a certificate from a CA this
module makes, the line server on :9000, an echo server, a banner server) through
transocks; names resolve from hosts-file overlays of the client and gw
namespaces, never DNS.  The chain test puts usocksd with a deny_dest name rule
at the edge: with send_domain the name reaches it and the rule holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import termios
import threading
import time

import pytest

from tests import usocksd_fixtures as uf
from tests.lab import services
from tests.lab.banner import BANNER, BannerServer
from tests.lab.names import hosts_overlay
from tests.lab.netns import GW_V4, INET_V4, INET_V6, TEST_PORT
from tests.lab.recorder import RecordingSocks5
from tests.lab.tls import https_get_split, make_certs, start_client, start_s_server
from tests.test_datapath import connect, wait_log, worker_of
from tests.unit.test_sniff import long_head, one_byte_record_hello

pytestmark = pytest.mark.netns

NAMES = {n: [INET_V4, INET_V6] for n in ("allowed.example", "blocked.example", "www.blocked.example",
                                          "victim.example")}
FAMILIES = [("-4", INET_V4), ("-6", INET_V6)]
ECHO_PORT = 7007
BANNER_SNIFFED = 8080  # in the default sniff_ports
BANNER_PLAIN = 2525
SNIFF_ALL = "443,8080,9000,7007"


@pytest.fixture(scope="module")
def names(lab):
    """The test names in both the client's and the gw's hosts files."""
    with hosts_overlay(lab, lab.client, NAMES), hosts_overlay(lab, lab.gw, NAMES):
        yield NAMES


@pytest.fixture(scope="module")
def certs(lab, names):
    """A CA of this module and s_server on :443 of INET_V4 and INET_V6 with a certificate for NAMES."""
    made = make_certs(lab.tempdir("ca"), list(NAMES))
    servers = start_s_server(lab, made)
    yield made
    for svc in servers:
        svc.stop(lab)


@pytest.fixture
def usocksd(lab, names, tmp_path):
    factory = uf.UsocksdFactory(lab, tmp_path)
    try:
        yield factory.start
    finally:
        factory.close()


def curl_https(lab, certs, url: str, family: str) -> tuple[int, str, str]:
    """curl from the client namespace trusting only the test CA: (exit code, http code, stderr)."""
    res = lab.run(lab.client, ["curl", "-sS", family, "--max-time", "20", "--cacert", str(certs.ca),
                               "-o", "/dev/null", "-w", "%{http_code}", url], check=False, timeout=30)
    return res.returncode, res.stdout.strip(), res.stderr


def s_client(lab, certs, connect_to: str, servername: str, family: str) -> tuple[int, str]:
    """openssl s_client verifying against the test CA; sends GET / and returns (rc, output)."""
    res = lab.run(lab.client, ["openssl", "s_client", family, "-quiet", "-ign_eof", "-verify_return_error",
                               "-CAfile", str(certs.ca), "-servername", servername, "-verify_hostname", servername,
                               "-connect", connect_to], input="GET / HTTP/1.0\r\n\r\n", check=False, timeout=30)
    return res.returncode, res.stdout + res.stderr


def access_lines(d, needle: str = "") -> list[str]:
    return [ln for ln in d.log_text().splitlines() if ln.startswith("time=") and needle in ln]


def wait_any_line(d, *needles: str, timeout: float = 5.0) -> str:
    """The first access line with one of `needles`, once there is one."""
    deadline = time.monotonic() + timeout
    while True:
        found = [ln for n in needles for ln in access_lines(d, n)]
        if found or time.monotonic() > deadline:
            assert found, f"none of {needles} in:\n" + "\n".join(access_lines(d))
            return found[0]
        time.sleep(0.05)


def wait_lines(d, needle: str, count: int, timeout: float = 5.0) -> list[str]:
    """The access lines with `needle` once there are `count` of them (a line lands after its relay ends)."""
    deadline = time.monotonic() + timeout
    while len(access_lines(d, needle)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = access_lines(d, needle)
    assert len(lines) == count, "\n".join(access_lines(d))
    return lines


# --- TLS names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, addr", FAMILIES)
def test_tls_name_from_curl_and_openssl(lab, upstreams, daemon, certs, family, addr):
    d = daemon(["--proxy-url", upstreams.dante.url])  # 443 is in the default sniff_ports
    rc, code, err = curl_https(lab, certs, "https://allowed.example/", family)
    assert (rc, code) == (0, "200"), err
    dest = f"[{addr}]:443" if ":" in addr else f"{addr}:443"
    wait_log(d, f"dest={dest} host=allowed.example", "outcome=ok")
    # s_client connects to one name and sends another as SNI: the log shows the SNI.
    rc, out = s_client(lab, certs, "allowed.example:443", "www.blocked.example", family)
    assert rc == 0 and "HTTP/1.0 200 ok" in out, out
    wait_log(d, f"dest={dest} host=www.blocked.example")


@pytest.mark.parametrize("family, addr", FAMILIES)
def test_client_hello_split_across_records_and_segments(lab, upstreams, daemon, certs, family, addr):
    d = daemon(["--proxy-url", upstreams.dante.url])
    # Records of 3, 197 and the rest; TCP segments cut inside a record header, inside the
    # handshake header and mid-body, 50 ms apart: the sniffer must wait for all of them.
    sock = connect(lab, addr, 443)
    response = https_get_split(sock, "blocked.example", certs.ca, record_cuts=[3, 200], segment_cuts=[2, 9, 300])
    sock.close()
    assert response.startswith(b"HTTP/1.0 200 ok"), response[:200]
    wait_log(d, "host=blocked.example", "outcome=ok")


# --- HTTP names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family, addr", FAMILIES)
def test_http_host(lab, upstreams, daemon, names, family, addr):
    d = daemon(["--proxy-url", upstreams.dante.url, "--sniff-ports", SNIFF_ALL])
    res = lab.run(lab.client, ["curl", "-sS", family, "--max-time", "20", f"http://allowed.example:{TEST_PORT}/peer"],
                  check=False, timeout=30)
    assert res.returncode == 0 and res.stdout.strip(), res.stderr
    wait_log(d, "host=allowed.example", "outcome=ok")
    # A request line and Host header split over three segments.
    sock = connect(lab, addr)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for part in (b"GET /peer HT", b"TP/1.1\r\nAccept: */*\r\nHo", b"st: Split.Example:9000\r\n\r\n"):
        sock.sendall(part)
        time.sleep(0.05)
    assert recv_all(sock).startswith(b"HTTP/1.1 200")
    sock.close()  # the access line comes when both directions have ended
    wait_log(d, "host_unverified=split.example")  # recovered whole; not a name of this address (verify_names)


# --- server-first services ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def banner(lab):
    server = BannerServer(lab, lab.inet, [(h, p) for h in (INET_V4, INET_V6) for p in (BANNER_SNIFFED, BANNER_PLAIN)])
    yield server
    server.close()


def banner_exchange(lab, addr: str, port: int, wait: float) -> None:
    """Connect, expect the banner within `wait` seconds without sending anything, then an echo."""
    sock = connect(lab, addr, port)
    sock.settimeout(wait)
    got = b""
    while len(got) < len(BANNER):
        chunk = sock.recv(100)
        assert chunk, f"closed after {got!r}"
        got += chunk
    assert got == BANNER
    sock.settimeout(10)
    sock.sendall(b"EHLO client.example\r\n")
    assert sock.recv(100) == b"EHLO client.example\r\n"
    sock.close()


@pytest.mark.parametrize("family, addr", FAMILIES)
def test_server_first_service(lab, upstreams, daemon, banner, family, addr):
    # A sniff deadline far longer than a banner takes to arrive: a wait that should not
    # happen shows as a client timeout.
    sniff_timeout = 3.0
    d = daemon(["--proxy-url", upstreams.dante.url, "--sniff-timeout", str(sniff_timeout)])
    # Not a sniffed port: the banner comes at once, nothing is read first.
    banner_exchange(lab, addr, BANNER_PLAIN, wait=sniff_timeout - 1)
    # A sniffed port: the first connection waits out the deadline, the banner comes after it ...
    banner_exchange(lab, addr, BANNER_SNIFFED, wait=sniff_timeout + 10)
    dest = f"[{addr}]:{BANNER_SNIFFED}" if ":" in addr else f"{addr}:{BANNER_SNIFFED}"
    wait_log(d, f"client silent for {sniff_timeout:g}s to {dest}")
    # ... and the destination is remembered: no wait again.
    banner_exchange(lab, addr, BANNER_SNIFFED, wait=sniff_timeout - 1)
    banner_exchange(lab, addr, BANNER_SNIFFED, wait=sniff_timeout - 1)
    wait_lines(d, "outcome=ok", 4)
    assert d.log_text().count("client silent") == 1


# --- bytes without a name -----------------------------------------------------------------------


def _hello_with_sni(name: bytes) -> bytes:
    entry = b"\x00" + struct.pack("!H", len(name)) + name
    sni = struct.pack("!HH", 0, len(entry) + 2) + struct.pack("!H", len(entry)) + entry
    body = b"\x03\x03" + b"\x01" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + struct.pack("!H", len(sni)) + sni
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(message)) + message


PAYLOADS = {
    "random": os.urandom(200 * 1024),
    "tls-header-then-junk": b"\x16\x03\x01\x3f\xff" + os.urandom(40 * 1024),
    "hello-too-large-to-read": b"\x16\x03\x01\x40\x00\x01\xff\xff\xff" + os.urandom(40 * 1024),
    "http-line-past-16k": b"GET /" + b"a" * (50 * 1024),
    "http-ip-host": b"GET / HTTP/1.1\r\nHost: 203.0.113.10\r\n\r\n" + os.urandom(1000),
    "http-control-char-host": b"GET / HTTP/1.1\r\nHost: bad\x01name.example\r\n\r\n",
    "sni-ip-literal": _hello_with_sni(b"203.0.113.10") + os.urandom(5000),
    "sni-empty-label": _hello_with_sni(b"bad..name.example"),
    "sni-numeric-tld": _hello_with_sni(b"name.0x1f"),
    "sni-overlong": _hello_with_sni(b"a" * 300),
    "single-byte": b"\x16",
}


def recv_all(sock: socket.socket, timeout: float = 20) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


@pytest.mark.parametrize("family, addr", FAMILIES)
def test_garbage_and_oversized_first_bytes_pass_unchanged(lab, upstreams, daemon, family, addr):
    echo = services.start_echo(lab, ECHO_PORT)
    try:
        d = daemon(["--proxy-url", upstreams.dante.url, "--sniff-ports", SNIFF_ALL, "--sniff-timeout", "2"])
        for label, payload in PAYLOADS.items():
            sock = connect(lab, addr, ECHO_PORT)
            sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
            sender.start()
            got = recv_all(sock)
            sender.join()
            sock.close()
            assert got == payload, f"{label}: {len(got)} bytes back of {len(payload)}"
        wait_lines(d, "outcome=ok", len(PAYLOADS))
        assert not [ln for ln in access_lines(d) if " host=" in ln]
    finally:
        echo.stop(lab)


# --- the whole chain: a name rule at the edge ---------------------------------------------------


@pytest.mark.parametrize("scheme", ["socks5", "socks4a"])
def test_edge_refuses_denied_name_and_serves_another_on_the_same_ip(lab, daemon, certs, usocksd, scheme):
    edge = usocksd(["--deny-dest", ".blocked.example"])
    d = daemon(["--proxy-url", f"{scheme}://{GW_V4}:{edge.port}", "--send-domain", "true"])
    for family, addr in FAMILIES:
        dest = f"[{addr}]:443" if ":" in addr else f"{addr}:443"
        for name in ("blocked.example", "www.blocked.example"):
            rc, code, err = curl_https(lab, certs, f"https://{name}/", family)
            assert rc != 0 and code != "200", (name, family, rc, code, err)
            # host= or host_unverified=: with socks5 the edge judges the name itself, so transocks does
            # not wait for its own lookup, and the edge's refusal may end the connection before it.
            wait_any_line(d, f"dest={dest} host={name} upstream=", f"dest={dest} host_unverified={name} upstream=")
            rc, out = s_client(lab, certs, f"{name}:443", name, family)
            assert rc != 0 and "200 ok" not in out, out
        rc, code, err = curl_https(lab, certs, "https://allowed.example/", family)
        assert (rc, code) == (0, "200"), (family, err)
        rc, out = s_client(lab, certs, "allowed.example:443", "allowed.example", family)
        assert rc == 0 and "HTTP/1.0 200 ok" in out, out
        wait_log(d, f"dest={dest} host=allowed.example")
    # The edge saw names, and refused by name.
    # usocksd (socks5) is sent the name with the address and checks the pair; others get the verified name.
    asked = "host=allowed.example name_match=yes" if scheme == "socks5" else "dest=allowed.example:443"
    edge.wait_log("blocked.example:443 matches deny_dest .blocked.example",
                  "www.blocked.example:443 matches deny_dest .blocked.example", asked)
    assert not [ln for ln in edge.access_lines("blocked.example") if "outcome=ok" in ln]
    refused = access_lines(d, "=blocked.example upstream=") + access_lines(d, "=www.blocked.example upstream=")
    assert len(refused) == 8 and not [ln for ln in refused if "outcome=ok" in ln], "\n".join(refused)
    # The last line (s_client's) may land after wait_log above saw curl's: a line is written at the end.
    served = wait_lines(d, "host=allowed.example", 4, timeout=10)
    assert len([ln for ln in served if "outcome=ok" in ln]) == 4, "\n".join(served)


def test_without_send_domain_the_edge_sees_only_the_address(lab, daemon, certs, usocksd):
    """The problem this solves: by address, the denied name is served."""
    edge = usocksd(["--deny-dest", ".blocked.example"])
    d = daemon(["--proxy-url", f"socks5://{GW_V4}:{edge.port}"])
    rc, code, err = curl_https(lab, certs, "https://blocked.example/", "-4")
    assert (rc, code) == (0, "200"), err
    wait_log(d, "host=blocked.example", "outcome=ok")
    edge.wait_log(f"dest={INET_V4}:443")


# --- what one client cannot do to the others ------------------------------------------------------


def _sent_and_acked(sock: socket.socket, timeout: float = 10.0) -> None:
    """Wait until the peer's kernel has every byte sent on `sock` (nothing left in its send queue)."""
    deadline = time.monotonic() + timeout
    while int.from_bytes(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4), "little"):
        assert time.monotonic() < deadline, "bytes not acknowledged"
        time.sleep(0.01)


@pytest.mark.parametrize("kind", ["http", "tls"])
def test_a_silent_client_cannot_blind_sniffing_for_others(lab, upstreams, daemon, names, tmp_path, kind):
    """One client stays silent to a destination until the sniff deadline: the destination goes on
    the skip list.  The next client's name, already in the socket buffer when the worker accepts, is
    still used: its connection takes the exit its name's route names, as that exit sees it."""
    port = 7081 if kind == "http" else 7443
    first = (b"GET / HTTP/1.1\r\nHost: victim.example\r\n\r\n" if kind == "http"
             else start_client("victim.example")[3])
    recorder = RecordingSocks5(lab, lab.gw, GW_V4, 1190)
    try:
        conf = tmp_path / "t.conf"
        conf.write_text(f"proxy_url = {upstreams.dante.url}\npool = named {recorder.url}\n"
                        "route = domain=victim.example -> named\n")
        # No health checks: the recorder sees only the clients' connections.
        d = daemon(["-c", str(conf), "--sniff-ports", "7081,7443", "--sniff-timeout", "1", "--health-interval", "0"])
        silent = connect(lab, INET_V4, port)
        wait_log(d, f"client silent for 1s to {INET_V4}:{port}")  # when, not what: the recorder decides
        silent.close()
        # The worker is stopped while the victim connects and sends: its bytes are queued when it accepts.
        worker = worker_of(d)
        worker.suspend()
        try:
            victim = connect(lab, INET_V4, port)
            victim.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            victim.sendall(first + b"after")
            _sent_and_acked(victim)
        finally:
            worker.resume()
        victim.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):  # by address it went to dante, and nothing listens there
            recv_all(victim)
        victim.close()
        got = recorder.wait(1)
        assert [(r.host, r.port, r.first) for r in got] == [(INET_V4, port, first + b"after")], got
    finally:
        recorder.close()


def _worker_cpu(worker) -> float:
    t = worker.cpu_times()
    return t.user + t.system


@pytest.mark.parametrize("kind", ["one-byte records", "2,700-line head"])
def test_sniffing_cpu_is_bounded_for_the_worst_chunking(lab, upstreams, daemon, kind):
    """A 16 KiB ClientHello as 2,730 one-byte TLS records, or a head of 2,700 header lines, its last
    800 pieces each in its own segment 4 ms apart: the worker re-parsed everything on each arrival
    (1-3 ms of CPU each when the buffer is nearly full: 1.23 s and 0.87 s for the connection,
    measured before on a loaded machine); now its CPU for the whole connection, set-up and relay
    included, stays far below a generous ceiling (0.13 s measured on the same machine).  The
    bytes still pass unchanged."""
    if kind == "one-byte records":
        data = one_byte_record_hello("slow.example")
        chunks = [data[i:i + 6] for i in range(0, len(data), 6)]
    else:
        chunks = long_head("slow.example")
    paced = 800
    echo = services.start_echo(lab, ECHO_PORT)
    try:
        d = daemon(["--proxy-url", upstreams.dante.url, "--sniff-ports", SNIFF_ALL, "--sniff-timeout", "60"])
        worker = worker_of(d)
        sock = connect(lab, INET_V4, ECHO_PORT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        before = _worker_cpu(worker)
        sock.sendall(b"".join(chunks[:-paced]))
        for chunk in chunks[-paced:]:
            time.sleep(0.004)
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        got = recv_all(sock)
        sock.close()
        cpu = _worker_cpu(worker) - before
        print(f"{kind}: {cpu:.3f} s of worker CPU")
        assert got == b"".join(chunks)
        assert cpu < 0.5, f"{cpu:.2f} s of worker CPU"
    finally:
        echo.stop(lab)
