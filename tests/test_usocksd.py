"""usocksd end to end: real clients (curl, python-socks, transocks) in the client namespace,
usocksd in the gw namespace, the test servers in the "Internet" namespace.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import struct
import threading
import time

import psutil
import pytest
from python_socks import ProxyError
from python_socks.sync import Proxy

from tests import usocksd_fixtures as uf
from tests.lab import servers
from tests.lab.logins import (
    LoginFlood,
    PeakRSS,
    flood_addresses,
    good_logins,
    percentile,
)
from tests.lab.netns import (
    CLIENT_V4,
    CLIENT_V6,
    GW_EXT_V4,
    GW_EXT_V6,
    GW_V4,
    GW_V6,
    INET_LINK_V6,
    INET_V4,
    INET_V6,
    TEST_PORT,
)
from tests.lab.threads import ThreadedLoad
from tests.test_runtime import wait_for
from tests.usocksd_fixtures import (
    CLIENTS_V4,
    CLIENTS_V6,
    DNSBL_ZONE,
    EGRESS_V4,
    EGRESS_V6,
    LISTED_V4,
    LISTED_V6,
    Canary,
    closed_by_peer,
    fd_count_settles,
    raw_connect,
    recv_exact,
    socks4_raw,
    socks5_raw,
)
from transocks.usocksd.credentials import hash_password
from transocks.usocksd.egress import rendezvous

pytestmark = pytest.mark.netns

MiB = 1 << 20
USERS = {"alice": "wonder", "bob": "builder"}
CANARY_PORT = 9179


@pytest.fixture(scope="module")
def gw_names(lab):
    """Names for usocksd to resolve, from a hosts file only (never DNS)."""
    with uf.name_overlay(lab) as names:
        yield names


@pytest.fixture(scope="module")
def extra_addresses(lab):
    """Three egress addresses per family on the gw, eight more client addresses per family."""
    with uf.extra_addresses(lab):
        yield


@pytest.fixture
def usocksd(lab, gw_names, tmp_path):
    """Factory: ``usocksd(["--deny-dest", "10.0.0.0/8"])`` starts usocksd in the gw namespace."""
    factory = uf.UsocksdFactory(lab, tmp_path)
    try:
        yield factory.start
    finally:
        factory.close()


def curl(lab, u, flag: str, url: str, family: str = "-4", v6_proxy: bool = False, auth: str = "",
         body: bool = False) -> tuple[int, str, str]:
    """curl through usocksd from the client namespace: (exit code, stdout, stderr).

    stdout is the body (when `body`) and then "<http code> <bytes downloaded>".
    """
    proxy = f"{auth}@" if auth else ""
    proxy += f"[{GW_V6}]:{u.port}" if v6_proxy else f"{GW_V4}:{u.port}"
    argv = ["curl", "-sS", family, "--max-time", "20", flag, proxy, "-w", "\n%{http_code} %{size_download}", url]
    if not body:
        argv[1:1] = ["-o", "/dev/null"]
    res = lab.run(lab.client, argv, check=False, timeout=30)
    return res.returncode, res.stdout, res.stderr


def proxy_connect(lab, url: str, host: str, port: int = TEST_PORT, source: str | None = None, rdns: bool | None = None):
    """python-socks (sync) from the client namespace."""
    proxy = Proxy.from_url(url, rdns=rdns)
    with lab.netns(lab.client):
        return proxy.connect(host, port, timeout=10, local_addr=(source, 0) if source else None)


def warm_up(lab, u) -> None:
    """One relayed connection, so the worker's lazily made resources (the relay's
    pipe pool) exist before a descriptor baseline is taken."""
    s = proxy_connect(lab, u.url(), INET_V4)
    assert servers.get(s, 100_000) == (servers.expected_sha(100_000), 100_000)
    s.close()
    u.wait_log("outcome=ok")


def write_users(path, users: dict[str, str]) -> None:
    path.write_text("".join(f"{u}:{hash_password(pw)}\n" for u, pw in users.items()))
    path.chmod(0o644)


# --- protocols, clients and families ---------------------------------------------------------


@pytest.mark.parametrize("flag, family, v6_proxy, host, peer_prefix", [
    ("--socks4", "-4", False, INET_V4, "198.51.100.1 "),
    ("--socks4a", "-4", False, "good.test", "198.51.100.1 "),
    ("--socks5", "-4", False, INET_V4, "198.51.100.1 "),
    ("--socks5", "-6", True, f"[{INET_V6}]", "2001:db8:1::1 "),
    ("--socks5-hostname", "-4", False, "good.test", "198.51.100.1 "),
    ("--socks5-hostname", "-6", True, "good6.test", "2001:db8:1::1 "),
])
def test_curl_every_protocol_and_family(lab, usocksd, flag, family, v6_proxy, host, peer_prefix):
    u = usocksd()
    code, out, err = curl(lab, u, flag, f"http://{host}:{TEST_PORT}/bytes/100000/curl", family, v6_proxy)
    assert code == 0, err
    assert out.split()[-2:] == ["200", "100000"]
    code, out, err = curl(lab, u, flag, f"http://{host}:{TEST_PORT}/peer", family, v6_proxy, body=True)
    assert code == 0 and out.startswith(peer_prefix), (out, err)
    u.wait_log("outcome=ok", count=2)
    line = u.access_lines("outcome=ok")[0]
    assert ("client=[2001:db8:c::2]:" if v6_proxy else "client=192.0.2.2:") in line
    assert f"upstream={'[2001:db8:1::1]' if v6_proxy else '198.51.100.1'}:" in line


@pytest.mark.parametrize("scheme, host, rdns", [
    ("socks5", INET_V4, False), ("socks5", INET_V6, False), ("socks5", "good.test", True),
    ("socks5", "dual.test", True), ("socks4", INET_V4, False), ("socks4", "good.test", True),
])
def test_python_socks_byte_exact(lab, usocksd, scheme, host, rdns):
    u = usocksd()
    s = proxy_connect(lab, u.url(scheme), host, rdns=rdns)
    assert servers.get(s, 4 * MiB, seed="ps") == (servers.expected_sha(4 * MiB, "ps"), 4 * MiB)
    s.close()
    s = proxy_connect(lab, u.url(scheme), host, rdns=rdns)
    assert servers.put_pattern(s, 4 * MiB, seed="pu") == (servers.expected_sha(4 * MiB, "pu"), 4 * MiB)
    s.close()
    u.wait_log("outcome=ok", count=2)


def test_python_socks_reply_codes(lab, usocksd):
    u = usocksd(["--deny-dest", "*:25", "--connect-timeout", "1"])
    lab.run(lab.gw, ["ip", "route", "add", "unreachable", "203.0.113.200/32"])
    try:
        cases = [
            (INET_V4, TEST_PORT + 1, 5, "outcome=dest_refused"),
            ("2001:db8:ffff::1", TEST_PORT, 3, "Network is unreachable"),
            ("203.0.113.200", TEST_PORT, 4, "No route to host"),
            ("198.51.100.99", TEST_PORT, 6, "timed out after 1s"),
            ("nothere.test", TEST_PORT, 1, "cannot resolve nothere.test"),
            (INET_V4, 25, 2, "matches deny_dest *:25"),
        ]
        for host, port, code, words in cases:
            with pytest.raises(ProxyError) as info:
                proxy_connect(lab, u.url(), host, port, rdns=True)
            assert info.value.error_code == code, (host, info.value)
            u.wait_log(words)
    finally:
        lab.run(lab.gw, ["ip", "route", "del", "unreachable", "203.0.113.200/32"], check=False)


def test_bind_udp_and_address_type_answered(lab, usocksd):
    u = usocksd(["--udp", "false"])  # UDP ASSOCIATE served: tests/test_usocksd_udp.py
    for cmd in (2, 3):
        s = raw_connect(lab, u)
        assert socks5_raw(s, INET_V4, TEST_PORT, cmd=cmd) == 7
        closed_by_peer(s)
        s.close()
    s = raw_connect(lab, u)
    s.sendall(b"\x05\x01\x00\x05\x01\x00\x07" + bytes(6))
    assert recv_exact(s, 2) == b"\x05\x00"
    assert recv_exact(s, 10)[:2] == b"\x05\x08"
    s.close()
    u.wait_log("command BIND not supported", "command UDP ASSOCIATE not supported", "address type 0x07 not supported")


# --- the whole chain: host -> REDIRECT -> transocks -> usocksd -> destination -------------


@pytest.mark.parametrize("auth", [False, True])
def test_transocks_through_usocksd(lab, usocksd, daemon, tmp_path, auth):
    args = []
    if auth:
        users = tmp_path / "users"
        write_users(users, USERS)
        args = ["--auth-file", str(users)]
    u = usocksd(args)
    d = daemon(["--proxy-url", u.url(auth=("alice", "wonder") if auth else None)])
    for host in (INET_V4, INET_V6):
        with lab.netns(lab.client):
            s = socket.create_connection((host, TEST_PORT), timeout=15)
        assert servers.get(s, 10 * MiB, seed="dl") == (servers.expected_sha(10 * MiB, "dl"), 10 * MiB)
        s.close()
        with lab.netns(lab.client):
            s = socket.create_connection((host, TEST_PORT), timeout=15)
        data = servers.pattern(3 * MiB, "hc")
        assert servers.echo(s, data) == (servers.sha256(data), len(data))  # half-close through both
        s.close()
    u.wait_log("outcome=ok", count=4)
    lines = u.access_lines("outcome=ok")
    assert all("client=192.0.2.2:" in ln for ln in lines)
    assert all(("user=alice" in ln) == auth for ln in lines)
    assert f"upstream=socks5://{'alice@' if auth else ''}{GW_V4}:{u.port}" in d.log_text()


# --- egress: stickiness, the pool, DNSBL, interface ----------------------------------------------


def egress_seen(lab, u, client: str, dest: str) -> str:
    s = proxy_connect(lab, u.url(v6=":" in client), dest, source=client)
    ip, _ = servers.peer(s)
    s.close()
    return ip


def test_egress_is_sticky_per_client_and_dnsbl_moves_only_listed(lab, usocksd, extra_addresses):
    args = [f"--egress-address={a}" for a in EGRESS_V4 + EGRESS_V6]
    u = usocksd(args)
    before: dict[tuple[str, str], str] = {}
    for client in CLIENTS_V4 + CLIENTS_V6:
        for dest, pool in ((INET_V4, EGRESS_V4), (INET_V6, EGRESS_V6)):
            seen = {egress_seen(lab, u, client, dest) for _ in range(3)}
            assert len(seen) == 1, (client, dest, seen)
            (ip,) = seen
            assert ip == rendezvous(client, pool)
            before[client, dest] = ip
    assert len({v for (_, d), v in before.items() if d == INET_V4}) >= 2
    assert len({v for (_, d), v in before.items() if d == INET_V6}) >= 2
    u.stop()

    # The same pool with a blocklist that lists .22 and ::22: only their clients move.
    u = usocksd(args + ["--dnsbl-zone", DNSBL_ZONE, "--dnsbl-interval", "1h"])
    u.wait_log(f"egress {LISTED_V4} is listed in {DNSBL_ZONE}", f"egress {LISTED_V6} is listed in {DNSBL_ZONE}")
    moved = 0
    for (client, dest), old in before.items():
        new = egress_seen(lab, u, client, dest)
        assert new not in (LISTED_V4, LISTED_V6)
        if old in (LISTED_V4, LISTED_V6):
            moved += 1
        else:
            assert new == old, (client, dest, old, new)
    assert moved >= 1


def test_egress_interface(lab, usocksd):
    u = usocksd(["--egress-interface", "inet0"])
    s = proxy_connect(lab, u.url(), INET_V4)
    assert servers.get(s, 1000) == (servers.expected_sha(1000), 1000)
    s.close()
    u.stop()
    u = usocksd(["--egress-interface", "cl0"])  # the client side: no route to the Internet there
    with pytest.raises(ProxyError) as info:
        proxy_connect(lab, u.url(), INET_V6)
    assert info.value.error_code == 3
    u.wait_log("Network is unreachable (reply 03 network unreachable)")


# --- access control and evasion attempts -----------------------------------------------------------


def test_acl_evasion_attempts_are_refused_and_nothing_reaches_the_canaries(lab, usocksd):
    deny = ["127.0.0.0/8", "::1", "192.0.2.0/24", "2001:db8:c::/64", ".blocked.test", "*:25"]
    u = usocksd([f"--deny-dest={r}" for r in deny])
    canary = Canary(lab, [(lab.gw, "127.0.0.1"), (lab.gw, "::1"), (lab.gw, GW_V4), (lab.gw, GW_V6),
                          (lab.client, "192.0.2.2")], CANARY_PORT)
    try:
        worker = u.worker()
        warm_up(lab, u)
        baseline = worker.num_fds()
        socks5_targets = [
            "127.0.0.1", "::ffff:127.0.0.1", "::1", "::ffff:7f00:1", "0x7f.1", "0x7F.0.0.1", "2130706433", "127.1",
            "0177.0.0.1", "127.0.0.1.", "[::1]", "[::ffff:127.0.0.1]", "localhost", "LOCALHOST.", "evil.test",
            "EVIL.Test.", "evil6.test", "mapped.test", "gw.test", "client.test", "192.0.2.1", GW_V6,
            "Www.Blocked.Test.", "blocked.test", "\uff11\uff12\uff17.\uff10.\uff10.\uff11",
        ]
        for host in socks5_targets:
            s = raw_connect(lab, u)
            assert socks5_raw(s, host, CANARY_PORT) == 2, host
            closed_by_peer(s)
            s.close()
        s = raw_connect(lab, u)
        assert socks5_raw(s, "good.test", 25) == 2  # a port rule
        s.close()
        for host in ("127.0.0.1", "evil.test", "127.1", "gw.test"):
            s = raw_connect(lab, u)
            assert socks4_raw(s, host, CANARY_PORT) == 0x5B, host
            s.close()
        for url in (f"http://EVIL.test.:{CANARY_PORT}/", f"http://[::ffff:127.0.0.1]:{CANARY_PORT}/",
                    f"http://0x7f.1:{CANARY_PORT}/"):
            code, _, err = curl(lab, u, "--socks5-hostname", url)
            assert code != 0 and "(2)" in err, (url, err)
        n = len(socks5_targets) + 1 + 4 + 3
        u.wait_log("outcome=not_allowed", count=n)
        assert len(u.access_lines("outcome=not_allowed")) == n
        assert canary.accepted == []
        # The control: the same port on an allowed address is reached.
        s = proxy_connect(lab, u.url(), INET_V4)
        assert servers.get(s, 100) == (servers.expected_sha(100), 100)
        s.close()
        assert fd_count_settles(worker, baseline) <= baseline
    finally:
        canary.close()
    text = u.log_text()
    assert "evil.test resolves to 127.0.0.1" in text and "mapped.test resolves to 127.0.0.1" in text
    assert "evil6.test resolves to ::1" in text and "matches deny_dest .blocked.test" in text


def test_own_listen_addresses_are_refused_and_hops_do_not_chain(lab, usocksd):
    """The issue's attack: one connection pipelining requests to usocksd's own address (allowed:
    the gw is inside allow_from) chained 8,000 hops.  Now the first hop is refused (02, outcome=loop);
    a wildcard listener's port is refused on every local address and by name."""
    wildcard_port = uf.FIRST_PORT + 500 + os.getpid() % 100
    u = usocksd(["--listen", f"[::]:{wildcard_port}"])
    worker = u.worker()
    warm_up(lab, u)
    baseline = worker.num_fds()
    s = raw_connect(lab, u)
    hop = b"\x05\x01\x00" + b"\x05\x01\x00" + uf.socks5_address(GW_V4, u.port)  # greeting + CONNECT to us
    s.sendall(hop * 200)
    assert recv_exact(s, 2) == b"\x05\x00"
    assert recv_exact(s, 10)[:2] == b"\x05\x02"
    closed_by_peer(s)
    s.close()
    targets = [(GW_V6, u.port), ("gw.test", u.port), (GW_V4, wildcard_port), ("127.0.0.1", wildcard_port),
               ("127.9.9.9", wildcard_port), ("::1", wildcard_port), (GW_EXT_V4, wildcard_port),
               (GW_EXT_V6, wildcard_port), ("::ffff:" + GW_EXT_V4, wildcard_port), ("gw.test", wildcard_port)]
    for host, port in targets:
        s = raw_connect(lab, u)
        assert socks5_raw(s, host, port) == 2, (host, port)
        s.close()
    code, _, err = curl(lab, u, "--socks5", f"http://{GW_V4}:{wildcard_port}/")
    assert code != 0 and "(2)" in err, err
    n = 1 + len(targets) + 1
    u.wait_log("outcome=loop", count=n)
    assert len(u.access_lines("outcome=loop")) == n
    assert len(u.access_lines()) == n + 1  # the warm-up, and not one hop more
    text = u.log_text()
    assert f"{GW_V4}:{u.port} is this server's listen address (loop)" in text
    assert f"{GW_V4}:{wildcard_port} is this server's listen address (gw.test resolves to it) (loop)" in text
    assert fd_count_settles(worker, baseline) <= baseline
    # Other ports of this host are refused too, by the safety defaults (not a loop: no listener of ours).
    s = raw_connect(lab, u)
    assert socks5_raw(s, "gw.test", CANARY_PORT) == 2
    s.close()
    u.wait_log(f"{GW_V4}:{CANARY_PORT} is an address of this host (gw.test resolves to {GW_V4})")


EMBEDDING_GW_V4 = ["64:ff9b::c000:201", "2002:c000:201::1", "::ffff:0:c000:201"]  # NAT64, 6to4, translated


def test_nat64_and_6to4_spellings_hit_ipv4_deny_rules(lab, usocksd):
    """The gw answers on IPv6 addresses that carry its IPv4 address (as a NAT64 or 6to4 host would
    be reached); with 192.0.2.0/24 denied, curl's requests for them are refused (02) and the
    canaries listening there see nothing."""
    for addr in EMBEDDING_GW_V4:
        lab.run(lab.gw, ["ip", "-6", "addr", "add", f"{addr}/128", "dev", "lo", "nodad"])
    canary = None
    try:
        canary = Canary(lab, [(lab.gw, addr) for addr in EMBEDDING_GW_V4], CANARY_PORT)
        u = usocksd(["--deny-dest", "192.0.2.0/24"])
        for addr in EMBEDDING_GW_V4:
            for flag in ("--socks5", "--socks5-hostname"):
                code, _, err = curl(lab, u, flag, f"http://[{addr}]:{CANARY_PORT}/", family="-6", v6_proxy=True)
                assert code != 0 and "(2)" in err, (addr, flag, err)
        u.wait_log("outcome=not_allowed", count=2 * len(EMBEDDING_GW_V4))
        assert canary.accepted == []
        text = u.log_text()
        for addr in EMBEDDING_GW_V4:
            assert f"192.0.2.1:{CANARY_PORT} matches deny_dest 192.0.2.0/24 (carried in {addr})" in text
    finally:
        if canary is not None:
            canary.close()
        for addr in EMBEDDING_GW_V4:
            lab.run(lab.gw, ["ip", "-6", "addr", "del", f"{addr}/128", "dev", "lo"], check=False)


DENIED_V4 = "198.51.100.7"
LOCAL_NAT64 = [  # 198.51.100.7 in RFC 8215's 64:ff9b:1::/48, for each RFC 6052 prefix length a translator may use
    "64:ff9b:1::c633:6407", "64:ff9b:1:fffe::c633:6407",  # /96
    "64:ff9b:1:0:c6:3364:700:0", "64:ff9b:1:c6:33:6407::", "64:ff9b:1:c633:64:700::",  # /64, /56, /48
]


@contextlib.contextmanager
def inet_addresses(lab, addrs):
    """addrs on the inet namespace's loopback, 64:ff9b:1::/48 routed there from the gw."""
    lab.run(lab.gw, ["ip", "-6", "route", "add", "64:ff9b:1::/48", "via", INET_LINK_V6])
    try:
        for addr in addrs:
            lab.run(lab.inet, ["ip", "addr", "add", addr + ("/128" if ":" in addr else "/32"), "dev", "lo"]
                    + (["nodad"] if ":" in addr else []))
        yield
    finally:
        for addr in addrs:
            lab.run(lab.inet, ["ip", "addr", "del", addr + ("/128" if ":" in addr else "/32"), "dev", "lo"], check=False)
        lab.run(lab.gw, ["ip", "-6", "route", "del", "64:ff9b:1::/48"], check=False)


def test_local_use_nat64_spellings_hit_ipv4_deny_rules(lab, usocksd):
    """The issue's finding: with 198.51.100.7 denied, 64:ff9b:1::c633:6407 passed and seven connections
    reached the denied address.  Each spelling of it in 64:ff9b:1::/48 is now refused (02) by the rule,
    by literal and by name, and the listeners there see nothing; without the rule they are reached."""
    with inet_addresses(lab, [DENIED_V4, *LOCAL_NAT64]):
        canary = Canary(lab, [(lab.inet, a) for a in [DENIED_V4, *LOCAL_NAT64]], CANARY_PORT)
        try:
            u = usocksd(["--deny-dest", DENIED_V4])
            for addr in LOCAL_NAT64:
                for flag in ("--socks5", "--socks5-hostname"):
                    code, _, err = curl(lab, u, flag, f"http://[{addr}]:{CANARY_PORT}/", family="-6", v6_proxy=True)
                    assert code != 0 and "(2)" in err, (addr, flag, err)
                s = raw_connect(lab, u)
                assert socks5_raw(s, addr, CANARY_PORT) == 2, addr
                s.close()
            u.wait_log("outcome=not_allowed", count=3 * len(LOCAL_NAT64))
            assert canary.accepted == []
            text = u.log_text()
            for addr in LOCAL_NAT64:
                assert f"{DENIED_V4}:{CANARY_PORT} matches deny_dest {DENIED_V4} (carried in {addr})" in text
            # The control: without the rule every spelling reaches its listener.
            other = usocksd()
            for addr in LOCAL_NAT64:
                s = raw_connect(lab, other)
                assert socks5_raw(s, addr, CANARY_PORT) == 0, addr
                s.close()
            wait_for(lambda: len(canary.accepted) == len(LOCAL_NAT64), 5)
            assert sorted(host for host, _ in canary.accepted) == sorted(LOCAL_NAT64)
        finally:
            canary.close()


def syn_count(lab, port: int) -> int:
    """SYNs this host sent itself to `port` (over lo), from the INPUT counters of both families."""
    total = 0
    for tool in (lab.iptables, lab.ip6tables):
        out = tool(lab.gw, "-nvx", "-L", "INPUT").stdout
        total += sum(int(line.split()[0]) for line in out.splitlines() if f"dpt:{port} " in line + " ")
    return total


def test_two_usocksd_on_one_host_cannot_chain(lab, usocksd):
    """Two instances pointing at each other: a client of the first asks for the second (which asks
    for the first, pipelined): refused at the first hop by every spelling of the gw's address, and
    not one connection reaches the second's port.  An allow_dest naming it opens exactly that hop."""
    a, b = usocksd(), usocksd()
    rules = [(["-I", "INPUT", "-i", "lo", "-p", "tcp", "--syn", "--dport", str(b.port)], tool)
             for tool in (lab.iptables, lab.ip6tables)]
    for argv, tool in rules:
        tool(lab.gw, *argv)
    try:
        s = raw_connect(lab, a)
        hop_to_a = b"\x05\x01\x00" + b"\x05\x01\x00" + uf.socks5_address(GW_V4, a.port)
        s.sendall(b"\x05\x01\x00" + b"\x05\x01\x00" + uf.socks5_address(GW_V4, b.port) + hop_to_a * 100)
        assert recv_exact(s, 2) == b"\x05\x00"
        assert recv_exact(s, 10)[:2] == b"\x05\x02"
        closed_by_peer(s)
        s.close()
        spellings = [GW_V6, "gw.test", "::ffff:" + GW_V4, "64:ff9b::c000:201", "64:ff9b:1::c000:201",
                     "2002:c000:201::", GW_EXT_V4, "3221225985", "127.0.0.1", "localhost"]
        for host in spellings:
            s = raw_connect(lab, a)
            assert socks5_raw(s, host, b.port) == 2, host
            s.close()
        a.wait_log("outcome=not_allowed", count=1 + len(spellings))
        assert syn_count(lab, b.port) == 0
        assert b.access_lines() == []
        # The control: named explicitly, the hop is made (and b, without such a rule, refuses the next).
        c = usocksd(["--allow-dest", f"{GW_V4}:{b.port}"])
        s = raw_connect(lab, c)
        s.sendall(b"\x05\x01\x00" + b"\x05\x01\x00" + uf.socks5_address(GW_V4, b.port) + hop_to_a)
        assert recv_exact(s, 2) == b"\x05\x00" and recv_exact(s, 10)[:2] == b"\x05\x00"
        assert recv_exact(s, 2) == b"\x05\x00" and recv_exact(s, 10)[:2] == b"\x05\x02"
        s.close()
        assert syn_count(lab, b.port) == 1
        b.wait_log(f"{GW_V4}:{a.port} is an address of this host")
    finally:
        for argv, tool in rules:
            tool(lab.gw, "-D", "INPUT", *argv[2:], check=False)


def test_default_deny_with_allow_rules(lab, usocksd):
    u = usocksd(["--dest-policy", "deny", "--allow-dest", f".good.test:{TEST_PORT}", "--allow-dest", INET_V6])
    s = proxy_connect(lab, u.url(), "good.test", rdns=True)
    assert servers.get(s, 100) == (servers.expected_sha(100), 100)
    s.close()
    s = proxy_connect(lab, u.url(), INET_V6)
    assert servers.get(s, 100) == (servers.expected_sha(100), 100)
    s.close()
    for host in (INET_V4, "dual.test"):  # dual.test: one of its addresses is not allowed
        with pytest.raises(ProxyError) as info:
            proxy_connect(lab, u.url(), host, rdns=True)
        assert info.value.error_code == 2
    u.wait_log("dest_policy deny", count=2)


def test_clients_outside_allow_from_get_nothing(lab, usocksd, extra_addresses):
    u = usocksd(allow_from=["192.0.2.99", CLIENT_V6])  # bare addresses: a /32 and a /128
    for v6, source in ((False, None), (True, CLIENTS_V6[0])):
        s = raw_connect(lab, u, v6=v6, source=source)
        s.sendall(b"\x05\x01\x00")
        s.settimeout(5)
        try:
            assert s.recv(10) == b""  # closed at once, nothing answered
        except ConnectionResetError:
            pass  # or reset, when the greeting arrived before the close
        s.close()
    s = raw_connect(lab, u, v6=True, source=CLIENT_V6)  # the allowed /128
    assert socks5_raw(s, INET_V4, TEST_PORT) == 0
    s.close()
    u.wait_log("client 192.0.2.2 is not in allow_from", f"client {CLIENTS_V6[0]} is not in allow_from")
    assert len(u.access_lines("outcome=not_allowed")) == 2


# --- bad input -------------------------------------------------------------------------------------


def test_bad_input_closed_with_log_lines_and_no_leak(lab, usocksd):
    u = usocksd(["--negotiation-timeout", "1"])
    worker = u.worker()
    warm_up(lab, u)
    baseline = worker.num_fds()
    cases = [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a SOCKS request (first byte 0x47)"),
        (b"\x05\x00", "socks5 greeting offers no methods"),
        (b"\x05\x01\x00\x06\x01\x00\x01" + bytes(6), "socks5 request version 0x06"),
        (struct.pack("!BBH4s", 4, 1, 80, socket.inet_aton(INET_V4)) + b"u" * 1000, "user id longer than 255 bytes"),
        (struct.pack("!BBH4s", 4, 1, 80, b"\0\0\0\x01") + b"\0" + b"h" * 1000, "host name longer than 255 bytes"),
        (b"\x05\x01\x00\x05\x01", "client closed during negotiation"),
        (b"\x05\x01", "negotiation not finished within 1s"),
    ]
    for data, _ in cases:
        s = raw_connect(lab, u)
        s.sendall(data)
        if data == b"\x05\x01\x00\x05\x01":
            s.shutdown(socket.SHUT_WR)
        assert closed_by_peer(s, within=5) < 3
        s.close()
    # A client trickling one byte at a time is cut off at the deadline, not per byte.
    s = raw_connect(lab, u)
    start = time.monotonic()
    with pytest.raises(OSError):
        for byte in b"\x05\x01\x00\x05\x01\x00\x01":
            s.send(bytes([byte]))
            time.sleep(0.3)
    assert time.monotonic() - start < 2.5
    s.close()
    # An empty name, and one that is not a name.
    for host in ("", "bad..name", "evil.test\x00.good.test"):
        s = raw_connect(lab, u)
        assert socks5_raw(s, host, TEST_PORT) == 1, host
        s.close()
    for _, words in cases:
        u.wait_log(words)
    u.wait_log("outcome=protocol_error", count=len(cases) + 4)
    assert fd_count_settles(worker, baseline) <= baseline
    assert u.proc.poll() is None and worker.is_running()
    s = proxy_connect(lab, u.url(), INET_V4)
    assert servers.get(s, 100) == (servers.expected_sha(100), 100)
    s.close()


# --- out of descriptors ------------------------------------------------------------------------------


def _hold_through(lab, u, timeout: float = 3.0) -> tuple[socket.socket, int | None]:
    """A tunnel to the test server's HOLD; (socket, REP), REP None when no reply came (accept paused)."""
    s = raw_connect(lab, u, timeout=timeout)
    try:
        rep = socks5_raw(s, INET_V4, TEST_PORT)
    except (OSError, EOFError, AssertionError):
        return s, None
    if rep == 0:
        s.sendall(b"HOLD\n")
    return s, rep


def test_out_of_descriptors_is_a_reply_and_resource_exhausted_without_traceback(lab, usocksd):
    """A worker filled with held tunnels to 63 descriptors, then held to RLIMIT_NOFILE 64: the next
    client is accepted with the last descriptor, its dial finds none, and it gets a general-failure
    reply and `outcome=resource_exhausted`; later ones wait in the queue while accepting backs off.
    At most one warning a second, no traceback; once the tunnels close it serves again (the issue:
    no reply, no access line, a traceback per connection)."""
    u = usocksd(["--negotiation-timeout", "30"])
    worker = u.worker()
    warm_up(lab, u)
    held: list[socket.socket] = []
    try:
        while (before := worker.num_fds()) < 62:
            s, rep = _hold_through(lab, u)
            held.append(s)
            assert rep == 0
            wait_for(lambda: worker.num_fds() == before + 2, 5, "the tunnel's two descriptors")  # noqa: B023
        if worker.num_fds() == 62:  # one more, with a client that has not finished its greeting
            held.append(raw_connect(lab, u))
            held[-1].sendall(b"\x05")
            wait_for(lambda: worker.num_fds() == 63, 5, "the half-open client's descriptor")
        assert worker.num_fds() == 63
        worker.rlimit(psutil.RLIMIT_NOFILE, (64, 64))
        started = time.monotonic()
        s, rep = _hold_through(lab, u)
        held.append(s)
        assert rep == 1  # general SOCKS server failure
        for _ in range(5):
            held.append(_hold_through(lab, u, timeout=0.5)[0])
        text = u.wait_log("outcome=resource_exhausted")
        elapsed = time.monotonic() - started
        assert "Traceback" not in text and "connection handler failed" not in text
        warnings = [ln for ln in text.splitlines() if " warning: " in ln]
        assert warnings and len(warnings) <= elapsed + 2, warnings
        assert all("no descriptor" in ln for ln in u.access_lines("outcome=resource_exhausted"))
    finally:
        for s in held:
            s.close()
    assert u.proc.poll() is None
    s = wait_for(lambda: _served(lab, u), 10, "a tunnel once descriptors are free")
    assert servers.get(s, 1000) == (servers.expected_sha(1000), 1000)
    s.close()
    assert "Traceback" not in u.log_text()


def _served(lab, u):
    try:
        return proxy_connect(lab, u.url(), INET_V4)
    except Exception:
        return None


# --- authentication and the runtime ---------------------------------------------------------------


def test_auth_hup_reload_keeps_connections(lab, usocksd, tmp_path):
    users = tmp_path / "users"
    write_users(users, {"alice": "wonder"})
    u = usocksd(["--auth-file", str(users), "--graceful-timeout", "20"])
    code, out, err = curl(lab, u, "--socks5-hostname", f"http://good.test:{TEST_PORT}/bytes/1000", auth="alice:wonder")
    assert code == 0 and out.split()[-2:] == ["200", "1000"], err
    with pytest.raises(ProxyError):
        proxy_connect(lab, u.url(auth=("alice", "nope")), INET_V4)
    s = raw_connect(lab, u)
    s.sendall(b"\x05\x01\x02")
    assert recv_exact(s, 2) == b"\x05\x02"
    s.sendall(b"\x01\x05alice\x04nope")
    assert recv_exact(s, 2) == b"\x01\x01"
    closed_by_peer(s)
    s.close()
    for twin in (b"wonder\0", b"wonder\0\0"):  # HMAC's zero padding must not make these match
        s = raw_connect(lab, u)
        s.sendall(b"\x05\x01\x02")
        assert recv_exact(s, 2) == b"\x05\x02"
        s.sendall(b"\x01\x05alice" + bytes([len(twin)]) + twin)
        assert recv_exact(s, 2) == b"\x01\x01"
        s.close()
    s = raw_connect(lab, u)
    assert socks4_raw(s, INET_V4, TEST_PORT, b"alice") == 0x5B  # SOCKS4 has no password
    s.close()
    u.wait_log("outcome=auth_failed", count=5)

    # A broken credentials file fails the reload, not the service.
    users.write_text("alice:wonder\n")
    u.send_signal(signal.SIGHUP)
    u.wait_log("reload failed, keeping generation 1: auth_file:", timeout=10)
    s = proxy_connect(lab, u.url(auth=("alice", "wonder")), INET_V4)
    s.close()

    held = proxy_connect(lab, u.url(auth=("alice", "wonder")), INET_V4)
    held.sendall(b"ECHO\n" + b"before reload;")
    old_workers = {p.pid for p in u.workers()}
    write_users(users, {"bob": "builder"})
    u.send_signal(signal.SIGHUP)
    u.wait_log("generation 2 starting", timeout=10)
    deadline = time.monotonic() + 10
    while not any("gen=2" in " ".join(p.cmdline()) and "conns=" in " ".join(p.cmdline()) for p in u.workers()):
        assert time.monotonic() < deadline, [p.cmdline() for p in u.workers()]
        time.sleep(0.05)
    with pytest.raises(ProxyError):
        proxy_connect(lab, u.url(auth=("alice", "wonder")), INET_V4)
    s = proxy_connect(lab, u.url(auth=("bob", "builder")), INET_V4)
    assert servers.get(s, 1000) == (servers.expected_sha(1000), 1000)
    s.close()
    # The connection opened before the reload is still served by its (retiring) worker.
    held.sendall(b" after reload")
    held.shutdown(socket.SHUT_WR)
    data = b"before reload; after reload"
    assert servers.recv_all(held).decode().split() == [servers.sha256(data), str(len(data))]
    held.close()
    u.wait_log("reload done", timeout=10)
    # The retiring worker leaves once its last connection (held) has ended.
    wait_for(lambda: not old_workers & {p.pid for p in u.workers()}, 10, "the old worker gone")
    deadline = time.monotonic() + 5  # titles are refreshed once a second
    while not " ".join(psutil.Process(u.pid).cmdline()).startswith("usocksd: master gen=2 workers=1 conns=0 total="):
        assert time.monotonic() < deadline, psutil.Process(u.pid).cmdline()
        time.sleep(0.1)
    assert all(" ".join(p.cmdline()).startswith("usocksd: worker 1/1 gen=2") for p in u.workers())


def test_runtime_parity_privilege_drop_pidfile_notify(lab, usocksd):
    workdir = lab.tempdir("usocksd")
    users = workdir / "users"
    write_users(users, USERS)
    pidfile = workdir / "usocksd.pid"
    sock_path = str(workdir / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(sock_path)
    os.chmod(sock_path, 0o666)  # the master sends READY=1 after dropping to nobody
    notify.settimeout(15)
    try:
        u = usocksd(["--auth-file", str(users), "--pidfile", str(pidfile), "--user", "nobody", "--group", "nogroup"],
                    workers=2, env={"NOTIFY_SOCKET": sock_path}, log_dir=workdir)
        ready = ""
        while "READY=1" not in ready:
            ready = notify.recv(4096).decode()
        assert f"MAINPID={u.pid}" in ready
        assert int(pidfile.read_text()) == u.pid
        nobody = pwd.getpwnam("nobody").pw_uid
        procs = [psutil.Process(u.pid)] + u.workers()
        assert len(procs) == 3 and all(p.uids().effective == nobody for p in procs)
        s = proxy_connect(lab, u.url(auth=("bob", "builder")), "good.test", rdns=True)
        assert servers.get(s, 1000) == (servers.expected_sha(1000), 1000)
        s.close()
        # A reload as nobody re-reads the credentials file.
        write_users(users, {"carol": "c4rol"})
        old = u.workers()
        u.send_signal(signal.SIGHUP)
        u.wait_log("reload done", timeout=15)
        # The workers share one listening socket here: a retiring worker serves what is queued
        # before it closes its copy (by design), with the old file; ask once they have gone.
        _, alive = psutil.wait_procs(old, timeout=15)
        assert not alive
        s = proxy_connect(lab, u.url(auth=("carol", "c4rol")), INET_V4)
        s.close()
        u.send_signal(signal.SIGTERM)
        assert u.proc.wait(10) == 0
        assert not pidfile.exists()
    finally:
        notify.close()


def test_gevent_resolvers_read_the_namespace_hosts_file(lab, usocksd):
    """The default (thread, libc) resolver and c-ares both honour /etc/netns/<ns>/hosts."""
    for resolver in ("thread", "ares"):
        u = usocksd(env={"GEVENT_RESOLVER": resolver})
        for name in ("good.test", "good6.test"):
            s = proxy_connect(lab, u.url(), name, rdns=True)
            assert servers.get(s, 100) == (servers.expected_sha(100), 100)
            s.close()
        with pytest.raises(ProxyError) as info:
            proxy_connect(lab, u.url(), "evil.test.nothere.test", rdns=True)
        assert info.value.error_code == 1
        u.stop()


# --- a wrong-password flood ------------------------------------------------------------------------


class WrongPasswordFlood(ThreadedLoad):
    """`width` connections at once from one client address, each sending a fresh wrong password,
    until stopped or `per_thread` attempts each (bounded in count and time)."""

    def __init__(self, lab, u, source: str, width: int = 32, per_thread: int = 40) -> None:
        super().__init__()
        self.lab, self.u, self.source = lab, u, source
        self.refused = 0
        self.errors = 0
        self.threads = [threading.Thread(target=self._run, args=(n, per_thread), daemon=True) for n in range(width)]

    def _run(self, n: int, per_thread: int) -> None:
        for attempt in range(per_thread):
            if self.stop.is_set():
                return
            try:
                s = raw_connect(self.lab, self.u, source=self.source, timeout=10)
                with s:
                    s.sendall(b"\x05\x01\x02")
                    assert recv_exact(s, 2) == b"\x05\x02"
                    pw = f"wrong-{n}-{attempt}".encode()
                    s.sendall(b"\x01\x05alice" + bytes([len(pw)]) + pw)
                    assert recv_exact(s, 2) == b"\x01\x01"
                    self.refused += 1
            except (OSError, EOFError):
                self.errors += 1


def peak_rss(proc: psutil.Process, stop: threading.Event, out: list[int]) -> None:
    while not stop.is_set():
        with contextlib.suppress(psutil.Error):
            out.append(proc.memory_info().rss)
        time.sleep(0.05)


@pytest.mark.parametrize("fail_limit", [0, 10])
def test_wrong_password_flood_keeps_real_logins_and_memory_bounded(lab, usocksd, extra_addresses, tmp_path,
                                                                   fail_limit):
    """32 connections from one client sending wrong passwords (the issue's figures: real logins at
    1.1-2.8 s, some past a 3 s negotiation_timeout, the worker at ~200 MB).  Eight uncached real
    logins from other clients during the flood must finish within negotiation_timeout and the worker
    must stay within a few hashes' memory; with auth_fail_limit the flooding client is cut off
    without hashing, logged once.  fail_limit=0 shows the bounded pool alone."""
    users = {f"user{n}": f"pass-{n}" for n in range(8)} | {"alice": "wonder"}
    path = tmp_path / "users"
    write_users(path, users)
    u = usocksd(["--auth-file", str(path), "--negotiation-timeout", "3", "--auth-fail-limit", str(fail_limit),
                 "--access-log", str(tmp_path / "access.log")])
    worker = u.worker()
    s = proxy_connect(lab, u.url(auth=("alice", "wonder")), INET_V4)  # warm: the relay's lazy parts exist
    s.close()
    rss_before = worker.memory_info().rss
    flood_source, real_sources = CLIENTS_V4[0], [CLIENT_V4] + CLIENTS_V4[1:8]
    latencies: dict[str, float] = {}
    failures: dict[str, str] = {}

    def real_login(n: int) -> None:
        started = time.monotonic()
        try:
            conn = proxy_connect(lab, u.url(auth=(f"user{n}", f"pass-{n}")), INET_V4, source=real_sources[n])
            latencies[f"user{n}"] = time.monotonic() - started
            with conn:
                assert servers.get(conn, 1000) == (servers.expected_sha(1000), 1000)
        except Exception as exc:  # reported below with the figures
            failures[f"user{n}"] = f"{type(exc).__name__}: {exc} after {time.monotonic() - started:.2f}s"

    samples: list[int] = []
    sampling = threading.Event()
    sampler = threading.Thread(target=peak_rss, args=(worker, sampling, samples), daemon=True)
    sampler.start()
    with WrongPasswordFlood(lab, u, flood_source) as flood:
        flood_started = time.monotonic()
        time.sleep(0.5)  # the flood is under way
        logins = [threading.Thread(target=real_login, args=(n,)) for n in range(8)]
        for t in logins:
            t.start()
        for t in logins:
            t.join(30)
        # Long enough past negotiation_timeout that every flooding thread tries again.
        time.sleep(max(0.5, flood_started + 5 - time.monotonic()))
    sampling.set()
    sampler.join(5)
    peak = max(samples + [worker.memory_info().rss])
    print(f"fail_limit={fail_limit}: real logins {sorted(round(v, 3) for v in latencies.values())} s, "
          f"failed {failures}; flood refused={flood.refused} errors={flood.errors}; worker RSS "
          f"{rss_before / MiB:.1f} MiB before, peak {peak / MiB:.1f} MiB")
    assert not failures
    assert max(latencies.values()) < 3.0  # liveness: within negotiation_timeout
    assert peak - rss_before < 64 * MiB  # a few 16 MiB hashes at most, not one per connection
    assert flood.refused > 0 and u.proc.poll() is None and worker.is_running()
    text = u.log_text()
    if fail_limit:
        assert text.count(f"client {flood_source}: {fail_limit} failed logins within 60s") == 1
        assert "too many failed logins from" not in text  # logged once, by the limit
        assert "failed logins within" not in text.split(f"{fail_limit} failed logins within")[1]
        access = (tmp_path / "access.log").read_text()
        assert f"client={flood_source}:" in access and "outcome=auth_limited" in access
    else:
        assert "failed logins within" not in text


def test_distributed_wrong_password_flood_keeps_a_good_clients_uncached_logins_within_a_second(lab, usocksd,
                                                                                                 tmp_path):
    """100 source addresses, two connections each, sending new wrong passwords as fast as they are
    answered (the issue: a good client's first login at 2.1 s median, one past a 3 s
    negotiation_timeout; on main 3 of 5 failed here).  A good client logging in as a new user each
    time (never cached) finishes within 1 s at the 99th percentile (of 12 logins: their slowest),
    and the worker stays under 64 MiB."""
    users = {f"user{n}": f"pass-{n}" for n in range(17)}
    path = tmp_path / "users"
    write_users(path, users | {"alice": "wonder"})
    u = usocksd(["--auth-file", str(path), "--negotiation-timeout", "3", "--access-log",
                 str(tmp_path / "access.log")])
    worker = u.worker()
    quiet = good_logins(lab, u.port, dict(list(users.items())[:5]), CLIENT_V4)
    # 1 s on a machine that hashes a login in 0.1 s (bench/README); longer where other work
    # slows every hash down (the suite shares its CPUs), so the bound is about the flood.
    bound = max(1.0, 10 * percentile(quiet, 0.5))
    with flood_addresses(lab) as sources, PeakRSS(worker) as rss:
        with LoginFlood(lab, u.port, sources, per_source=2, seconds=14) as flood:
            # Every source has tried, failed and is waiting again.
            settled = time.monotonic() + 2.0
            while flood.refused < len(sources) and time.monotonic() < settled:
                time.sleep(0.05)
            took = good_logins(lab, u.port, dict(list(users.items())[5:]), CLIENT_V4, until=time.monotonic() + 9)
    p50, p99 = percentile(took, 0.5), percentile(took, 0.99)
    print(f"{len(took)} good logins under the flood: p50 {p50:.3f}s p99 {p99:.3f}s (bound {bound:.2f}s, "
          f"without the flood {sorted(round(t, 3) for t in quiet)}); flood answered {flood.refused}, errors "
          f"{flood.errors}; worker RSS peak {rss.peak / MiB:.1f} MiB")
    assert len(took) >= 8
    assert p99 < bound, sorted(took)
    assert rss.peak < 64 * MiB
    access = (tmp_path / "access.log").read_text()
    assert "outcome=auth_failed" in access and "outcome=auth_limited" in access
    assert u.proc.poll() is None and worker.is_running() and "Traceback" not in u.log_text()


# --- listening-socket options ------------------------------------------------------------------------


def _server_side(lab, port: int, state: str) -> int:
    """Connections to usocksd's `port` in TCP `state` on the gw (ss's state names)."""
    out = lab.run(lab.gw, ["ss", "-Htn", "state", state, f"sport = :{port}"]).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def test_defer_accept_holds_a_silent_client_in_the_kernel_until_it_speaks(lab, usocksd):
    """TCP_DEFER_ACCEPT (on by default): the client's handshake completes on its side, but the
    server keeps the connection in SYN_RECV, out of the accept queue, until the greeting arrives."""
    u = usocksd(["--defer-accept", "30"])
    s = raw_connect(lab, u)
    try:
        wait_for(lambda: _server_side(lab, u.port, "syn-recv") == 1, 5, "the silent connection held in SYN_RECV")
        assert _server_side(lab, u.port, "established") == 0
        s.sendall(b"\x05\x01\x00")
        assert recv_exact(s, 2) == b"\x05\x00"
        assert _server_side(lab, u.port, "syn-recv") == 0
    finally:
        s.close()
    off = usocksd(["--defer-accept", "0"])
    s = raw_connect(lab, off)
    try:
        wait_for(lambda: _server_side(lab, off.port, "established") == 1, 5, "the silent connection established")
        assert _server_side(lab, off.port, "syn-recv") == 0
    finally:
        s.close()


def test_tcp_fastopen_serves_data_carried_in_the_syn(lab, usocksd):
    """With the gw namespace's net.ipv4.tcp_fastopen server bit set, curl's second
    --tcp-fastopen connection carries its SOCKS greeting in the SYN and is served."""
    before_sysctl = lab.run(lab.gw, ["sysctl", "-n", "net.ipv4.tcp_fastopen"]).stdout.strip()
    lab.sysctl(lab.gw, "net.ipv4.tcp_fastopen=3")
    try:
        u = usocksd(["--tcp-fastopen", "16"])
        passive = lab.tcp_ext(lab.gw, "TCPFastOpenPassive")
        for i in range(3):  # the first one fetches the cookie
            res = lab.run(lab.client, ["curl", "-sS", "-4", "--max-time", "20", "--tcp-fastopen", "-o", "/dev/null",
                                       "-w", "%{http_code} %{size_download}", "--socks5", f"{GW_V4}:{u.port}",
                                       f"http://{INET_V4}:{TEST_PORT}/bytes/1000/tfo{i}"], check=False, timeout=30)
            assert (res.returncode, res.stdout) == (0, "200 1000"), res.stderr
        assert lab.tcp_ext(lab.gw, "TCPFastOpenPassive") >= passive + 1
        assert "has no effect" not in u.log_text()
    finally:
        lab.sysctl(lab.gw, f"net.ipv4.tcp_fastopen={before_sysctl}")


def test_tcp_fastopen_without_the_server_bit_is_logged_once(lab, usocksd):
    lab.sysctl(lab.gw, "net.ipv4.tcp_fastopen=1")
    u = usocksd(["--tcp-fastopen", "16"], workers=2)
    assert u.log_text().count("net.ipv4.tcp_fastopen lacks the server bit (2)") == 1
    s = proxy_connect(lab, u.url(), INET_V4)
    assert servers.get(s, 100) == (servers.expected_sha(100), 100)
    s.close()
