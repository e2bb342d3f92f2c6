"""Exits in the namespace lab: pools of real SOCKS5 servers failing over under load, all members
down, sticky balance with vsftpd, DNS discovery from a hosts file, routing rules, HUP.

transocks runs in the client namespace behind real iptables REDIRECT; the members are usocksd
and dante in the gw namespace; servers (tests/lab/servers.py, vsftpd) in the inet namespace.
"""

from __future__ import annotations

import calendar
import ftplib
import io
import re
import signal
import threading
import time
from dataclasses import dataclass

import pytest

from tests.lab import servers
from tests.lab import upstreams as ups
from tests.lab.ftp import start_vsftpd
from tests.lab.netns import (
    CLIENT_V6,
    GW_EXT_V4,
    GW_INET_IF,
    GW_V4,
    GW_V6,
    INET2_V4,
    INET2_V6,
    INET_NET_V4,
    INET_NET_V6,
    INET_V4,
    INET_V6,
    TEST_PORT,
    Redirect,
)
from tests.test_datapath import connect, expect_reset_on_connect, wait_log

pytestmark = pytest.mark.netns

FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z")
FAST_HEALTH = ["--health-interval", "0.5", "--health-timeout", "0.5", "--rise", "2", "--fall", "2"]
EGRESS2_V4 = "198.51.100.4"  # a second egress address on the gw, for a member that leaves from elsewhere


def access_lines(d) -> list[dict[str, str]]:
    """The daemon's access-log lines as dicts."""
    out = []
    for line in d.log_text().splitlines():
        if " outcome=" in line and line.startswith("time="):
            out.append({k: v.strip('"') for k, v in FIELD.findall(line)})
    return out


def wait_access(d, keep, count: int, timeout: float = 5.0) -> list[dict[str, str]]:
    """At least `count` access-log lines that `keep` accepts: a line is written when transocks
    has seen both sides finish, which may be just after the client is done."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for ln in access_lines(d) if keep(ln)]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def line_time(line: str) -> float:
    """Epoch seconds of an error-log line (UTC, millisecond resolution)."""
    m = LOG_TIME.match(line)
    assert m, line
    return calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) + int(m.group(2)) / 1000


def access_time(fields: dict[str, str]) -> float:
    m = LOG_TIME.match(fields["time"])
    assert m, fields
    return calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) + int(m.group(2)) / 1000


def log_line_time(d, needle: str, timeout: float = 10.0) -> float:
    text = wait_log(d, needle, timeout=timeout)
    return line_time(next(ln for ln in text.splitlines() if needle in ln))


def fetch(lab, host: str, n: int = 20_000, seed: str = "x") -> None:
    s = connect(lab, host, timeout=10)
    try:
        assert servers.get(s, n, seed) == (servers.expected_sha(n, seed), n)
    finally:
        s.close()


@dataclass
class Result:
    started: float
    ended: float
    error: str | None


class Load:
    """New connections opened back to back by a few threads, bounded in count and time."""

    def __init__(self, lab, hosts=(INET_V4, INET_V6), threads: int = 3, limit: int = 40_000,
                 max_seconds: float = 40.0) -> None:
        """Bounded by `max_seconds` and by `limit` (high enough that a fast machine does not end the
        load before the test's last phase: 4,000 once ran out before a stopped member came back)."""
        self.lab, self.hosts, self.limit, self.max_seconds = lab, hosts, limit, max_seconds
        self.results: list[Result] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def start(self) -> Load:
        self.t0 = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def _run(self, index: int) -> None:
        i = 0
        while (not self.stopping.is_set() and len(self.results) < self.limit
               and time.monotonic() - self.t0 < self.max_seconds):
            host = self.hosts[(index + i) % len(self.hosts)]
            started = time.time()
            try:
                fetch(self.lab, host, 20_000, f"l{index}.{i}")
                error = None
            except Exception as exc:  # noqa: BLE001 - counted and reported
                error = f"{type(exc).__name__}: {exc}"
            self.results.append(Result(started, time.time(), error))
            i += 1

    def stop(self) -> list[Result]:
        self.stopping.set()
        for t in self.threads:
            t.join(15)
        return self.results


def nat_redirect(lab, d, rules: list[list[str]]) -> None:
    """nat OUTPUT rules in the client namespace (v4 and v6), in order, removed with the daemon."""
    r = Redirect(lab, lab.client)
    d.redirects.append(r)
    with r.undone_on_error():
        for tool, net in (("iptables", INET_NET_V4), ("ip6tables", INET_NET_V6)):
            for rule in rules:
                spec = ["OUTPUT", "-p", "tcp", "-d", net, *rule]
                r.add([tool, "-w", "-t", "nat", "-A", *spec], [tool, "-w", "-t", "nat", "-D", *spec])


@pytest.fixture
def members(lab, lab_logdir):
    """Factory: ``members(port, **kwargs)`` starts usocksd in the gw namespace; every one it
    started is stopped at test end, so a later test can have the port."""
    started: list[ups.Upstream] = []

    def start(port: int, **kwargs) -> ups.Upstream:
        up = ups.start_usocksd(lab, port, workdir=lab_logdir, **kwargs)
        started.append(up)
        return up

    try:
        yield start
    finally:
        for up in started:
            up.stop(lab)


# --- failover -------------------------------------------------------------------------


def test_member_stopped_under_load_and_brought_back(lab, daemon, members):
    a, b = members(1280), members(1281)
    d = daemon(["--proxy-url", a.url, "--proxy-url", b.url, "--balance", "round-robin", *FAST_HEALTH])
    load = Load(lab).start()
    time.sleep(1.5)
    stopped = time.time()
    a.stop(lab)
    down = log_line_time(d, f"exit {a.url} is down")
    time.sleep(2.0)
    members(1280)
    up = log_line_time(d, f"exit {a.url} is up again")
    time.sleep(1.5)
    results = load.stop()
    failed = [r for r in results if r.error]
    after_down = [r for r in failed if r.started > down]
    before_stop = [r for r in failed if r.started <= stopped]
    print(f"failover: {len(results)} connections, {len(failed)} failed: {len(before_stop)} opened before the "
          f"stop, {len(failed) - len(before_stop) - len(after_down)} between the stop and the mark "
          f"({down - stopped:.2f}s later), {len(after_down)} after it; examples: {[r.error[:80] for r in failed[:3]]}")
    assert len(results) > 50
    assert not after_down, after_down[:5]
    lines = access_lines(d)
    # While it was down nothing went to it; after it came back it carries its share again.
    assert not [ln for ln in lines if ln["upstream"] == a.url and ln["outcome"] == "ok"
                and down + 0.2 < access_time(ln) < up - 0.2 and float(ln["duration"]) < 0.2]
    assert [ln for ln in lines if ln["upstream"] == a.url and ln["outcome"] == "ok" and access_time(ln) > up]
    assert any(ln.get("tries") == "2" and ln["upstream"] == b.url for ln in lines), "no connection failed over"


@pytest.mark.parametrize("how", ["refused", "silent"])
def test_all_members_down_resets_within_connect_timeout(lab, daemon, how):
    ports = (1290, 1291)
    if how == "silent":
        for port in ports:  # SYNs vanish: only the connect deadline ends a try
            lab.iptables(lab.gw, "-I", "INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP")
            lab.add_cleanup(lambda p=port: lab.iptables(lab.gw, "-D", "INPUT", "-p", "tcp", "--dport", str(p),
                                                        "-j", "DROP", check=False))
    try:
        urls = [f"socks5://{GW_V4}:{p}" for p in ports]
        d = daemon([*(f"--proxy-url={u}" for u in urls), "--connect-timeout", "1", "--handshake-timeout", "1",
                    *FAST_HEALTH])
        for u in urls:
            wait_log(d, f"exit {u} is down", timeout=10)
        for host in (INET_V4, INET_V6):
            expect_reset_on_connect(lab, host, within=1.0 + 0.5)
        wait_log(d, "outcome=upstream_timeout" if how == "silent" else "outcome=upstream_unreachable")
    finally:
        if how == "silent":
            for port in ports:
                lab.iptables(lab.gw, "-D", "INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP", check=False)


# --- sticky balance: FTP ----------------------------------------------------------------


def ftp_transfers(lab, data: bytes, count: int) -> list[str]:
    """One passive-mode session, `count` downloads; the error of each failed one."""
    errors = []
    with lab.netns(lab.client):
        ftp = ftplib.FTP(INET_V4, timeout=10)
        try:
            ftp.login()
            ftp.set_pasv(True)
            for _ in range(count):
                buf = io.BytesIO()
                try:
                    ftp.retrbinary("RETR f.bin", buf.write)
                except ftplib.Error as exc:
                    errors.append(str(exc))
                    continue
                if buf.getvalue() != data:
                    errors.append(f"got {len(buf.getvalue())} bytes, not the file")
        finally:
            ftp.close()
    return errors


def test_sticky_keeps_ftp_on_one_egress_round_robin_breaks_it(lab, daemon, members):
    lab.run(lab.gw, ["ip", "addr", "add", f"{EGRESS2_V4}/24", "dev", GW_INET_IF])
    lab.add_cleanup(lambda: lab.run(lab.gw, ["ip", "addr", "del", f"{EGRESS2_V4}/24", "dev", GW_INET_IF],
                                    check=False))
    try:
        a = members(1284, egress=(GW_EXT_V4,))
        b = members(1285, egress=(EGRESS2_V4,))
        data = servers.pattern(256 * 1024, "ftp")
        ftpd = start_vsftpd(lab, {"f.bin": data})
        outcome = {}
        for port, balance in ((1093, "sticky"), (1094, "round-robin")):
            d = daemon(["--proxy-url", a.url, "--proxy-url", b.url, "--balance", balance], port)
            outcome[balance] = ftp_transfers(lab, data, 6)
            d.stop()
            d.remove_redirects()
        print(f"ftp: sticky {6 - len(outcome['sticky'])}/6 transfers, round-robin "
              f"{6 - len(outcome['round-robin'])}/6: {outcome['round-robin'][:2]}")
        assert outcome["sticky"] == [], ftpd.log_text()[-2000:]
        # Control and data connections alternate between members that leave from different addresses.
        assert outcome["round-robin"] and all("425" in e for e in outcome["round-robin"]), outcome
        ftpd.stop(lab)
    finally:
        lab.run(lab.gw, ["ip", "addr", "del", f"{EGRESS2_V4}/24", "dev", GW_INET_IF], check=False)


# --- discovery ------------------------------------------------------------------------------


def test_member_name_with_several_addresses_and_one_removed(lab, upstreams, daemon):
    hosts = lab.etc_dir(lab.client) / "hosts"
    base = "127.0.0.1 localhost\n::1 localhost\n"
    hosts.write_text(base + f"{GW_V4} edges.test\n{GW_V6} edges.test\n")
    v4, v6 = f"socks5://{GW_V4}:1080", f"socks5://[{GW_V6}]:1080"
    try:
        d = daemon(["--proxy-url", "socks5://edges.test:1080", "--balance", "round-robin",
                    "--resolve-interval", "0.5"])
        wait_log(d, "edges.test resolves to")
        for i in range(6):
            fetch(lab, INET_V4, seed=f"d{i}")
        used = {ln["upstream"] for ln in wait_access(d, lambda ln: ln["outcome"] == "ok", 6)}
        assert used == {v4, v6}, used
        with open(hosts, "w") as f:  # in place: the namespace's bind mount shows this inode
            f.write(base + f"{GW_V4} edges.test\n")
        removed = log_line_time(d, f"removed {GW_V6})")
        time.sleep(0.1)
        for i in range(6):
            fetch(lab, INET_V6, seed=f"e{i}")
        later = wait_access(d, lambda ln: access_time(ln) > removed, 6)
        assert len(later) == 6 and {ln["upstream"] for ln in later} == {v4}
    finally:
        hosts.unlink(missing_ok=True)


# --- rules -----------------------------------------------------------------------------------


def test_each_rule_matcher_and_target(lab, upstreams, daemon):
    """transocks runs as `daemon` (its own direct connections are not redirected again); programs
    run as `nobody` are sent to a second listener: per-program exits with -m owner."""
    conf = lab.tempdir("conf") / "t.conf"
    conf.write_text(f"""\
proxy_url = {upstreams.dante.url}
pool = alt {upstreams.microsocks.url}
route = listen=1096 -> alt
route = dst={INET2_V4}/32 port={TEST_PORT} -> direct
route = port={TEST_PORT + 1} -> reject
route = src={CLIENT_V6}/128 dst={INET2_V6}/128 -> alt
""")
    d = daemon(["-c", str(conf), "--user", "daemon"], 1095, redirect=False,
               listens=["127.0.0.1:1095", "[::1]:1095", "127.0.0.1:1096", "[::1]:1096"])
    nat_redirect(lab, d, [["-m", "owner", "--uid-owner", "daemon", "-j", "RETURN"],
                          ["-m", "owner", "--uid-owner", "nobody", "-j", "REDIRECT", "--to-ports", "1096"],
                          ["-j", "REDIRECT", "--to-ports", "1095"]])
    fetch(lab, INET_V4, seed="default")                 # no rule: the default pool (dante)
    fetch(lab, INET2_V4, seed="direct")                 # dst= port= -> direct
    fetch(lab, INET2_V6, seed="src")                    # src= dst= -> alt (microsocks)
    expect_reset_on_connect(lab, INET_V4, TEST_PORT + 1, within=1.0)  # port= -> reject
    out = lab.run(lab.client, ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "curl", "-sS",
                               "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
                               f"http://{INET_V4}:{TEST_PORT}/bytes/1000/nobody"], timeout=20)
    assert out.stdout == "200"                          # listen= -> alt
    wait_log(d, "rejected by route")
    by_pool = [(ln["pool"], ln["upstream"])
               for ln in wait_access(d, lambda ln: ln["dest"] == f"{INET_V4}:{TEST_PORT}", 2)]
    assert by_pool == [("default", upstreams.dante.url), ("alt", upstreams.microsocks.url)]
    lines = {(ln["dest"], ln["outcome"]): ln for ln in access_lines(d)}
    got = {k: (v["pool"], v["upstream"]) for k, v in lines.items()}
    assert got[(f"{INET2_V4}:{TEST_PORT}", "ok")] == ("direct", "direct://")
    assert got[(f"[{INET2_V6}]:{TEST_PORT}", "ok")] == ("alt", upstreams.microsocks.url)
    assert lines[(f"{INET_V4}:{TEST_PORT + 1}", "not_allowed")]["reason"].startswith("rejected by route port=9001")


def test_reload_changes_rules_without_dropping_and_refuses_a_bad_rule(lab, upstreams, daemon):
    conf = lab.tempdir("conf") / "t.conf"  # the master reads it again as `daemon`
    conf.write_text(f"proxy_url = {upstreams.dante.url}\nroute = dst={INET2_V4}/32 -> direct\n")
    d = daemon(["-c", str(conf), "--user", "daemon"], 1097, redirect=False)
    nat_redirect(lab, d, [["-m", "owner", "--uid-owner", "daemon", "-j", "RETURN"],
                          ["-j", "REDIRECT", "--to-ports", "1097"]])
    load = Load(lab, hosts=(INET_V4, INET2_V4, INET_V6), max_seconds=20).start()
    time.sleep(1.0)
    conf.write_text(f"proxy_url = {upstreams.dante.url}\nroute = dst={INET2_V4}/32 -> alt\n"
                    f"pool = alt {upstreams.microsocks.url}\n")
    d.send_signal(signal.SIGHUP)
    wait_log(d, "reload done: generation 2 serving", timeout=15)
    time.sleep(1.0)
    conf.write_text(f"proxy_url = {upstreams.dante.url}\nroute = dst={INET2_V4}/33 -> direct\n")
    d.send_signal(signal.SIGHUP)
    text = wait_log(d, "reload failed", timeout=10)
    time.sleep(1.0)
    results = load.stop()
    failed = [r for r in results if r.error]
    assert len(results) > 30 and not failed, failed[:5]
    assert f"{conf}: route = 'dst={INET2_V4}/33 -> direct' (line 2): bad CIDR" in text
    inet2 = [ln for ln in access_lines(d) if ln["dest"] == f"{INET2_V4}:{TEST_PORT}"]
    pools = [ln["pool"] for ln in inet2]
    assert pools[0] == "direct" and pools[-1] == "alt"  # the bad reload left the second config serving


def test_health_target_checks_the_members_path_not_just_its_port(lab, upstreams, daemon, members):
    """A member that accepts and greets but refuses the way out (usocksd denying the target) is
    taken out by checks with health_target; an HTTP member (tinyproxy) passes its CONNECT check."""
    blocked = members(1286, extra_args=[f"--deny-dest={INET2_V4}"])
    d = daemon(["--proxy-url", blocked.url, "--proxy-url", upstreams.tinyproxy.url, "--balance", "round-robin",
                "--health-target", f"{INET2_V4}:{TEST_PORT}", *FAST_HEALTH])
    down = log_line_time(d, f"exit {blocked.url} is down")
    assert "health check: socks5 reply 02" in d.log_text()
    time.sleep(0.1)
    for i in range(4):
        fetch(lab, INET_V4, seed=f"h{i}")
    later = wait_access(d, lambda ln: ln["outcome"] == "ok" and access_time(ln) > down, 4)
    assert {ln["upstream"] for ln in later} == {upstreams.tinyproxy.url}
    assert f"exit {upstreams.tinyproxy.url} is down" not in d.log_text()


# --- fast open and pipelining towards usocksd ------------------------------------------


def test_fast_open_and_auto_pipelining_to_usocksd(lab, daemon, members):
    """--upstream-fastopen against usocksd --tcp-fastopen: after the first connection fetched
    the cookie, greetings travel in the SYN (TCPFastOpenActive in the client namespace,
    TCPFastOpenPassive in the gw); with the default socks5_pipelining=auto every tunnel works,
    and a refused member is still an unreachable member, not a protocol error."""
    before = lab.run(lab.gw, ["sysctl", "-n", "net.ipv4.tcp_fastopen"]).stdout.strip()
    lab.sysctl(lab.gw, "net.ipv4.tcp_fastopen=3")
    try:
        m = members(1296, extra_args=["--tcp-fastopen", "16"])
        d = daemon(["--proxy-url", m.url, "--upstream-fastopen", "true", "--health-interval", "0"])
        active, passive = lab.tcp_ext(lab.client, "TCPFastOpenActive"), lab.tcp_ext(lab.gw, "TCPFastOpenPassive")
        for i in range(6):
            fetch(lab, INET_V4 if i % 2 else INET_V6, 3000, f"tfo{i}")
        assert lab.tcp_ext(lab.client, "TCPFastOpenActive") >= active + 4
        assert lab.tcp_ext(lab.gw, "TCPFastOpenPassive") >= passive + 4
        assert len(wait_access(d, lambda ln: ln["outcome"] == "ok", 6)) == 6
        m.stop(lab)  # refused now: with fast open the refusal shows at the first send or receive
        expect_reset_on_connect(lab, INET_V4, within=5.0)  # the refusal is quick: the RST may beat connect()
        wait_log(d, "outcome=upstream_unreachable")
    finally:
        lab.sysctl(lab.gw, f"net.ipv4.tcp_fastopen={before}")
