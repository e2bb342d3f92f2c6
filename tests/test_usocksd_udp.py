"""usocksd's UDP ASSOCIATE end to end: our small RFC 1928 UDP client in the client namespace,
usocksd in the gw namespace, dnsmasq and recording UDP listeners in the "Internet" namespace.

What reached where (and from which source address) is decided by the recorders,
never by usocksd's own log; the log is checked for its line only.
"""

from __future__ import annotations

import signal
import socket
import time

import pytest

from tests import usocksd_fixtures as uf
from tests.lab.dns import exchange, start_dnsmasq
from tests.lab.dns import query as dns_query
from tests.lab.netns import (
    CLIENT_V4,
    CLIENT_V6,
    GW_EXT_V4,
    GW_V4,
    GW_V6,
    INET2_V4,
    INET_V4,
    INET_V6,
)
from tests.lab.recorder import recording as tcp_recording
from tests.lab.services import pid_in, stop_master
from tests.lab.socks5_udp import Socks5Udp
from tests.lab.udp import recording
from tests.test_metrics import gw_scrape
from tests.test_runtime import wait_for
from tests.test_usocksd import extra_addresses, gw_names, usocksd  # noqa: F401 (fixtures)
from tests.usocksd_fixtures import (
    CLIENTS_V4,
    EGRESS_V4,
    EGRESS_V6,
    closed_by_peer,
    fd_count_settles,
    raw_connect,
    recv_exact,
)
from transocks.core.netutil import Endpoint
from transocks.usocksd.credentials import hash_password
from transocks.usocksd.egress import rendezvous
from transocks.wire import socks5

pytestmark = pytest.mark.netns

REC_PORT = 9353
TCP_REC_PORT = 9354
DNS_RECORDS = {"www.example.test": ["203.0.113.80", "2001:db8:2::80"], "mail.example.test": ["203.0.113.25"]}


@pytest.fixture(scope="module")
def dns(lab):
    server = start_dnsmasq(lab, DNS_RECORDS, log_queries=False)
    try:
        yield server
    finally:
        server.service.stop(lab)


def associate(lab, u, v6: bool = False, **kw) -> Socks5Udp:
    a = Socks5Udp(lab, lab.client, (GW_V6 if v6 else GW_V4, u.port), **kw)
    assert a.rep == 0
    return a


def relayed(a: Socks5Udp, payload: bytes) -> None:
    """Send `payload` to the recorder at INET_V4 through association `a`; an answer comes back."""
    a.send(INET_V4, REC_PORT, payload)
    assert a.recv() is not None


# --- DNS through usocksd, byte-exact -------------------------------------------------------


@pytest.mark.parametrize("v6_proxy, server, qtype", [
    (False, INET_V4, "A"),
    (True, INET_V6, "AAAA"),
    (False, INET_V6, "A"),  # an IPv4 association carrying IPv6 datagrams
    (True, INET_V4, "AAAA"),  # and the other way round
])
def test_dns_query_through_usocksd_is_byte_exact(lab, usocksd, dns, v6_proxy, server, qtype):
    u = usocksd()
    query = dns_query("www.example.test", qtype)
    reference = exchange(lab, lab.gw, server, query)[0]
    assert reference[:2] == query[:2] and len(reference) > len(query)
    a = associate(lab, u, v6=v6_proxy)
    try:
        # The relay address is where the client's TCP connection reached usocksd.
        assert a.bound.host == (GW_V6 if v6_proxy else GW_V4) and a.bound.port
        a.send(server, 53, query)
        got = a.recv()
        assert got is not None, "no answer through usocksd"
        source, answer = got
        assert source == Endpoint(server, 53)
        assert answer == reference
    finally:
        a.close()
    line = u.wait_log("proto=udp")
    assert "datagrams_sent=1 " in line and "datagrams_received=1 " in line and "dests=1 " in line and "outcome=ok" in line
    assert "upstream=-" not in line
    assert f"dest={server}:53" in line or f"dest=[{server}]:53" in line
    assert "Traceback" not in u.log_text()


def test_dns_server_by_name_is_resolved_once_per_association(lab, usocksd, dns):
    """ATYP 3: good.test resolves (gw hosts file) to INET_V4, where dnsmasq answers."""
    u = usocksd()
    query = dns_query("mail.example.test")
    reference = exchange(lab, lab.gw, INET_V4, query)[0]
    a = associate(lab, u)
    try:
        for _ in range(3):
            a.send("good.test", 53, query)
            got = a.recv()
            assert got is not None and got == (Endpoint(INET_V4, 53), reference)
    finally:
        a.close()
    u.wait_log("datagrams_sent=3 ", "datagrams_received=3 ")


# --- what must never reach the Internet ----------------------------------------------------


def test_denied_destinations_receive_nothing(lab, usocksd, gw_names):
    """Address, name and port rules, the safety defaults (loopback, this host) and the loop guard
    (usocksd's own listen address): judged by recorders at each of those addresses."""
    u = usocksd(["--deny-dest", INET2_V4, "--deny-dest", ".blocked.test", "--deny-dest", f"[{INET_V6}]:{REC_PORT}"])
    with recording(lab, lab.inet, [(INET_V4, REC_PORT), (INET2_V4, REC_PORT), (INET_V6, REC_PORT)]) as rec, \
            recording(lab, lab.gw, [(GW_V4, u.port), (GW_EXT_V4, REC_PORT), ("127.0.0.1", REC_PORT)]) as own:
        a = associate(lab, u)
        try:
            a.send(INET2_V4, REC_PORT, b"denied by address")
            a.send("blocked.test", REC_PORT, b"denied by name")  # resolves to INET_V4: never looked up
            a.send(INET_V6, REC_PORT, b"denied by port")
            a.send("evil.test", REC_PORT, b"a name for loopback")
            a.send("127.0.0.1", REC_PORT, b"loopback")
            a.send(GW_EXT_V4, REC_PORT, b"this host")
            a.send(GW_V4, u.port, b"usocksd itself")
            a.send("good.test", REC_PORT, b"allowed")  # by name: judged after evil.test
            got = a.recv()
            assert got is not None and got[1].endswith(b" allowed")
            time.sleep(0.3)
            assert [d.data for d in rec.received] == [b"allowed"]
            assert own.received == []
        finally:
            a.close()
    line = u.wait_log("proto=udp")
    assert "drops=not_allowed:7" in line


def test_datagrams_from_a_foreign_source_are_not_forwarded(lab, usocksd, extra_addresses):
    u = usocksd()
    with recording(lab, lab.inet, [(INET_V4, REC_PORT)]) as rec:
        a = associate(lab, u)
        with lab.netns(lab.client):
            other_port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            other_addr = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            relayed(a, b"first fixes the port")
            wrapped = b"\0\0\0\x01" + socket.inet_aton(INET_V4) + REC_PORT.to_bytes(2, "big")
            other_addr.bind((CLIENTS_V4[0], 0))
            other_addr.sendto(wrapped + b"from another address", a.relay)
            other_port.bind((CLIENT_V4, 0))
            other_port.sendto(wrapped + b"from another port", a.relay)
            a.send_raw(wrapped + b"second")
            assert a.recv() is not None
            time.sleep(0.3)
            assert [d.data for d in rec.received] == [b"first fixes the port", b"second"]
        finally:
            a.close()
            other_port.close()
            other_addr.close()
    assert "drops=foreign:2" in u.wait_log("proto=udp")


def test_requested_port_is_the_only_one_taken(lab, usocksd):
    u = usocksd()
    with lab.netns(lab.client):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((CLIENT_V4, 0))
    port = s.getsockname()[1]
    s.close()
    with recording(lab, lab.inet, [(INET_V4, REC_PORT)]) as rec:
        a = associate(lab, u, request=Endpoint(CLIENT_V4, port + 1))  # names a port it will not send from
        try:
            a.send(INET_V4, REC_PORT, b"from the wrong port")
            assert a.recv(0.5) is None
            assert rec.received == []
        finally:
            a.close()
    assert "drops=foreign:1" in u.wait_log("proto=udp")


def test_fragments_are_dropped_and_counted(lab, usocksd):
    u = usocksd()
    with recording(lab, lab.inet, [(INET_V4, REC_PORT)]) as rec:
        a = associate(lab, u)
        try:
            a.send(INET_V4, REC_PORT, b"fragment 1", frag=1)
            a.send(INET_V4, REC_PORT, b"last fragment", frag=0x81)
            relayed(a, b"whole")
            time.sleep(0.2)
            assert [d.data for d in rec.received] == [b"whole"]
        finally:
            a.close()
    assert "drops=fragment:2" in u.wait_log("proto=udp")


def test_replies_only_from_where_the_client_sent(lab, usocksd):
    """Address and port-dependent filtering: a datagram to the egress socket from another
    port of the same host, or another host, does not reach the client."""
    u = usocksd()
    with recording(lab, lab.inet, [(INET_V4, REC_PORT)]) as rec:
        a = associate(lab, u)
        try:
            relayed(a, b"hello")
            egress = rec.received[0]
            for host in (INET_V4, INET2_V4):
                with lab.netns(lab.inet):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                with s:
                    s.bind((host, 0))
                    s.sendto(b"unsolicited", (egress.peer, egress.peer_port))
            assert a.recv(0.5) is None
            a.send(INET_V4, REC_PORT, b"again")  # its echo is read after them, from the same socket
            got = a.recv()
            assert got is not None and got[1].endswith(b" again")
        finally:
            a.close()
    assert "drops=unsolicited:2" in u.wait_log("proto=udp")


def test_rate_limit_drops_the_excess(lab, usocksd):
    u = usocksd(["--udp-max-rate", "5"])
    with recording(lab, lab.inet, [(INET_V4, REC_PORT)], echo=False) as rec:
        a = associate(lab, u)
        try:
            for i in range(60):
                a.send(INET_V4, REC_PORT, b"%d" % i)
            time.sleep(0.5)
            got = len(rec.received)
        finally:
            a.close()
    line = u.wait_log("proto=udp")
    assert 5 <= got < 60
    assert f"drops=rate:{60 - got}" in line


# --- egress address: TCP and UDP of one client leave from one address ---------------------


@pytest.mark.parametrize("v6", [False, True])
def test_tcp_and_udp_of_one_client_leave_from_one_address(lab, usocksd, extra_addresses, v6):
    pool = EGRESS_V6 if v6 else EGRESS_V4
    dest = INET_V6 if v6 else INET_V4
    client = CLIENT_V6 if v6 else CLIENT_V4
    u = usocksd([f"--egress-address={a}" for a in EGRESS_V4[:2] + EGRESS_V6[:2]])
    expected = rendezvous(client, pool[:2])
    with tcp_recording(lab, lab.inet, [(dest, TCP_REC_PORT)]) as tcp, \
            recording(lab, lab.inet, [(dest, REC_PORT)]) as udp:
        s = raw_connect(lab, u, v6=v6, source=client)  # the client has several addresses here
        assert uf.socks5_raw(s, dest, TCP_REC_PORT) == 0
        s.sendall(b"x")
        assert recv_exact(s, 5) == b"seen "
        s.close()
        a = associate(lab, u, v6=v6, source=client)
        try:
            a.send(dest, REC_PORT, b"udp")
            assert a.recv() is not None
        finally:
            a.close()
        assert [h.peer for h in tcp.hits] == [expected]
        assert [d.peer for d in udp.received] == [expected]
    shown = f"[{expected}]" if v6 else expected
    assert f"upstream={shown}:" in u.wait_log("proto=udp")


# --- the association's end -----------------------------------------------------------------


def test_association_ends_with_its_tcp_connection(lab, usocksd):
    u = usocksd()
    with recording(lab, lab.inet, [(INET_V4, REC_PORT)]) as rec:
        a = associate(lab, u)
        relayed(a, b"before")
        a.control.close()
        u.wait_log("proto=udp")
        a.send(INET_V4, REC_PORT, b"after")  # to a relay socket that is closed now
        time.sleep(0.3)
        a.udp.close()
        assert [d.data for d in rec.received] == [b"before"]
    assert "outcome=ok" in u.wait_log("proto=udp")


def test_idle_association_expires_and_closes_its_tcp(lab, usocksd):
    u = usocksd(["--udp-idle-timeout", "1"])
    a = associate(lab, u)
    try:
        a.send(INET_V4, 9, b"discard")  # nothing answers: no datagram comes back
        assert closed_by_peer(a.control, within=10) < 10
    finally:
        a.close()
    line = u.wait_log("outcome=idle_timeout")
    assert "proto=udp" in line and "datagrams_sent=1" in line


def test_client_that_associates_and_never_sends(lab, usocksd):
    u = usocksd(["--udp-idle-timeout", "1"])
    a = associate(lab, u)
    try:
        assert closed_by_peer(a.control, within=10) < 10
    finally:
        a.close()
    line = u.wait_log("outcome=idle_timeout")
    assert "dests=0" in line and "datagrams_sent=0" in line and "upstream=-" in line


def test_descriptors_back_to_baseline_after_200_associations(lab, usocksd):
    u = usocksd()
    worker = u.worker()
    with recording(lab, lab.inet, [(INET_V4, REC_PORT), (INET_V6, REC_PORT)], echo=False) as rec:
        warm = associate(lab, u)
        warm.send(INET_V4, REC_PORT, b"warm")
        warm.close()
        u.wait_log("proto=udp")
        baseline = worker.num_fds()
        for i in range(200):
            a = associate(lab, u, v6=bool(i % 2))
            if i % 3:
                a.send(INET_V4, REC_PORT, b"v4")
                a.send(INET_V6, REC_PORT, b"v6")
            if i % 4 == 0:  # the client vanishes: a reset instead of a close
                a.control.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            a.close()
        u.wait_log("proto=udp", count=201, timeout=30)
        assert len(rec.received) > 0
    assert fd_count_settles(worker, baseline, timeout=10) <= baseline


# --- hostile requests and datagrams ------------------------------------------------------


def test_hostile_requests_get_a_clean_end(lab, usocksd):
    u = usocksd()
    s = raw_connect(lab, u)  # truncated: the request stops inside its address
    s.sendall(b"\x05\x01\x00")
    assert recv_exact(s, 2) == b"\x05\x00"
    s.sendall(b"\x05\x03\x00\x01\xc0\x00")
    s.shutdown(socket.SHUT_WR)
    closed_by_peer(s)
    s.close()
    s = raw_connect(lab, u)  # bad ATYP
    s.sendall(b"\x05\x01\x00\x05\x03\x00\x09" + bytes(6))
    assert recv_exact(s, 2) == b"\x05\x00"
    assert recv_exact(s, 10)[:2] == b"\x05\x08"
    closed_by_peer(s)
    s.close()
    s = raw_connect(lab, u)  # a huge (255-byte) name where the client's address goes: not used
    name = b"x" * 255
    s.sendall(b"\x05\x01\x00\x05\x03\x00\x03\xff" + name + b"\0\0")
    assert recv_exact(s, 2) == b"\x05\x00"
    assert recv_exact(s, 4)[:2] == b"\x05\x00"
    recv_exact(s, 6)
    s.close()
    text = u.wait_log("outcome=protocol_error", "address type 0x09 not supported", "proto=udp")
    assert "Traceback" not in text


def test_hostile_datagrams_are_dropped_and_the_association_goes_on(lab, usocksd):
    u = usocksd()
    with recording(lab, lab.inet, [(INET_V4, REC_PORT)]) as rec:
        a = associate(lab, u)
        try:
            a.send(INET_V4, REC_PORT, b"first")  # fixes the client's port
            assert a.recv() is not None
            port = REC_PORT.to_bytes(2, "big")
            for datagram in (
                b"", b"\0", b"\0\0\0", b"\0\0\0\x01\xcb\x00",  # truncated headers
                b"\0\0\0\x09" + bytes(6),  # bad ATYP
                b"\1\0\0\x01" + socket.inet_aton(INET_V4) + port,  # RSV not zero
                b"\0\0\0\x03\0" + port,  # an empty name
                b"\0\0\0\x03\xf3" + b".".join([b"a" * 60] * 4) + port + b"huge name",  # a name no one resolves
                b"\0\0\0\x03\x05a b.c" + port,  # not a host name
                b"\0\0\0\x01" + socket.inet_aton(INET_V4) + b"\0\0",  # port 0
            ):
                a.send_raw(datagram)
            a.send("good.test", REC_PORT, b"last")  # by name: judged after the huge one
            assert a.recv() is not None
            assert [d.data for d in rec.received] == [b"first", b"last"]
        finally:
            a.close()
    line = u.wait_log("proto=udp")
    assert "drops=malformed:9,unresolved:1" in line
    assert "Traceback" not in u.log_text()


def test_udp_false_answers_07(lab, usocksd):
    u = usocksd(["--udp", "false"])
    s = raw_connect(lab, u)
    assert uf.socks5_raw(s, "0.0.0.0", 0, cmd=3) == 7
    closed_by_peer(s)
    s.close()
    u.wait_log("command UDP ASSOCIATE not supported")


def test_metrics_count_associations_datagrams_and_drops(lab, usocksd, dns, tmp_path):
    port = 9469
    u = usocksd(["--metrics-listen", f"127.0.0.1:{port}"])
    a = associate(lab, u)
    try:
        a.send(INET_V4, 53, b"fragment", frag=1)  # read before the query: counted once the answer is here
        a.send(INET_V4, 53, dns_query("www.example.test"))
        assert a.recv() is not None
    finally:
        a.close()
    u.wait_log("proto=udp")
    expected = {'usocksd_udp_associations_total{outcome="ok"}': 1,
                'usocksd_udp_datagrams_total{direction="sent"}': 1,
                'usocksd_udp_datagrams_total{direction="received"}': 1,
                'usocksd_udp_dropped_total{reason="fragment"}': 1,
                'usocksd_connections_total{outcome="ok"}': 1}
    m = wait_for(lambda: (s := gw_scrape(lab, port)) and all(s.get(k) == v for k, v in expected.items()) and s,
                 10, "udp counted")
    assert m['usocksd_udp_bytes_total{direction="received"}'] > m['usocksd_udp_bytes_total{direction="sent"}'] > 0


def test_reload_keeps_live_associations_until_the_graceful_timeout(lab, usocksd):
    """HUP: the old worker stops taking connections but keeps its associations relaying (their
    sockets are its own) until they end or graceful_timeout passes, then resets them
    (outcome=shutdown); new associations go to the new worker."""
    u = usocksd(["--graceful-timeout", "2"])
    with recording(lab, lab.inet, [(INET_V4, REC_PORT)]) as rec:
        a = associate(lab, u)
        try:
            relayed(a, b"before")
            u.send_signal(signal.SIGHUP)
            u.wait_log("reload done")
            relayed(a, b"during")
            b = associate(lab, u)
            relayed(b, b"new worker")
            b.close()
            assert closed_by_peer(a.control, within=10) < 10
            line = u.wait_log("outcome=shutdown")
            assert "proto=udp" in line and "datagrams_sent=2" in line
        finally:
            a.close()
        assert [d.data for d in rec.received] == [b"before", b"during", b"new worker"]


def test_term_resets_live_associations_each_with_its_line(lab, usocksd):
    u = usocksd()
    with recording(lab, lab.inet, [(INET_V4, REC_PORT)]):
        a = associate(lab, u)
        try:
            relayed(a, b"live")
            assert "proto=udp" not in u.log_text()  # open: no line yet
            u.stop(signal.SIGTERM)
            line = u.wait_log("outcome=shutdown")
            assert "proto=udp" in line and "datagrams_sent=1 " in line and "datagrams_received=1 " in line
            assert closed_by_peer(a.control, within=5) < 5
        finally:
            a.close()


def test_association_after_a_login_names_its_user(lab, usocksd, tmp_path):
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('wonder')}\n")
    users.chmod(0o644)
    u = usocksd(["--auth-file", str(users)])
    with recording(lab, lab.inet, [(INET_V4, REC_PORT)]) as rec:
        with lab.netns(lab.client):
            s = socket.create_connection((GW_V4, u.port), timeout=10)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendall(b"\x05\x01\x02")
            assert recv_exact(s, 2) == b"\x05\x02"
            s.sendall(socks5.userpass_request("alice", "wonder"))
            assert recv_exact(s, 2) == b"\x01\x00"
            s.sendall(socks5.udp_associate_request(Endpoint("0.0.0.0", 0)))
            reply = recv_exact(s, 10)
            assert reply[:4] == b"\x05\x00\x00\x01"
            relay = (socket.inet_ntoa(reply[4:8]), int.from_bytes(reply[8:10], "big"))
            udp.bind((CLIENT_V4, 0))
            udp.sendto(socks5.udp_datagram(socks5.encode_address(Endpoint(INET_V4, REC_PORT)), b"logged in"), relay)
            udp.settimeout(5)
            assert udp.recv(4096).endswith(b" logged in")
            assert [d.data for d in rec.received] == [b"logged in"]
        finally:
            s.close()
            udp.close()
    line = u.wait_log("proto=udp")
    assert "user=alice" in line


def test_usr2_upgrade_keeps_live_associations_until_the_old_master_drains(lab, usocksd, tmp_path):
    """USR2: the new master serves new associations at once; the old worker keeps relaying its
    own until graceful_timeout, then resets them (outcome=shutdown) and the old master leaves."""
    pidfile = tmp_path / "usocksd.pid"
    u = usocksd(["--pidfile", str(pidfile), "--graceful-timeout", "3"])
    new_pid = None
    with recording(lab, lab.inet, [(INET_V4, REC_PORT)]) as rec:
        a = associate(lab, u)
        try:
            relayed(a, b"before")
            u.send_signal(signal.SIGUSR2)
            new_pid = wait_for(lambda: (p := pid_in(pidfile)) != u.pid and p, 20, "new master's pidfile")
            u.wait_log("workers ready (generation 1)", count=2, timeout=20)
            b = associate(lab, u)
            relayed(b, b"new master")
            b.close()
            relayed(a, b"during")
            assert closed_by_peer(a.control, within=15) < 15
            assert u.proc.wait(15) == 0  # the old master drained and left
        finally:
            a.close()
            if new_pid:
                stop_master(new_pid)
        assert sorted(d.data for d in rec.received) == sorted([b"before", b"new master", b"during"])
    text = u.wait_log("outcome=shutdown")
    lines = [ln for ln in text.splitlines() if "proto=udp" in ln]
    assert any("outcome=shutdown" in ln and "datagrams_sent=2 " in ln for ln in lines), lines
    assert any("outcome=ok" in ln and "datagrams_sent=1 " in ln for ln in lines), lines
