"""UDP through TPROXY (issue 21, item 1, and `direct`/`reject` for UDP flows): transocks on the gw as the
client's router, the client's UDP diverted by hand-written TPROXY rules (policy routing + mangle PREROUTING,
udp only, from the client interface), real `dig` against a real dnsmasq in the Internet namespace, through
dante's UDP ASSOCIATE or straight out.  What the client gets is judged by what reached which socket: answers
byte-exact and from the server's own address and port, nothing at all for `reject`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests import usocksd_fixtures as uf
from tests.lab import upstreams as ups
from tests.lab.dns import exchange, start_dnsmasq
from tests.lab.dns import query as dns_query
from tests.lab.netns import CLIENT_V4, GW_V4, Redirect
from tests.lab.services import pid_in, stop_master
from transocks.core.netutil import Endpoint

DNS_V4 = "198.51.100.53"
DNS_V6 = "2001:db8:2::53"
ECHO_PORT = 7
SINK_PORT = 54
ANSWER = "192.0.2.9"

ECHO_SCRIPT = r"""
import select, socket, sys
out = open(sys.argv[1], "a", buffering=1)
socks = []
for host in sys.argv[2:]:
    for port in (7, 54):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind((host, port))
        socks.append(s)
out.write("ready\n")
while True:
    for s in select.select(socks, [], [])[0]:
        data, peer = s.recvfrom(65535)
        port = s.getsockname()[1]
        out.write(f"{port} {peer[0]} {peer[1]} {len(data)}\n")
        if port == 7:
            s.sendto(data, peer)
"""


# --- the Internet's UDP servers, the UDP-capable dante, the TPROXY rules -------------------------


def start_echo_script(lab, hosts: tuple[str, str], work: Path) -> tuple[subprocess.Popen, Path]:
    """ECHO_SCRIPT in the inet namespace on `hosts`, once it is ready: (its process, its record of
    every datagram that reached it)."""
    record = work / "received"
    with open(work / "echo.err", "ab") as err:
        proc = lab.popen(lab.inet, [sys.executable, "-c", ECHO_SCRIPT, str(record), *hosts],
                         stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 10
    while not (record.exists() and "ready" in record.read_text()):
        assert proc.poll() is None, (work / "echo.err").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc, record


@pytest.fixture(scope="module")
def internet(lab, lab_logdir):
    """dnsmasq on DNS_V4/DNS_V6 :53 answering x.example with ANSWER, and an echo (:7) and a
    recording sink (:54) on the same addresses, all in the inet namespace."""
    for addr in (f"{DNS_V4}/32", f"{DNS_V6}/128"):
        lab.run(lab.inet, ["ip", "addr", "replace", addr, "dev", "lo"])
    work = lab.tempdir("udp-internet")
    dns = start_dnsmasq(lab, {"x.example": [ANSWER]}, hosts=(DNS_V4, DNS_V6), log_queries=False)
    _, record = start_echo_script(lab, (DNS_V4, DNS_V6), work)
    assert dns.service.procs[0].poll() is None, dns.service.log_text()
    return record


@pytest.fixture(scope="module")
def dante_udp(lab, lab_logdir):
    return ups.start_dante(lab, 1084, workdir=lab_logdir, udp=True)


def tproxy_udp(lab, port: int, dests: tuple[str, str] = (DNS_V4, DNS_V6)) -> Redirect:
    """What `transocks rules` will write for a gateway: the client network's UDP to `dests`,
    as it passes through the gw, TPROXY'd to `port` (policy routing delivers it locally)."""
    return lab.tproxy(port, "udp", dests)


def start(lab, daemon, port: int, args: list[str], workers: int = 1):
    d = daemon(["--tproxy", "true", "--udp", "true", *args], port, redirect=False, ns=lab.gw,
               listens=[f"[::]:{port}"], workers=workers)
    d.redirects.append(tproxy_udp(lab, port))
    return d


# --- clients -------------------------------------------------------------------------------------------


def client_socket(lab, host: str) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with lab.netns(lab.client):
        s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(5)
    return s


def dig(lab, server: str) -> str:
    res = lab.run(lab.client, ["dig", "+short", "+tries=1", "+time=5", f"@{server}", "x.example", "A"], check=False)
    return res.stdout.strip()


def wait_log(d, *needles: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = d.log_text()
        if all(n in text for n in needles) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def udp_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if " proto=udp " in ln]


METRICS_PORT = 19131


def scrape(lab) -> dict[str, float]:
    out = lab.run(lab.gw, ["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{METRICS_PORT}/metrics"], timeout=20)
    samples = {}
    for line in out.stdout.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def workers_of(d) -> list[psutil.Process]:
    return psutil.Process(d.pid).children()


def received(record: Path, port: int) -> list[str]:
    return [ln for ln in record.read_text().splitlines() if ln.startswith(f"{port} ")]


@pytest.fixture
def usocksd_udp(lab, tmp_path):
    """usocksd with UDP ASSOCIATE on, in the gw namespace."""
    factory = uf.UsocksdFactory(lab, tmp_path)
    try:
        yield factory.start(["--udp", "true"])
    finally:
        factory.close()


# --- tests -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_dns_through_dante_udp_associate(lab, internet, dante_udp, daemon, family):
    """dig through TPROXY -> transocks -> dante's UDP ASSOCIATE -> dnsmasq: the answer, byte-exact as
    dnsmasq gives it straight, comes from the server's address and port 53; the session's one access-log
    line (proto=udp, datagrams and bytes each way, the member) is written when it goes idle."""
    server = DNS_V4 if family == "v4" else DNS_V6
    d = start(lab, daemon, 1191, ["--proxy-url", dante_udp.url, "--udp-idle-timeout", "2"])
    assert dig(lab, server) == ANSWER, d.log_text()
    query = dns_query("x.example", qid=0x5151)
    direct, _ = exchange(lab, lab.gw, server, query, 53)  # the gw's own traffic is not diverted
    data, peer = exchange(lab, lab.client, server, query, 53)
    assert data == direct
    assert (socket.inet_pton(socket.AF_INET6 if ":" in server else socket.AF_INET, peer[0]), peer[1]) == \
        (socket.inet_pton(socket.AF_INET6 if ":" in server else socket.AF_INET, server), 53)
    # dig's session and the exchange's each end idle, one after the other: wait for both lines.
    wait_for(lambda: sum("outcome=ok" in ln for ln in udp_lines(d.log_text())) >= 2, 10, "both sessions' lines")
    text = d.log_text()
    lines = [ln for ln in udp_lines(text) if "outcome=ok" in ln]
    assert len(lines) >= 2, text
    dest = f"dest={server}:53" if family == "v4" else f"dest=[{server}]:53"
    assert all(dest in ln and f"upstream=socks5://{GW_V4}:1084" in ln for ln in lines), lines
    assert any(f"datagrams_sent=1 sent={len(query)} datagrams_received=1 received={len(direct)} " in ln
               for ln in lines), lines


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_dns_through_usocksd(lab, internet, usocksd_udp, daemon, family):
    """dig through TPROXY -> transocks -> usocksd's UDP ASSOCIATE -> dnsmasq, with an IPv4
    association carrying the IPv6 flow too: the answer byte-exact and from the server's address
    and port, and the flow in the access logs of both daemons."""
    server = DNS_V4 if family == "v4" else DNS_V6
    u = usocksd_udp
    d = start(lab, daemon, 1204, ["--proxy-url", f"socks5://{GW_V4}:{u.port}", "--udp-idle-timeout", "2"])
    assert dig(lab, server) == ANSWER, d.log_text()
    query = dns_query("x.example", qid=0x5252)
    direct, _ = exchange(lab, lab.gw, server, query, 53)
    data, peer = exchange(lab, lab.client, server, query, 53)
    fam = socket.AF_INET6 if family == "v6" else socket.AF_INET
    assert data == direct
    assert (socket.inet_pton(fam, peer[0]), peer[1]) == (socket.inet_pton(fam, server), 53)
    dest = f"dest={server}:53" if family == "v4" else f"dest=[{server}]:53"
    wait_for(lambda: sum(dest in ln and "outcome=ok" in ln for ln in udp_lines(d.log_text())) >= 2, 10,
             "both sessions' lines")
    text = d.log_text()
    mine = [ln for ln in udp_lines(text) if dest in ln and "outcome=ok" in ln]
    assert len(mine) >= 2 and all(f"upstream=socks5://{GW_V4}:{u.port}" in ln for ln in mine), text
    # dig's association and the exchange's each end with a line: wait for the exchange's, not the first
    edge = wait_for(lambda: [ln for ln in udp_lines(u.log_text()) if dest in ln and "outcome=ok" in ln
                             and f"sent={len(query)} " in ln], 10, "usocksd's line of the exchange")
    assert any(f"sent={len(query)} " in ln and f"received={len(direct)} " in ln for ln in edge), edge


def test_direct_and_reject_for_udp(lab, internet, daemon):
    """`direct` sends a flow's datagrams straight out (answers from the destination again);
    `reject` sends nothing anywhere and answers nothing, one log line for the whole flow."""
    before = len(received(internet, SINK_PORT))
    d = start(lab, daemon, 1192, ["--proxy-url", "socks5://192.0.2.1:1", "--udp-idle-timeout", "2",
                                  "--route", f"port={SINK_PORT} -> reject", "--route", "port=53,7 -> direct",
                                  "--metrics-listen", f"127.0.0.1:{METRICS_PORT}"])
    assert dig(lab, DNS_V4) == ANSWER
    data, peer = exchange(lab, lab.client, DNS_V6, b"echo me", ECHO_PORT)
    assert data == b"echo me" and peer[1] == ECHO_PORT and socket.inet_pton(socket.AF_INET6, peer[0]) == \
        socket.inet_pton(socket.AF_INET6, DNS_V6)
    s = client_socket(lab, DNS_V4)
    s.settimeout(0.5)
    for i in range(5):
        s.sendto(b"dropped %d" % i, (DNS_V4, SINK_PORT))
    with pytest.raises(socket.timeout):
        s.recvfrom(100)
    s.close()
    text = wait_log(d, "outcome=not_allowed", "datagrams_dropped=5")
    time.sleep(0.5)
    assert len(received(internet, SINK_PORT)) == before, "a rejected datagram reached the Internet"
    rejected = [ln for ln in udp_lines(text) if "outcome=not_allowed" in ln]
    assert len(rejected) == 1 and "datagrams_sent=0" in rejected[0] and "datagrams_dropped=5" in rejected[0], text
    assert sum("not_allowed udp" in ln for ln in text.splitlines()) == 1, text  # said once, not per datagram
    assert any("upstream=direct://" in ln and f"dest=[{DNS_V6}]:7" in ln for ln in udp_lines(text)), text
    wait_log(d, f"dest=[{DNS_V6}]:7 ")
    samples = wait_for(lambda: (m := scrape(lab)).get('transocks_udp_sessions_total{outcome="ok"}', 0) >= 2 and m,
                       10, "the sessions in the metrics")
    assert samples['transocks_udp_sessions_total{outcome="not_allowed"}'] == 1
    assert samples['transocks_udp_datagrams_total{direction="dropped"}'] == 5
    assert samples['transocks_udp_datagrams_total{direction="sent"}'] >= 2
    assert samples['transocks_udp_bytes_total{direction="received"}'] >= len(b"echo me")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("exit_, flows, bound", [("direct", 1000, 100), ("dante", 200, 40)])
def test_flows_bounded_expire_and_descriptors_return(lab, internet, dante_udp, daemon, exit_, flows, bound):
    """Flows from distinct client ports, each answered: the table never holds more than
    udp_max_sessions (the oldest idle goes first, outcome=evicted), every session ends idle after
    udp_idle_timeout, and the worker's descriptors come back to what they were before."""
    url = "direct://" if exit_ == "direct" else dante_udp.url
    port = 1193 if exit_ == "direct" else 1194
    d = start(lab, daemon, port, ["--proxy-url", url, "--udp-idle-timeout", "2", "--udp-max-sessions", str(bound)])
    worker = wait_for(lambda: workers_of(d), 10, "the worker")[0]
    time.sleep(0.3)
    baseline = fds(worker.pid)
    peak = 0
    batch = 20
    answered = 0
    for first in range(0, flows, batch):
        socks = []
        for i in range(first, min(first + batch, flows)):
            s = client_socket(lab, DNS_V4)
            s.bind(("0.0.0.0", 20000 + i))
            s.sendto(b"flow %d" % i, (DNS_V4, ECHO_PORT))
            socks.append((i, s))
        for i, s in socks:
            data, peer = s.recvfrom(100)
            answered += data == b"flow %d" % i and peer == (DNS_V4, ECHO_PORT)
            s.close()
        peak = max(peak, fds(worker.pid))
    assert answered == flows
    per_session = 1 if exit_ == "direct" else 2  # the relay socket, and the association's control connection
    assert peak <= baseline + bound * per_session + 2, (baseline, peak)
    wait_for(lambda: fds(worker.pid) == baseline, 10, f"descriptors back to {baseline} (now {fds(worker.pid)})")
    text = wait_log(d, f"client={CLIENT_V4}:{20000 + flows - 1} ")
    lines = udp_lines(text)
    assert len(lines) == flows, len(lines)
    evicted = sum("outcome=evicted" in ln for ln in lines)
    assert evicted == flows - bound, evicted
    assert sum("outcome=ok" in ln and "datagrams_received=1" in ln for ln in lines) == bound
    assert worker.is_running() and workers_of(d) == [worker]


def test_association_end_ends_the_session(lab, internet, daemon, lab_logdir):
    """When the member ends the association (its TCP control connection), the session ends with
    it (outcome=upstream_closed), long before its idle timeout, and its descriptors are closed."""
    dante = ups.start_dante(lab, 1085, workdir=lab_logdir, udp=True)
    d = start(lab, daemon, 1195, ["--proxy-url", dante.url, "--udp-idle-timeout", "600", "--health-interval", "0"])
    data, _ = exchange(lab, lab.client, DNS_V4, b"before", ECHO_PORT)
    assert data == b"before"
    worker = workers_of(d)[0]
    with_session = fds(worker.pid)
    dante.stop(lab)
    text = wait_log(d, "outcome=upstream_closed")
    assert "outcome=upstream_closed" in text, text
    wait_for(lambda: fds(worker.pid) == with_session - 3, 5, "the session's relay, control and reply sockets closed")


def test_reload_and_upgrade_with_live_sessions(lab, internet, daemon, tmp_path):
    """What a live flow sees across HUP and USR2: every datagram is answered, always from the
    destination's address and port.  The old worker stops reading at once and keeps its session
    until idle, then exits; the flow's next datagram opens a session in the new worker (the slot's
    socket is the same one, held by the master), so the flow has one access-log line per worker."""
    pidfile = tmp_path / "t.pid"
    d = start(lab, daemon, 1196, ["--proxy-url", "direct://", "--udp-idle-timeout", "3", "--graceful-timeout", "30",
                                  "--pidfile", str(pidfile)])
    s = client_socket(lab, DNS_V4)
    s.bind(("0.0.0.0", 31000))

    def round_trip(tag: bytes) -> None:
        s.sendto(tag, (DNS_V4, ECHO_PORT))
        data, peer = s.recvfrom(100)
        assert (data, peer) == (tag, (DNS_V4, ECHO_PORT))

    round_trip(b"one")
    old = workers_of(d)[0]
    d.send_signal(signal.SIGHUP)
    wait_log(d, "reload done")
    round_trip(b"two")  # read by the old worker if it has not stopped reading yet, else by the new one
    new = [p for p in workers_of(d) if p.pid != old.pid]
    assert len(new) == 1
    wait_for(lambda: not old.is_running() or old.status() == psutil.STATUS_ZOMBIE, 15, "the old worker's exit")
    round_trip(b"three")  # the new worker's, the slot's only reader now
    text = wait_log(d, f"id={old.pid:x}.u1 ")
    mine = [ln for ln in udp_lines(text) if "client=192.0.2.2:31000 " in ln]
    assert len(mine) == 1 and "outcome=ok" in mine[0], mine  # its session ended idle, not cut

    d.send_signal(signal.SIGUSR2)
    new_master = wait_for(lambda: (p := pid_in(pidfile)) != d.pid and p, 20, "the new master's pidfile")
    try:
        round_trip(b"four")
        assert d.proc.wait(30) == 0  # the old master drained its worker's session and left
        round_trip(b"five")
        # "four" went to whichever worker read the slot's socket first; every session the old
        # master's workers had ended idle, none was cut.
        mine = [ln for ln in udp_lines(d.log_text()) if "client=192.0.2.2:31000 " in ln]
        assert mine and all("outcome=ok" in ln for ln in mine), mine
        assert any(f"id={new[0].pid:x}.u" in ln for ln in mine), mine
    finally:
        s.close()
        stop_master(new_master)


def test_workers_keep_cap_net_raw_only_with_udp(lab, internet, daemon):
    """IP_TRANSPARENT on the reply sockets needs CAP_NET_RAW in the workers: kept with udp = true,
    dropped otherwise; CAP_NET_ADMIN is dropped either way."""
    with_udp = start(lab, daemon, 1197, ["--proxy-url", "direct://"])
    without = daemon(["--proxy-url", "direct://", "--tproxy", "true"], 1198, redirect=False, ns=lab.gw,
                     listens=["[::]:1198"])
    for d, raw in ((with_udp, True), (without, False)):
        w = wait_for(lambda d=d: workers_of(d), 10, "a worker")[0]
        # The worker drops what it does not keep once its handler is made: wait for that moment.
        (eff,) = wait_for(lambda w=w: _dropped_admin(w.pid), 10, "the worker to drop CAP_NET_ADMIN")
        assert not eff >> 12 & 1
        assert bool(eff >> 13 & 1) is raw, hex(eff)


class HostileRelay:
    """A SOCKS5 server in the gw namespace that grants UDP ASSOCIATE and answers each datagram
    with garbage first (a fragment, an answer from another source, a cut header, a bad ATYP) and
    then one proper answer: what the client receives shows which of them transocks passed on."""

    def __init__(self, lab, port: int) -> None:
        import threading

        with lab.netns(lab.gw):
            self.tcp = socket.create_server((GW_V4, port))
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind((GW_V4, 0))
        self.tcp.settimeout(0.2)
        self.udp.settimeout(0.2)
        self.controls: list[socket.socket] = []
        self.running = True
        self.threads = [threading.Thread(target=self._accept, daemon=True),
                        threading.Thread(target=self._relay, daemon=True)]
        for t in self.threads:
            t.start()

    def _accept(self) -> None:
        from transocks.wire import socks5

        while self.running:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                continue
            conn.settimeout(5)
            conn.recv(64)  # greeting
            conn.sendall(b"\x05\x00")
            conn.recv(64)  # UDP ASSOCIATE
            conn.sendall(b"\x05\x00\x00" + socks5.encode_address(Endpoint(*self.udp.getsockname())))
            self.controls.append(conn)

    def _relay(self) -> None:
        from transocks.wire import socks5

        while self.running:
            try:
                data, peer = self.udp.recvfrom(65535)
            except OSError:
                continue
            _frag, dest, offset = socks5.parse_udp_datagram(data)
            payload = data[offset:]
            header = b"\0\0\0" + socks5.encode_address(dest)
            for bad in (b"\0\0\1" + header[3:] + b"FRAGMENT", b"\0\0\0" + socks5.encode_address(
                        Endpoint(dest.host, dest.port + 1)) + b"ELSEWHERE", header[:6], b"\0\0\0\x09xx" + b"ATYP"):
                self.udp.sendto(bad, peer)
            self.udp.sendto(header + b"ok:" + payload, peer)

    def close(self) -> None:
        self.running = False
        for t in self.threads:
            t.join(2)
        for s in (self.tcp, self.udp, *self.controls):
            s.close()


def test_only_whole_answers_from_the_destination_reach_the_client(lab, internet, daemon):
    """What comes back through an association is the member's to say, not to forge: a fragment,
    an answer naming another source, a cut header or an unknown address type are dropped (and
    counted); the proper answer reaches the client, from the destination's address and port."""
    relay = HostileRelay(lab, 1086)
    try:
        d = start(lab, daemon, 1201, ["--proxy-url", f"socks5://{GW_V4}:1086", "--udp-idle-timeout", "2",
                                      "--health-interval", "0"])
        s = client_socket(lab, DNS_V4)
        s.sendto(b"question", (DNS_V4, ECHO_PORT))
        data, peer = s.recvfrom(100)
        assert (data, peer) == (b"ok:question", (DNS_V4, ECHO_PORT))
        s.settimeout(0.5)
        with pytest.raises(socket.timeout):
            s.recvfrom(100)
        s.close()
        text = wait_log(d, "datagrams_dropped=")
        line = [ln for ln in udp_lines(text) if f"dest={DNS_V4}:{ECHO_PORT}" in ln]
        assert len(line) == 1 and "datagrams_received=1 " in line[0] and "datagrams_dropped=4" in line[0], text
    finally:
        relay.close()


def test_failed_flow_tries_again_after_a_hold(lab, internet, daemon):
    """A flow whose member is down fails once (one warning, one access-log line for the session,
    its datagrams dropped without a dial each) and tries again a few seconds later even while the
    client keeps sending, as a VPN's keepalives would: it is not cut off until it goes quiet."""
    d = start(lab, daemon, 1202, ["--proxy-url", f"socks5://{GW_V4}:9", "--udp-idle-timeout", "60",
                                  "--health-interval", "0"])
    s = client_socket(lab, DNS_V4)
    deadline = time.monotonic() + 8  # at most: with the 5 s hold the second try comes at 5-6 s
    sent = 0
    while time.monotonic() < deadline and d.log_text().count("warning: upstream_unreachable udp") < 2:
        s.sendto(b"keepalive", (DNS_V4, ECHO_PORT))
        sent += 1
        time.sleep(0.25)
    s.close()
    text = wait_log(d, "outcome=upstream_unreachable")
    failed = [ln for ln in udp_lines(text) if "outcome=upstream_unreachable" in ln]
    warnings = [ln for ln in text.splitlines() if "warning: upstream_unreachable udp" in ln]
    assert 1 <= len(failed) <= 2 and 2 <= len(warnings) <= 3, text  # up to 8 s of datagrams: a session each 5 s
    assert sum(int(ln.split("datagrams_dropped=")[1].split()[0]) for ln in failed) >= 10, failed


def _cap_eff(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff")


def _dropped_admin(pid: int) -> tuple[int] | None:
    """(CapEff,) once the process holds no CAP_NET_ADMIN: a worker drops it once its handler is made."""
    eff = _cap_eff(pid)
    return None if eff >> 12 & 1 else (eff,)


def test_a_root_master_with_user_keeps_cap_net_raw_for_its_workers(lab, internet, daemon):
    """A master started as root with `user` keeps CAP_NET_RAW and CAP_NET_BIND_SERVICE through the setuid
    (PR_SET_KEEPCAPS, then only those), so its workers, running as that user, still answer from the
    destination's address and port (7, below 1024);
    CAP_NET_ADMIN is in neither after the bind (it failed on the main before: nothing was answered)."""
    d = start(lab, daemon, 1204, ["--proxy-url", "direct://", "--user", "nobody", "--udp-idle-timeout", "2"])
    answer, peer = exchange(lab, lab.client, DNS_V4, b"kept", ECHO_PORT)
    assert answer == b"kept" and peer[:2] == (DNS_V4, ECHO_PORT)
    for p in (psutil.Process(d.pid), *workers_of(d)):
        assert p.uids().effective == 65534
        eff = _cap_eff(p.pid)
        assert eff >> 13 & 1 and eff >> 10 & 1 and not eff >> 12 & 1, hex(eff)  # NET_RAW, NET_BIND_SERVICE


def test_workers_without_cap_net_raw_say_so_once(lab, internet, daemon):
    """A master whose bounding set lacks CAP_NET_RAW (started as root with `user`, under `setpriv
    --bounding-set -net_raw`) has none to keep, so its workers cannot make transparent reply sockets:
    the flows fail (nothing is answered from a wrong address), and the error log says what the workers
    lack, once."""
    d = daemon(["--tproxy", "true", "--udp", "true", "--proxy-url", "direct://", "--user", "nobody",
                "--udp-idle-timeout", "2"], 1203, redirect=False, ns=lab.gw, listens=["[::]:1203"],
               wrap=["setpriv", "--bounding-set", "-net_raw", "--"])
    d.redirects.append(tproxy_udp(lab, 1203))
    for i in range(3):
        with pytest.raises(socket.timeout):
            exchange(lab, lab.client, DNS_V4, b"x%d" % i, ECHO_PORT, timeout=0.5)
    text = wait_log(d, "need CAP_NET_RAW")
    assert sum("need CAP_NET_RAW" in ln for ln in text.splitlines()) == 1, text
