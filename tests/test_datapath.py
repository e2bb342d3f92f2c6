"""The data path through real iptables REDIRECT, real upstream proxies and real clients.

Client sockets are made inside the client namespace, where nat OUTPUT
redirects 203.0.113.0/24 and 2001:db8:2::/64 to transocks; the upstreams
(dante, tinyproxy, microsocks) run in the gateway namespace; the test
servers in the "Internet" namespace.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import psutil
import pytest

from tests.lab import servers
from tests.lab.netns import (
    CLIENT_V4,
    CLIENT_V6,
    GW_V4,
    INET2_V4,
    INET_V4,
    INET_V6,
    TEST_PORT,
)

pytestmark = pytest.mark.netns

MiB = 1 << 20
V4 = INET_V4
V6 = INET_V6


def connect(lab, host: str, port: int = TEST_PORT, timeout: float = 15.0) -> socket.socket:
    """A client connection from the client namespace (redirected to transocks).

    The source port is taken by bind() before connect(): connect() alone picks a
    port unique per destination only, so two connections from the client to two
    destinations could share a port, and once REDIRECT sends both to one listener
    their 4-tuples would clash.  (The rare refusal under load this was first
    blamed for came from stale conntrack entries: see Lab.forget_connections.)
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with lab.netns(lab.client):
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            s.connect((host, port))
        except BaseException:
            s.close()
            raise
        return s


def expect_reset(sock: socket.socket, within: float) -> float:
    """Wait for the RST that tells the client its connection failed; returns the delay."""
    start = time.monotonic()
    sock.settimeout(within + 2)
    with pytest.raises(ConnectionResetError):
        while sock.recv(4096):
            pass
    elapsed = time.monotonic() - start
    sock.close()
    assert elapsed < within, f"RST after {elapsed:.2f}s, expected within {within}s"
    return elapsed


def expect_reset_on_connect(lab, host: str, port: int = TEST_PORT, within: float = 1.0) -> None:
    """The RST may land before connect() returns (transocks resets within ~1 ms)."""
    start = time.monotonic()
    try:
        sock = connect(lab, host, port)
    except ConnectionResetError:
        assert time.monotonic() - start < within
        return
    expect_reset(sock, within)


def transfer_checks(lab, host: str) -> None:
    """10 MiB each way, byte-exact by sha256."""
    s = connect(lab, host)
    assert servers.get(s, 10 * MiB, seed="dl") == (servers.expected_sha(10 * MiB, "dl"), 10 * MiB)
    s.close()
    s = connect(lab, host)
    assert servers.put_pattern(s, 10 * MiB, seed="ul") == (servers.expected_sha(10 * MiB, "ul"), 10 * MiB)
    s.close()


def wait_log(d, *needles: str, timeout: float = 5.0) -> str:
    """The daemon logs after it has reset the client: wait for the lines to land."""
    deadline = time.monotonic() + timeout
    while True:
        text = d.log_text()
        if all(n in text for n in needles) or time.monotonic() > deadline:
            for n in needles:
                assert n in text, f"{n!r} not in log:\n{text[-3000:]}"
            return text
        time.sleep(0.05)


def upstream_url(upstreams, name: str) -> str:
    if name == "socks4-dante":
        return upstreams.dante.url.replace("socks5://", "socks4://")
    return getattr(upstreams, name).url


def worker_of(d) -> psutil.Process:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        kids = psutil.Process(d.pid).children()
        if kids:
            return kids[0]
        time.sleep(0.05)
    raise AssertionError("no worker process")


@pytest.mark.parametrize("name", ["dante", "dante_auth", "microsocks", "tinyproxy", "tinyproxy_auth", "socks4-dante"])
def test_transfer_byte_exact(lab, upstreams, daemon, name):
    d = daemon(["--proxy-url", upstream_url(upstreams, name)])
    transfer_checks(lab, V4)
    if name == "socks4-dante":
        # SOCKS4 cannot carry an IPv6 destination: the client learns it by RST.
        expect_reset_on_connect(lab, V6, within=1.0)
        wait_log(d, "IPv4 only")
    else:
        transfer_checks(lab, V6)
    wait_log(d, "outcome=ok")


@pytest.mark.parametrize("host", [V4, V6])
def test_half_close_through_dante(lab, upstreams, daemon, host):
    daemon(["--proxy-url", upstreams.dante.url])
    s = connect(lab, host)
    data = servers.pattern(3 * MiB, "hc")
    # The reply is only sent after the server saw our FIN; we still receive all of it.
    assert servers.echo(s, data) == (servers.sha256(data), len(data))
    s.close()


@pytest.mark.parametrize("name", ["tinyproxy", "microsocks"])
def test_half_close_through_peers_that_close_both_ways_does_not_hang(lab, upstreams, daemon, name):
    d = daemon(["--proxy-url", getattr(upstreams, name).url, "--half-close-timeout", "3"])
    s = connect(lab, V4, timeout=10)
    s.sendall(b"ECHO\nabc")
    s.shutdown(socket.SHUT_WR)
    start = time.monotonic()
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    assert time.monotonic() - start < 8
    s.close()
    deadline = time.monotonic() + 8
    while "sent=" not in d.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "sent=" in d.log_text()


@pytest.mark.parametrize("name", ["dante", "tinyproxy"])
@pytest.mark.parametrize("host", [V4, V6])
def test_destination_refused_resets_client(lab, upstreams, daemon, name, host):
    d = daemon(["--proxy-url", getattr(upstreams, name).url])
    expect_reset_on_connect(lab, host, port=TEST_PORT + 1, within=1.0)
    if name == "dante":
        wait_log(d, "socks5 reply 05: connection refused", "outcome=dest_refused")
    else:
        wait_log(d, "http CONNECT status")


@pytest.mark.parametrize("host", [V4, V6])
def test_upstream_down_resets_client(lab, daemon, host):
    d = daemon(["--proxy-url", f"socks5://{GW_V4}:1999"])
    expect_reset_on_connect(lab, host, within=1.0)
    wait_log(d, "outcome=upstream_unreachable", "Connection refused")


def test_silent_upstream_closed_at_handshake_timeout(lab, daemon):
    with lab.netns(lab.gw):
        silent = socket.create_server((GW_V4, 1998), backlog=64)  # accepts by backlog, never answers
    try:
        d = daemon(["--proxy-url", f"socks5://{GW_V4}:1998", "--handshake-timeout", "1"])
        s = connect(lab, V4)
        elapsed = expect_reset(s, within=3.0)
        assert elapsed >= 0.9
        wait_log(d, "outcome=upstream_timeout", "handshake timed out after 1s")
    finally:
        silent.close()


@pytest.mark.parametrize("name, words", [("dante_auth", "socks5 user/pass rejected"), ("tinyproxy_auth", "http CONNECT status 40")])
def test_wrong_credentials_reset_and_logged(lab, upstreams, daemon, name, words):
    url = getattr(upstreams, name).url.replace(":s3cret@", ":wrong@")
    d = daemon(["--proxy-url", url])
    expect_reset_on_connect(lab, V4, within=2.0)
    wait_log(d, words, "outcome=auth_failed")


def test_loop_guard(lab, upstreams, daemon):
    # The upstream's own address is inside the redirected range: its connection
    # comes back to us, is recognised, and nothing multiplies.
    # No health checks: each probe of the member would come back as one more (refused) loop.
    d = daemon(["--proxy-url", f"socks5://{INET2_V4}:1080", "--health-interval", "0"])
    expect_reset_on_connect(lab, V4, within=2.0)
    # A connection made straight to the listener was never redirected.
    expect_reset_on_connect(lab, "127.0.0.1", d.port, within=2.0)
    wait_log(d, "dest=203.0.113.11:1080", "redirect loop")
    time.sleep(0.3)
    lines = [ln for ln in d.log_text().splitlines() if "outcome=loop" in ln]
    # The upstream's redirected connection came back once and was refused: nothing multiplied.
    assert sum(f"dest={INET2_V4}:1080" in ln for ln in lines) == 1
    assert any(f"dest=127.0.0.1:{d.port}" in ln or "not redirected" in ln for ln in lines)


def test_200_concurrent_connections(lab, upstreams, daemon):
    daemon(["--proxy-url", upstreams.dante.url])
    n = 200
    size = 256 * 1024
    socks = [connect(lab, V4 if i % 2 else V6) for i in range(n)]
    results: list[object] = [None] * n

    def one(i: int) -> None:
        try:
            results[i] = servers.get(socks[i], size, seed=str(i))
        except Exception as exc:  # collected and reported below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in socks:
        s.close()
    bad = [(i, r) for i, r in enumerate(results) if r != (servers.expected_sha(size, str(i)), size)]
    assert not bad, bad[:5]


@pytest.mark.parametrize("name", ["dante", "tinyproxy"])
def test_curl_through_redirect(lab, upstreams, daemon, name):
    daemon(["--proxy-url", getattr(upstreams, name).url])
    for flag, host in (("-4", V4), ("-6", f"[{V6}]")):
        out = lab.run(lab.client, ["curl", "-sS", flag, "--max-time", "20", "-o", "/dev/null",
                                   "-w", "%{http_code} %{size_download}",
                                   f"http://{host}:{TEST_PORT}/bytes/100000/curl"], timeout=30)
        assert out.stdout.split() == ["200", "100000"]
    refused = lab.run(lab.client, ["curl", "-sS", "--max-time", "10", f"http://{V4}:{TEST_PORT + 1}/"],
                      check=False, timeout=30)
    assert refused.returncode != 0
    # The RST may land before curl has seen its (redirected, local) connect complete: then
    # curl reports a failed connect, or getpeername() on the already reset socket (ENOTCONN).
    words = ("reset", "recv failure", "couldn't connect", "getpeername")
    assert any(w in refused.stderr.lower() for w in words), refused.stderr


# --- a fake upstream that misbehaves ------------------------------------------------

SOCKS5_BAD = {
    "wrong_version": b"\x04\x00",
    "truncated": b"\x05\x00\x05",
    "unknown_atyp": b"\x05\x00\x05\x00\x00\x09" + bytes(8),
    "garbage": b"\xff" * 65536,
    "silence": b"",
}
HTTP_BAD = {
    "oversized_header": b"HTTP/1.1 200 OK\r\n" + b"X-Fill: " + b"a" * 20000,
    "bad_status": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    "truncated": b"HTTP/1.1 200 Conn",
    "garbage": bytes(range(256)) * 256,
    "silence": b"",
}


class FakeUpstream:
    """Listens in the gw namespace; each connection gets the next canned reply."""

    def __init__(self, lab, port: int, replies: list[bytes]) -> None:
        with lab.netns(lab.gw):
            self.sock = socket.create_server((GW_V4, port), backlog=16)
        self.replies = list(replies)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for reply in self.replies:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(3)
                try:
                    conn.recv(4096)
                    if reply:
                        conn.sendall(reply)
                        time.sleep(0.3 if len(reply) < 1000 else 0.1)
                        continue
                    while conn.recv(4096):  # silence: read, never answer
                        pass
                except OSError:
                    pass

    def close(self) -> None:
        stop_accepting(self.sock, self.thread)


def stop_accepting(sock: socket.socket, thread: threading.Thread) -> None:
    """Wake the thread blocked in accept() and wait for it, then close the socket.

    A bare close() leaves the thread about to accept on the descriptor number,
    which the next fake server's socket reuses: a later test's connections were
    then accepted by this one's thread (seen as a tunnel to the wrong fake).
    """
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # Linux: a blocked accept() returns EINVAL
    thread.join(5)
    sock.close()


@pytest.mark.parametrize("scheme, table", [("socks5", SOCKS5_BAD), ("http", HTTP_BAD)])
def test_malformed_upstream_replies(lab, daemon, scheme, table):
    port = 1997 if scheme == "socks5" else 1996
    fake = FakeUpstream(lab, port, list(table.values()))
    try:
        d = daemon(["--proxy-url", f"{scheme}://{GW_V4}:{port}", "--handshake-timeout", "1", "--access-log-format", "json",
                    "--health-interval", "0"])  # a health probe would take one of the canned replies
        worker = worker_of(d)
        baseline = worker.num_fds()
        for _ in table:
            expect_reset_on_connect(lab, V4, within=3.0)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            text = d.log_text()
            failed = text.count('"outcome":"protocol_error"') + text.count('"outcome":"upstream_timeout"')
            if failed >= len(table):
                break
            time.sleep(0.05)
        assert failed == len(table), text
        assert d.proc.poll() is None
        assert worker.is_running()
        deadline = time.monotonic() + 3
        while worker.num_fds() > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.num_fds() <= baseline
    finally:
        fake.close()


def test_dual_stack_listener_serves_v4_mapped_and_v6(lab, upstreams, daemon):
    d = daemon(["--proxy-url", upstreams.dante.url, "--listen", "[::]:1085"], redirect=False)
    redirect = lab.iptables_redirect(1085)
    try:
        for host in (V4, V6):
            s = connect(lab, host)
            assert servers.get(s, 100_000, seed=host) == (servers.expected_sha(100_000, host), 100_000)
            s.close()
        wait_log(d, f"dest={V4}:{TEST_PORT}", f"dest=[{V6}]:{TEST_PORT}")
    finally:
        redirect.remove()


def test_socks5_pipelining_measured_against_real_servers(lab, upstreams, daemon):
    """Greeting and request in one write: dante answers both, microsocks waits forever.

    This pins the measurement behind socks5_pipelining's default (off).
    """
    d = daemon(["--proxy-url", upstreams.dante.url, "--socks5-pipelining", "true"])
    s = connect(lab, V4)
    assert servers.get(s, 1000) == (servers.expected_sha(1000), 1000)
    s.close()
    d.stop()
    d.remove_redirects()
    d = daemon(["--proxy-url", upstreams.microsocks.url, "--socks5-pipelining", "true", "--handshake-timeout", "1"],
               listen_port=1084)
    expect_reset_on_connect(lab, V4, within=3.0)
    wait_log(d, "outcome=upstream_timeout")


def test_relayed_sockets_have_keepalive(lab, upstreams, daemon):
    """Both of transocks' sockets of a tunnel run TCP keepalive, so a dead peer frees an idle relay:
    the accepted one inherits it from the listener, the upstream one sets it."""
    d = daemon(["--proxy-url", upstreams.dante.url])
    s = connect(lab, V4)
    try:
        servers.hold(s)
        deadline = time.monotonic() + 5
        while True:
            ss = lab.run(lab.client, ["ss", "-tnoH", "state", "established"]).stdout.splitlines()
            mine = [ln for ln in ss if ln.split()[2].endswith(f":{d.port}")]  # local address: the listener's port
            upstream = [ln for ln in ss if ln.split()[3].endswith(":1080")]
            relaying = mine and upstream and all("timer:(keepalive" in ln for ln in mine + upstream)
            if relaying or time.monotonic() > deadline:  # the upstream socket gets its keepalive after the handshake
                break
            time.sleep(0.05)
        assert mine and all("timer:(keepalive" in ln for ln in mine), ss
        assert upstream and all("timer:(keepalive" in ln for ln in upstream), ss
    finally:
        s.close()


def test_tproxy_on_a_router(lab, upstreams, daemon):
    """transocks --tproxy on the gw, as the client's router: an iptables TPROXY rule diverts the
    client's connections as they pass through; both families arrive with their real destination
    and the client's real address, and travel byte-exact through dante."""
    port = 1091
    d = daemon(["--proxy-url", upstreams.dante.url, "--tproxy", "true"], port, redirect=False, ns=lab.gw,
               listens=[f"[::]:{port}"])
    d.redirects.append(lab.tproxy(port))
    for host, seed in ((V4, "t4"), (V6, "t6")):
        s = connect(lab, host)
        assert servers.get(s, MiB, seed=seed) == (servers.expected_sha(MiB, seed), MiB)
        s.close()
    text = wait_log(d, f"dest={V4}:{TEST_PORT}", f"dest=[{V6}]:{TEST_PORT}")
    lines = [ln for ln in text.splitlines() if f":{TEST_PORT} upstream=" in ln]
    assert len(lines) == 2 and all("outcome=ok" in ln for ln in lines), lines
    assert any(f"client={CLIENT_V4}:" in ln for ln in lines) and any(f"client=[{CLIENT_V6}]:" in ln for ln in lines)
