"""UDP end to end (issue 21, item 5 and its Done-when): real clients and servers in namespaces.

The first tests are the fixtures' own, through the kernel NAT transocks replaces (a gw that
masquerades the client network in a lab of its own): `dig` against dnsmasq, an NTP exchange
with chronyd, `iperf3 -u` with its loss counted, and the UDP recorder's view of who sent what.
They prove the fixtures (and are the bench's baseline), so they pass on any tree.

The rest run in the session lab, which has no NAT at all: the client host's own UDP goes
through `transocks rules --apply` (TPROXY) -> transocks (udp = true) -> usocksd's UDP ASSOCIATE.
Every verdict is what reached which address: dnsmasq's query log, chronyd's client list,
iperf3's own report, the recorders, SYN counters; the access logs only for the requirement
that every session is in them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests import usocksd_fixtures as uf
from tests.conftest import LOG_TAIL
from tests.lab import rulesets
from tests.lab.dns import Dnsmasq, answer_addresses, dig, exchange, query, start_dnsmasq
from tests.lab.names import hosts_overlay
from tests.lab.netns import (
    CLIENT_NET_V6,
    CLIENT_V4,
    CLIENT_V6,
    GW_EXT_V6,
    GW_INET_IF,
    GW_NAT_V4,
    INET2_V4,
    INET2_V6,
    INET_V4,
    INET_V6,
    Lab,
    require_root_and_tools,
)
from tests.lab.ntp import Chronyd, ntp_query, start_chronyd
from tests.lab.recorder import SynCount, recording
from tests.lab.services import Service, pid_in, start_iperf3, start_transocks, stop_master
from tests.lab.tls import Certs, make_certs, start_s_server
from tests.lab.udp import UdpRecorder, iperf3_udp, port_unreachable_after, send_and_receive
from tests.lab.upstreams import Upstream, start_usocksd
from tests.test_exits import FIELD
from tests.test_runtime import wait_for
from transocks.core.names import format_hostport
from transocks.usocksd.egress import rendezvous

pytestmark = pytest.mark.netns

UDP_TOOLS = ("dig", "dnsmasq", "chronyd", "chronyc", "iperf3", "setpriv")
NAME = "www.example"
IPERF_PORT = 5201
ECHO_PORT = 7000
TCP_REC_PORT = 7001


def _unavailable() -> str | None:
    missing = [t for t in UDP_TOOLS if shutil.which(t) is None]
    return require_root_and_tools() or (f"UDP lab needs missing tools: {', '.join(missing)}" if missing else None)


def _need_lab() -> None:
    why = _unavailable()
    if why:
        if os.environ.get("TRANSOCKS_LAB_REQUIRED", "") not in ("", "0"):
            pytest.fail(f"TRANSOCKS_LAB_REQUIRED is set but: {why}")
        pytest.skip(why)


class Internet:
    """The inet namespace's UDP servers: dnsmasq, chronyd, iperf3 and a recording echo."""

    def __init__(self, lab: Lab) -> None:
        self.dns: Dnsmasq = start_dnsmasq(lab, {NAME: [INET_V4, INET_V6]})
        self.ntp: Chronyd = start_chronyd(lab)
        self.iperf: Service = start_iperf3(lab, IPERF_PORT)
        self.echo = UdpRecorder(lab, lab.inet, [(INET_V4, ECHO_PORT), (INET_V6, ECHO_PORT), (INET2_V4, ECHO_PORT)])
        lab.add_cleanup(self.echo.close)


@pytest.fixture(scope="module")
def nat_lab() -> Iterator[tuple[Lab, Internet]]:
    """A lab of its own whose gw masquerades the client network (v4 to GW_NAT_V4, v6 to its
    own inet-side address): the kernel NAT baseline."""
    _need_lab()
    with Lab.create() as lab:
        lab.masquerade(to_source=GW_NAT_V4)
        lab.masquerade(sources=(CLIENT_NET_V6,))
        yield lab, Internet(lab)


@pytest.mark.parametrize("server,qtype,nat", [(INET_V4, "A", GW_NAT_V4), (INET_V6, "AAAA", GW_EXT_V6)])
def test_nat_dig_reaches_dnsmasq_from_the_nat_address(nat_lab, server, qtype, nat):
    lab, net = nat_lab
    before = len(net.dns.queries())
    got = dig(lab, lab.client, server, NAME, qtype)
    assert got.status == "NOERROR", got.stdout
    assert got.answers == [server]
    seen = net.dns.wait_queries(before + 1)[before:]
    assert [(q.source, q.qtype, q.name) for q in seen] == [(nat, qtype, NAME)]


def test_nat_raw_answer_is_the_direct_answer_from_the_server_address(nat_lab):
    """What `exchange` compares byte for byte in the end-to-end tests: the same query (same id)
    answered through the path and straight from inside the inet namespace."""
    lab, _ = nat_lab
    q = query(NAME, "A", 0x5A5A)
    through, peer = exchange(lab, lab.client, INET_V4, q)
    direct, _ = exchange(lab, lab.inet, INET_V4, q)
    assert through == direct
    assert peer == (INET_V4, 53)
    assert answer_addresses(through) == [INET_V4]


@pytest.mark.parametrize("server,nat", [(INET_V4, GW_NAT_V4), (INET_V6, GW_EXT_V6)])
def test_nat_ntp_exchange_is_answered_and_seen_by_chronyd(nat_lab, server, nat):
    lab, net = nat_lab
    before = net.ntp.clients(lab).get(nat)
    got = ntp_query(lab, lab.client, server)
    assert got.returncode == 0 and got.offset is not None, got.output
    after = net.ntp.clients(lab)[nat]
    assert after.requests > (before.requests if before else 0)


def test_nat_iperf3_udp_reports_its_loss(nat_lab):
    lab, _ = nat_lab
    got = iperf3_udp(lab, lab.client, INET_V4, IPERF_PORT, rate="10M", seconds=1)
    assert got.packets > 0 and 0 <= got.lost <= got.packets
    assert got.peers == (GW_NAT_V4,)


@pytest.mark.parametrize("host,nat", [(INET_V4, GW_NAT_V4), (INET_V6, GW_EXT_V6)])
def test_nat_udp_recorder_sees_the_nat_address_and_answers_from_its_own(nat_lab, host, nat):
    lab, net = nat_lab
    reply, peer = send_and_receive(lab, lab.client, (host, ECHO_PORT), b"ping")
    assert peer == (host, ECHO_PORT)
    assert reply.startswith(f"seen {nat} ".encode()) and reply.endswith(b" ping")
    assert net.echo.at(host, ECHO_PORT)[-1].peer == nat


def test_nat_closed_port_gives_port_unreachable(nat_lab):
    """The ICMP a kernel-rejected port 443 must produce, as the client sees it (ECONNREFUSED)."""
    lab, _ = nat_lab
    port_unreachable_after(lab, lab.client, (INET_V4, 443))  # raises unless ECONNREFUSED comes


# --- end to end: no NAT anywhere, TPROXY -> transocks -> usocksd -----------------------------
#
# The session lab has no NAT: without transocks a client's datagram would be routed as it is and
# reach the server from the client's own address.  transocks runs in the client namespace with
# `udp = true`, diverted by `transocks rules --apply` there (the host's own traffic), through
# usocksd on the gw with a pool of two egress addresses per family; the servers say where each
# request came from: dnsmasq's query log, chronyd's client list, iperf3's report, the recorders.

E2E_PORT = 1191
E2E_IPERF_PORT = 5311
IDLE = 3  # transocks' udp_idle_timeout (port 53: half of it), so sessions end within a test
EDGE_IDLE = 2 * IDLE  # usocksd's: longer, so a session ends at transocks (outcome ok), which ends its association
BLOCKED = "blocked.example"
NAMES = {NAME: [INET_V4, INET_V6], BLOCKED: [INET2_V4, INET2_V6]}
POOL_V4, POOL_V6 = uf.EGRESS_V4[:2], uf.EGRESS_V6[:2]
EGRESS_V4 = rendezvous(CLIENT_V4, POOL_V4)  # where usocksd sends everything of the client host
EGRESS_V6 = rendezvous(CLIENT_V4, POOL_V6)
CLIENT_ADDRESSES = (CLIENT_V4, CLIENT_V6)


@contextlib.contextmanager
def egress_pool(lab: Lab) -> Iterator[None]:
    """POOL_V4 and POOL_V6 on the gw's inet side while the block runs."""
    added = []
    try:
        for addr in (*POOL_V4, *POOL_V6):
            extra = ["nodad"] if ":" in addr else []
            lab.run(lab.gw, ["ip", "addr", "add", f"{addr}/{64 if ':' in addr else 24}", "dev", GW_INET_IF, *extra])
            added.append(addr)
        yield
    finally:
        for addr in added:
            lab.run(lab.gw, ["ip", "addr", "del", f"{addr}/{64 if ':' in addr else 24}", "dev", GW_INET_IF],
                    check=False)


def egress(host: str) -> str:
    return EGRESS_V6 if ":" in host else EGRESS_V4


@dataclass
class UdpPath:
    """The running path: the servers, usocksd, transocks and the rules."""

    lab: Lab
    dns: Dnsmasq
    ntp: Chronyd
    iperf: Service
    rec: UdpRecorder
    edge: Upstream
    transocks: Service
    certs: Certs
    settings: list[str]
    pidfile: Path

    def transocks_log(self) -> str:
        return self.transocks.log_text()


def stop_upgraded(pidfile: Path, first: int) -> None:
    """Stop the master a USR2 upgrade started (not a child of this process), with its workers."""
    pid = pid_in(pidfile)
    if pid is not None and pid != first:
        stop_master(pid)


def access_fields(text: str) -> list[dict[str, str]]:
    """The access-log lines of a log as dicts (logfmt)."""
    return [{k: v.strip('"') for k, v in FIELD.findall(line)} for line in text.splitlines()
            if line.startswith("time=") and " outcome=" in line]


def udp_lines(text: str) -> list[dict[str, str]]:
    return [ln for ln in access_fields(text) if ln.get("proto") == "udp"]


@pytest.fixture(scope="module")
def path(lab: Lab) -> Iterator[UdpPath]:
    _need_lab()
    with contextlib.ExitStack() as stack:
        stack.enter_context(egress_pool(lab))
        stack.enter_context(hosts_overlay(lab, lab.client, NAMES))
        stack.enter_context(hosts_overlay(lab, lab.gw, NAMES))
        dns = start_dnsmasq(lab, {NAME: [INET_V4, INET_V6]})
        stack.callback(dns.service.stop, lab)
        ntp = start_chronyd(lab)
        stack.callback(ntp.service.stop, lab)
        iperf = start_iperf3(lab, E2E_IPERF_PORT)
        stack.callback(iperf.stop, lab)
        rec = UdpRecorder(lab, lab.inet, [(h, p) for h in (INET_V4, INET_V6, INET2_V4, INET2_V6)
                                          for p in (ECHO_PORT, 443)])
        stack.callback(rec.close)
        certs = make_certs(lab.tempdir("ca"), [NAME, BLOCKED])
        for svc in start_s_server(lab, certs, hosts=(INET_V4, INET_V6, INET2_V4, INET2_V6)):
            stack.callback(svc.stop, lab)
        edge = start_usocksd(lab, E2E_PORT + 1, 1, ["--udp-idle-timeout", str(EDGE_IDLE), "--deny-dest", BLOCKED],
                             egress=(*POOL_V4, *POOL_V6))
        stack.callback(edge.stop, lab)
        settings = [f"--listen=127.0.0.1:{E2E_PORT}", f"--listen=[::1]:{E2E_PORT}", "--proxy-url", edge.url,
                    "--udp", "true", "--udp-idle-timeout", str(IDLE), "--send-domain", "true"]
        pidfile = lab.tempdir("pid") / "transocks.pid"
        svc = start_transocks(lab, edge.url, E2E_PORT, 1, [*settings[2:], "--pidfile", str(pidfile)])
        stack.callback(svc.stop, lab)
        stack.callback(stop_upgraded, pidfile, svc.pid)
        rulesets.transocks(lab, lab.client, "rules", "--apply", *settings)
        stack.callback(lab.forget_connections, lab.client)
        stack.callback(rulesets.transocks, lab, lab.client, "rules", "--remove")
        yield UdpPath(lab, dns, ntp, iperf, rec, edge, svc, certs, settings, pidfile)
        print(f"--- transocks ---\n{svc.log_text()[-LOG_TAIL:]}\n--- usocksd ---\n{edge.log_text()[-LOG_TAIL:]}")


@pytest.mark.parametrize("server,qtype", [(INET_V4, "A"), (INET_V6, "AAAA")])
def test_dig_is_answered_through_transocks_and_usocksd(path, server, qtype):
    lab = path.lab
    before = len(path.dns.queries())
    got = dig(lab, lab.client, server, NAME, qtype)
    assert got.status == "NOERROR", got.stdout
    assert got.answers == [server]
    seen = path.dns.wait_queries(before + 1)[before:]
    assert [(q.source, q.qtype, q.name) for q in seen] == [(egress(server), qtype, NAME)]


@pytest.mark.parametrize("server", [INET_V4, INET_V6])
def test_dns_answer_is_byte_exact_and_from_the_original_destination(path, server):
    lab = path.lab
    q = query(NAME, "AAAA" if ":" in server else "A", 0x2121)
    direct, _ = exchange(lab, lab.inet, server, q)
    before = len(path.dns.queries())
    through, peer = exchange(lab, lab.client, server, q)
    assert peer == (server, 53)  # as NAT would send it: from the address and port the client asked
    assert through == direct
    assert [q.source for q in path.dns.wait_queries(before + 1)[before:]] == [egress(server)]


@pytest.mark.parametrize("server", [INET_V4, INET_V6])
def test_concurrent_flows_to_one_server_are_all_answered(path, server):
    """Five client ports ask one DNS server in turn, each while the earlier flows' sessions are live
    (and their answers' transparent socket on the server's address exists): every flow gets its own
    answer from the server's address, and dnsmasq saw five queries from five egress ports."""
    lab = path.lab
    qtype = "AAAA" if ":" in server else "A"
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with lab.netns(lab.client):
        socks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(5)]
    before = len(path.dns.queries())
    try:
        for n, s in enumerate(socks):
            s.settimeout(5)
            s.sendto(query(NAME, qtype, 0x4000 + n), (server, 53))
            reply, peer = s.recvfrom(4096)
            assert peer[:2] == (server, 53) and reply[:2] == (0x4000 + n).to_bytes(2, "big")
            assert answer_addresses(reply) == [server]
    finally:
        for s in socks:
            s.close()
    seen = path.dns.wait_queries(before + 5)[before:]
    assert sorted(q.source for q in seen) == [egress(server)] * 5
    assert len({q.port for q in seen}) == 5  # five sessions, five associations


@pytest.mark.parametrize("server", [INET_V4, INET_V6])
def test_ntp_exchange_through_transocks_and_usocksd(path, server):
    lab = path.lab
    before = path.ntp.clients(lab).get(egress(server))
    got = ntp_query(lab, lab.client, server)
    assert got.returncode == 0 and got.offset is not None, got.output
    clients = path.ntp.clients(lab)
    assert clients[egress(server)].requests > (before.requests if before else 0)
    assert not set(CLIENT_ADDRESSES) & set(clients)


def test_iperf3_udp_at_a_fixed_rate_completes_and_reports_its_loss(path):
    """104 datagrams a second (well under usocksd's udp_max_rate); no timing is asserted."""
    lab = path.lab
    got = iperf3_udp(lab, lab.client, INET_V4, E2E_IPERF_PORT, rate="1M", seconds=2, length=1200)
    assert got.packets > 0 and 0 <= got.lost <= got.packets and got.lost_percent >= 0
    assert got.peers == (EGRESS_V4,)  # its TCP control and its UDP data, as the server saw them


@pytest.mark.parametrize("host", [INET_V4, INET_V6])
def test_quic_port_gets_port_unreachable_and_the_tcp_retry_is_served_by_name(path, host):
    """A UDP client of port 443 learns at once (ECONNREFUSED on its next receive); nothing reached
    the server's UDP 443; curl's TCP retry to the same name is sniffed, checked and carried by name,
    and a name the edge refuses is refused on the retry too (no SYN reached its server)."""
    lab = path.lab
    blocked_host = INET2_V6 if ":" in host else INET2_V4
    for dest in (host, blocked_host):
        port_unreachable_after(lab, lab.client, (dest, 443))
        assert path.rec.at(dest, 443) == []
    flag = "-6" if ":" in host else "-4"
    syns = SynCount(lab, lab.inet, blocked_host, 443)
    try:
        ok = lab.run(lab.client, ["curl", "-sS", flag, "--max-time", "10", "--cacert", str(path.certs.ca),
                                  "-o", "/dev/null", "-w", "%{http_code}", f"https://{NAME}/"], check=False)
        assert (ok.returncode, ok.stdout) == (0, "200"), ok.stderr
        no = lab.run(lab.client, ["curl", "-sS", flag, "--max-time", "10", "--cacert", str(path.certs.ca),
                                  "-o", "/dev/null", f"https://{BLOCKED}/"], check=False)
        assert no.returncode != 0 and syns.count() == 0
    finally:
        syns.close()
    served = wait_for(lambda: [ln for ln in access_fields(path.edge.log_text())
                               if ln.get("host") == NAME and ln.get("dest") == format_hostport(host, 443)],
                      what="the edge's line for the name")
    assert served[-1].get("name_match") == "yes" and served[-1].get("outcome") == "ok", served


def test_tcp_and_udp_of_one_client_leave_from_one_egress_address(path):
    lab = path.lab
    with recording(lab, lab.inet, [(INET_V4, TCP_REC_PORT), (INET_V6, TCP_REC_PORT)]) as tcp:
        for host in (INET_V4, INET_V6):
            reply, _ = send_and_receive(lab, lab.client, (host, ECHO_PORT), b"udp")
            with lab.netns(lab.client):
                s = socket.create_connection((host, TCP_REC_PORT), timeout=10)
            with s:
                s.sendall(b"tcp")
                assert s.recv(64).startswith(b"seen ")
            udp_peer = reply.split()[1].decode()
            tcp_peers = {h.peer for h in tcp.hits if h.host == host}
            assert {udp_peer} == tcp_peers == {egress(host)}


def test_every_udp_session_is_in_the_access_logs_of_both_daemons(path):
    """Three flows from three client ports to one server; once they end (idle), each is one line in
    transocks' log (its client port, its destination, a datagram each way) and one association line
    in usocksd's (found by the egress port the server saw, which usocksd logs as upstream=)."""
    lab = path.lab
    flows = {}  # client port -> the egress address and port the recorder saw
    for n in range(3):
        with lab.netns(lab.client):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.settimeout(5)
            sock.sendto(f"flow {n}".encode(), (INET_V4, ECHO_PORT))
            reply = sock.recv(100)
            _, ip, port, *_ = reply.decode().split()
            assert reply.endswith(f"flow {n}".encode()) and ip == EGRESS_V4
            flows[sock.getsockname()[1]] = f"{ip}:{port}"

    def ended(text: str, keep) -> list[dict[str, str]] | None:
        lines = [ln for ln in udp_lines(text) if keep(ln)]
        return lines if len(lines) >= len(flows) else None

    mine = wait_for(lambda: ended(path.transocks_log(), lambda ln: ln.get("client", "").startswith(f"{CLIENT_V4}:")
                                  and int(ln["client"].rsplit(":", 1)[1]) in flows),
                    timeout=IDLE * 4, what="transocks' lines for the three flows")
    assert sorted(int(ln["client"].rsplit(":", 1)[1]) for ln in mine) == sorted(flows)
    for ln in mine:
        assert ln.get("dest") == format_hostport(INET_V4, ECHO_PORT), ln
        assert (ln.get("datagrams_sent"), ln.get("datagrams_received")) == ("1", "1"), ln
    edge = wait_for(lambda: ended(path.edge.log_text(), lambda ln: ln.get("upstream") in flows.values()),
                    timeout=IDLE * 4, what="usocksd's lines for the three associations")
    assert sorted(ln["upstream"] for ln in edge) == sorted(flows.values())
    for ln in edge:
        assert (ln.get("datagrams_sent"), ln.get("datagrams_received"), ln.get("client", "").split(":")[0]) == \
            ("1", "1", CLIENT_V4), ln


# --- reloads and upgrades with sessions live (what transocks/redirector/udp/service.py documents) ---


def ticks(sock: socket.socket, count: int) -> list[int]:
    """The next `count` ticks of a stream, each checked to come from the streaming server."""
    out = []
    while len(out) < count:
        data, peer = sock.recvfrom(100)
        assert peer[:2] == (INET_V4, ECHO_PORT) and data.startswith(b"tick "), (data, peer)
        out.append(int(data.split()[1]))
    return out


def after_the_stream(sock: socket.socket) -> None:
    """The flow's next datagram is answered (ticks still in flight are skipped)."""
    sock.sendto(b"after", (INET_V4, ECHO_PORT))
    while True:
        data, peer = sock.recvfrom(100)
        assert peer[:2] == (INET_V4, ECHO_PORT)
        if not data.startswith(b"tick "):
            assert data.endswith(b" after")
            return


def stream_across(path, event: Callable[[], object]) -> tuple[list[int], list[int], int, object]:
    """A flow from the client to the echo's stream of answers, with `event` (a reload, an upgrade)
    while they come: the ticks before and after it (those after must follow on), checked to come
    from the server's address and port, then the flow's next datagram answered once the stream
    stops; (ticks before, ticks after, the flow's client port, what `event` returned)."""
    lab = path.lab
    with lab.netns(lab.client):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(5)
        try:
            sock.sendto(b"stream", (INET_V4, ECHO_PORT))
            before = ticks(sock, 3)
            outcome = event()
            later = ticks(sock, 5)
            assert later[0] > before[-1]
        finally:
            path.rec.stop_streams()
        after_the_stream(sock)
        return before, later, sock.getsockname()[1], outcome


def flow_lines(text: str, port: int) -> list[dict[str, str]]:
    return [ln for ln in udp_lines(text) if ln.get("client") == f"{CLIENT_V4}:{port}"]


def test_a_stream_of_answers_lives_through_reloads_of_both_daemons(path):
    """HUP to transocks and to usocksd while a server streams answers to one flow: the answers keep
    coming from the server's address and port after both reloads are done (transocks' old worker
    keeps its session, usocksd's old worker its association); once the stream stops, the flow's next
    datagram opens a session in transocks' new worker, the old worker exits when its session is idle,
    and the flow has one access-log line per worker, both ended well."""
    master = psutil.Process(path.transocks.pid)
    old = master.children()
    assert len(old) == 1
    t_reloads, u_reloads = path.transocks_log().count("reload done"), path.edge.log_text().count("reload done")

    def reload_both() -> None:
        os.kill(path.transocks.pid, signal.SIGHUP)
        os.kill(path.edge.proc.pid, signal.SIGHUP)
        wait_for(lambda: path.transocks_log().count("reload done") > t_reloads
                 and path.edge.log_text().count("reload done") > u_reloads, 30, "both reloads")

    before, later, port, _ = stream_across(path, reload_both)
    assert [d.peer for d in path.rec.at(INET_V4, ECHO_PORT) if d.data == b"stream"][-1] == EGRESS_V4
    new = [p for p in master.children() if p.pid != old[0].pid]
    assert len(new) == 1
    wait_for(lambda: not old[0].is_running() or old[0].status() == psutil.STATUS_ZOMBIE, IDLE * 5,
             "the old worker's exit once its session is idle")
    lines = wait_for(lambda: len(flow_lines(path.transocks_log(), port)) >= 2 and flow_lines(path.transocks_log(), port),
                     IDLE * 4, "the flow's two lines")
    assert sorted(ln["id"].split(".")[0] for ln in lines) == sorted(f"{p.pid:x}" for p in (old[0], new[0])), lines
    assert all(ln.get("outcome") == "ok" for ln in lines), lines
    streamed = next(ln for ln in lines if ln["id"].startswith(f"{old[0].pid:x}."))
    assert int(streamed["datagrams_received"]) >= len(before) + len(later)


def test_a_stream_of_answers_lives_through_a_usr2_upgrade(path):
    """USR2 while a server streams answers: the new master takes over (pidfile), the answers keep
    coming from the server's address and port after the new workers are ready, the flow's next
    datagram is answered, and the old master leaves by itself once its worker's session is idle.
    Last in the module: the daemon is another process afterwards."""
    first = pid_in(path.pidfile)
    assert first == path.transocks.pid
    ready = path.transocks_log().count("workers ready")

    def upgrade() -> int:
        os.kill(first, signal.SIGUSR2)
        new_master = wait_for(lambda: (p := pid_in(path.pidfile)) != first and p, 30, "the new master's pidfile")
        wait_for(lambda: path.transocks_log().count("workers ready") > ready, 30, "the new master's workers")
        return new_master

    _, _, port, new_master = stream_across(path, upgrade)
    assert [d.peer for d in path.rec.at(INET_V4, ECHO_PORT) if d.data == b"stream"][-1] == EGRESS_V4
    assert path.transocks.procs[0].wait(IDLE * 10) == 0  # drained (its session idle) and left by itself
    assert psutil.Process(new_master).is_running()
    lines = wait_for(lambda: flow_lines(path.transocks_log(), port), IDLE * 4, "the flow's lines")
    assert all(ln.get("outcome") == "ok" for ln in lines), lines
