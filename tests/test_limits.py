"""Per-source limits on a gateway: transocks on the gw, an iptables REDIRECT in PREROUTING for what the client
network sends to the inet networks, dante as the exit, real client connections from the client namespace.

A source over max_conns_per_source gets a reset while its other connections keep relaying and other sources
are served; once one of its connections ends, it may open another.  A burst beyond conn_rate_per_source is
reset.  Each refusal has its access-log line (outcome=source_limited); the warnings, at most one a second per
source, account for every refusal.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from tests.lab import servers
from tests.lab.netns import (
    CLIENT_V4,
    CLIENT_V6,
    GW_CLIENT_IF,
    INET_NET_V4,
    INET_NET_V6,
    TEST_PORT,
    Redirect,
)
from tests.test_datapath import V4, V6, connect, expect_reset_on_connect, wait_log

pytestmark = pytest.mark.netns

PORT = 1093
RESET_WITHIN = 5.0  # generous: transocks resets within milliseconds
WARNING = re.compile(r"source_limited client=(\S+): .*?(?:; (\d+) more refused since the last warning)?$")


def gateway(lab, daemon, upstreams, *limits: str):
    """transocks on the gw as the client network's router, REDIRECT in PREROUTING (gateway mode)."""
    d = daemon(["--proxy-url", upstreams.dante.url, *limits], PORT, redirect=False, ns=lab.gw,
               listens=[f"[::]:{PORT}"])
    redirect = Redirect(lab, lab.gw)
    d.redirects.append(redirect)
    with redirect.undone_on_error():
        for tool, dst in (("iptables", INET_NET_V4), ("ip6tables", INET_NET_V6)):
            spec = ["PREROUTING", "-i", GW_CLIENT_IF, "-p", "tcp", "-d", dst, "-j", "REDIRECT", "--to-ports", str(PORT)]
            redirect.add([tool, "-w", "-t", "nat", "-A", *spec], [tool, "-w", "-t", "nat", "-D", *spec])
    return d


def open_echo(lab, host: str) -> socket.socket:
    """A connection that stays open: the echo server answers only after our FIN."""
    s = connect(lab, host)
    s.sendall(b"ECHO\nbefore the excess ")
    return s


def finish_echo(s: socket.socket) -> None:
    """The held connection still relays both ways, byte-exact."""
    s.sendall(b"and after it")
    s.shutdown(socket.SHUT_WR)
    assert servers._parse_reply(servers.recv_all(s)) == (servers.sha256(b"before the excess and after it"), 30)
    s.close()


def access_lines(text: str, outcome: str) -> list[str]:
    return [ln for ln in text.splitlines() if f"outcome={outcome}" in ln and " upstream=" in ln]


def warnings(text: str) -> list[tuple[str, int]]:
    """(client, refusals it accounts for) of each source_limited warning."""
    out = []
    for ln in text.splitlines():
        if "source_limited client=" in ln and " upstream=" not in ln:
            m = WARNING.search(ln)
            assert m, ln
            out.append((m.group(1), 1 + int(m.group(2) or 0)))
    return out


def wait_lines(d, outcome: str, n: int) -> str:
    """The log once it has n access-log lines of `outcome` (a relay's line comes after its release)."""
    deadline = time.monotonic() + 10
    text = d.log_text()
    while len(access_lines(text, outcome)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
        text = d.log_text()
    assert len(access_lines(text, outcome)) == n, text[-3000:]
    return text


def test_concurrent_limit_resets_the_excess_and_spares_the_rest(lab, upstreams, daemon):
    d = gateway(lab, daemon, upstreams, "--max-conns-per-source", "3")
    held = [open_echo(lab, V4) for _ in range(3)]
    expect_reset_on_connect(lab, V4, within=RESET_WITHIN)
    other = [open_echo(lab, V6) for _ in range(3)]  # another source (the client's IPv6 address): its own count
    expect_reset_on_connect(lab, V6, within=RESET_WITHIN)
    for s in held + other:
        finish_echo(s)
    wait_lines(d, "ok", 6)
    finish_echo(open_echo(lab, V4))  # the ended connections were counted out
    text = wait_lines(d, "ok", 7)
    refused = access_lines(text, "source_limited")
    assert len(refused) == 2, refused
    assert any(f"client={CLIENT_V4}:" in ln and f"dest={V4}:{TEST_PORT}" in ln for ln in refused)
    assert any(f"client=[{CLIENT_V6}]:" in ln and f"dest=[{V6}]:{TEST_PORT}" in ln for ln in refused)
    assert all("3 connections open from this source (max_conns_per_source 3)" in ln for ln in refused)
    assert sorted(warnings(text)) == sorted([(CLIENT_V4, 1), (CLIENT_V6, 1)])


def try_peer(lab, host: str) -> bool:
    """True when the connection relays (the server answers), False when transocks resets it."""
    try:
        s = connect(lab, host)
    except ConnectionResetError:
        return False
    s.settimeout(RESET_WITHIN + 10)
    try:
        servers.peer(s)
    except (ConnectionResetError, BrokenPipeError):
        return False
    finally:
        s.close()
    return True


def v4_warnings(text: str) -> list[int]:
    return [n for client, n in warnings(text) if client == CLIENT_V4]


def test_a_burst_beyond_the_rate_is_reset(lab, upstreams, daemon):
    burst, tries = 3, 10  # one new token every 1000 s: the burst is what gets through
    d = gateway(lab, daemon, upstreams, "--conn-rate-per-source", "0.001", "--conn-burst-per-source", str(burst))
    started = time.monotonic()
    results = [try_peer(lab, V4) for _ in range(tries)]
    elapsed = time.monotonic() - started
    assert results == [True] * burst + [False] * (tries - burst)
    assert try_peer(lab, V6)  # another source has a bucket of its own
    text = wait_log(d, f"dest=[{V6}]:{TEST_PORT}")
    refused = [ln for ln in access_lines(text, "source_limited") if f"client={CLIENT_V4}:" in ln]
    assert len(refused) == tries - burst, text[-3000:]
    assert all(f"dest={V4}:{TEST_PORT}" in ln and "(conn_rate_per_source 0.001, burst 3)" in ln for ln in refused)
    assert 1 <= len(v4_warnings(text)) <= elapsed + 1  # at most one a second
    # Refusals after the last warning are told in the next one, a second later at the earliest.
    time.sleep(1.1)
    assert not try_peer(lab, V4)
    deadline = time.monotonic() + 10
    while sum(v4_warnings(text)) < tries - burst + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
        text = d.log_text()
    assert sum(v4_warnings(text)) == tries - burst + 1, text[-3000:]  # each refusal, itself or as "N more"
    assert len(v4_warnings(text)) >= 2
