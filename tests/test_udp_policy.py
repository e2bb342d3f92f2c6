"""UDP policy in the namespace lab: health checks of UDP ASSOCIATE against real dante servers, one
that serves it (udpassociate, udpreply) and one that refuses it (connect only), and the daemon's
line for a pool that UDP flows reach with no member to carry them, at start and at each reload.

The checks run here in the client namespace (the test thread enters it) against dante in the gw
namespace, over IPv4 and IPv6; the daemon runs there too and its view shows in /metrics.  On the
data path (transocks on the gw as the client's router, test_udp_tproxy's TPROXY rules), UDP flows
from distinct ports leave only through the dante that serves UDP, answered from the destination.
"""

from __future__ import annotations

import signal

import pytest

from tests.lab import upstreams as ups
from tests.lab.dns import exchange
from tests.lab.netns import INET2_V4, INET2_V6
from tests.test_exits import FAST_HEALTH
from tests.test_metrics import scrape
from tests.test_runtime import wait_for
from tests.test_udp_tproxy import ECHO_PORT, start_echo_script, tproxy_udp, udp_lines, wait_log
from transocks.redirector.exits.config import DEFAULT_POOL
from transocks.redirector.exits.member import Health, HealthPolicy, UdpHealth
from transocks.redirector.exits.registry import DialSettings, Exits
from transocks.redirector.health import HealthChecker
from transocks.redirector.upstream import parse_proxy_url

pytestmark = pytest.mark.netns

UDP_DANTE_PORT = 1390  # serves UDP ASSOCIATE
TCP_DANTE_PORT = 1391  # CONNECT only: ASSOCIATE is refused by its rules
DAEMON_PORT = 1392  # transocks on the gw, TPROXY's on-port
METRICS_PORT = 19121
NO_UDP_LINE = "has no member that carries UDP"


@pytest.fixture(scope="module")
def dantes(lab, lab_logdir):
    with_udp = ups.start_dante(lab, UDP_DANTE_PORT, workdir=lab_logdir, udp=True)
    without = ups.start_dante(lab, TCP_DANTE_PORT, workdir=lab_logdir)
    yield with_udp, without
    with_udp.stop(lab)
    without.stop(lab)


def test_udp_associate_checks_against_dante_with_and_without_udp(lab, dantes):
    with_udp, without = dantes
    ex = Exits(DialSettings(3.0, 3.0), HealthPolicy(rise=1, fall=1))
    urls = [with_udp.url, with_udp.url6, without.url, without.url6]
    pool = ex.pool(DEFAULT_POOL, [parse_proxy_url(u) for u in urls])
    checker = HealthChecker(ex, 5, 5, None, [pool])
    with lab.netns(lab.client):
        passed = [checker.check(m) for m in pool.members]
    shown = {str(m): (m.state, m.udp, m.udp_error) for m in pool.members}
    assert passed == [True] * 4, shown  # every TCP check passes: both serve CONNECT
    assert [m.state for m in pool.members] == [Health.UP] * 4, shown
    assert [m.udp for m in pool.members] == [UdpHealth.UP, UdpHealth.UP, UdpHealth.DOWN, UdpHealth.DOWN], shown
    for m in pool.members[2:]:
        assert m.udp_error.startswith("udp associate check: socks5 reply 02"), shown  # not allowed by its rules
        assert m.usable("tcp") and not m.usable("udp")
    # UDP flows of this pool go only to the dante that serves UDP, TCP connections to both
    for i in range(20):
        dest = parse_proxy_url(f"socks5://203.0.113.{i}:53").endpoint
        assert {m.dialer.url.port for m in pool.candidates(dest, "udp")} == {UDP_DANTE_PORT}
        assert {m.dialer.url.port for m in pool.candidates(dest)} == {UDP_DANTE_PORT, TCP_DANTE_PORT}
    checker.udp_pools = []  # UDP off: the refusing dante's TCP check alone, its UDP state left as it was
    with lab.netns(lab.client):
        assert checker.check(pool.members[2]) and pool.members[2].udp is UdpHealth.DOWN


def write_config(path, dantes, tinyproxy, routes):
    with_udp, without = dantes
    path.write_text(f"proxy_url = {with_udp.url}\nproxy_url = {without.url}\n"
                    f"pool = web {tinyproxy.url}\n" + "".join(f"route = {r}\n" for r in routes))


def test_the_daemon_checks_udp_and_says_which_pool_cannot_carry_it(lab, dantes, upstreams, daemon, tmp_path):
    with_udp, without = dantes
    conf = tmp_path / "transocks.conf"
    write_config(conf, dantes, upstreams.tinyproxy, ["port=53 -> web"])
    d = daemon(["-c", str(conf), "--udp", "true", *FAST_HEALTH, "--metrics-listen", f"127.0.0.1:{METRICS_PORT}",
                "--control-socket", str(tmp_path / "ctl.sock")])

    def lines() -> list[str]:
        return [ln for ln in d.log_text().splitlines() if NO_UDP_LINE in ln]

    wait_for(lambda: lines(), 10, "the start's line")
    assert len(lines()) == 1 and "pool web " in lines()[0] and "http://" in lines()[0], d.log_text()

    def udp_up(url: str) -> str:
        return f'transocks_upstream_udp_up{{member="{url}",pool="default"}}'

    def settled(s: dict[str, float]) -> bool:
        return s.get(udp_up(with_udp.url)) == 1 and s.get(udp_up(without.url)) == 0

    wait_for(lambda: "metrics at" in d.log_text(), 10, "the metrics listener")  # may come after the workers'
    samples = wait_for(lambda: (s := scrape(lab, METRICS_PORT)) and settled(s) and s, 15, "UDP states in /metrics")
    assert samples[f'transocks_upstream_up{{member="{without.url}",pool="default"}}'] == 1  # in for TCP
    assert not any("upstream_udp_up" in k and "pool=\"web\"" in k for k in samples)  # HTTP CONNECT: no UDP state

    d.send_signal(signal.SIGHUP)  # the same configuration: the line again
    wait_for(lambda: d.log_text().count("reload done") == 1, 15, "first reload")
    assert len(lines()) == 2
    write_config(conf, dantes, upstreams.tinyproxy, ["proto=udp -> direct", "port=53 -> web"])
    d.send_signal(signal.SIGHUP)  # UDP flows go direct now: web is TCP's only
    wait_for(lambda: d.log_text().count("reload done") == 2, 15, "second reload")
    assert len(lines()) == 2, d.log_text()


def test_no_line_without_udp(lab, dantes, upstreams, daemon, tmp_path):
    conf = tmp_path / "transocks.conf"
    write_config(conf, dantes, upstreams.tinyproxy, ["port=53 -> web"])
    d = daemon(["-c", str(conf), "--control-socket", str(tmp_path / "ctl.sock")])
    wait_for(lambda: "workers ready" in d.log_text(), 10, "workers")
    assert NO_UDP_LINE not in d.log_text()


@pytest.fixture(scope="module")
def echo(lab):
    """A UDP echo on INET2_V4/INET2_V6 port 7 in the inet namespace (test_udp_tproxy's script), logging
    each datagram's source."""
    proc, record = start_echo_script(lab, (INET2_V4, INET2_V6), lab.tempdir("udp-policy-echo"))
    yield record
    lab.stop(proc)


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_udp_flows_leave_only_through_the_member_that_carries_udp(lab, dantes, upstreams, echo, daemon, family):
    """Default pool: the dante that refuses ASSOCIATE, an HTTP proxy and the dante that serves it,
    round-robin (so flows to one destination would take each in turn).  Once the checks have taken
    the refusing one out for UDP, every flow goes through the other: all answered, from the echo's
    own address, each session's line naming that member; no member is down for TCP."""
    with_udp, without = dantes
    server = INET2_V4 if family == "v4" else INET2_V6
    d = daemon(["--tproxy", "true", "--udp", "true", "--proxy-url", without.url, "--proxy-url",
                upstreams.tinyproxy.url, "--proxy-url", with_udp.url, "--balance", "round-robin",
                "--udp-idle-timeout", "2", *FAST_HEALTH,
                "--control-socket", str(lab.tempdir("udp-policy-ctl") / "ctl.sock")],
               DAEMON_PORT, redirect=False, ns=lab.gw, listens=[f"[::]:{DAEMON_PORT}"])
    d.redirects.append(tproxy_udp(lab, DAEMON_PORT, (INET2_V4, INET2_V6)))
    text = wait_log(d, f"exit {without.url} is out for UDP", timeout=15)
    assert f"exit {without.url} is out for UDP after 2 failed udp associate checks in a row: " \
           "udp associate check: socks5 reply 02" in text, text
    flows = 16
    for i in range(flows):
        payload = b"flow %d" % i
        data, peer = exchange(lab, lab.client, server, payload, ECHO_PORT)
        assert data == payload
        assert (peer[0], peer[1]) == (server, ECHO_PORT)  # from the destination, as NAT would answer
    dest = f"dest={server}:{ECHO_PORT}" if family == "v4" else f"dest=[{server}]:{ECHO_PORT}"
    lines = wait_for(lambda: len(ls := [ln for ln in udp_lines(d.log_text()) if dest in ln]) >= flows and ls,
                     15, "every session's line (written when it goes idle)")
    assert len(lines) == flows, d.log_text()
    assert all(f"upstream={with_udp.url} " in ln and "outcome=ok" in ln for ln in lines), lines
    assert "is down" not in d.log_text()  # both dantes stay in for TCP


def test_proto_routes_on_the_data_path(lab, dantes, echo, daemon):
    """`proto=udp dst=INET2_V6 -> reject` takes UDP to that address and nothing else: IPv4 flows are
    answered through the dante, the IPv6 flow reaches nothing (the echo's record says so) and gets no
    answer; `proto=tcp -> reject` after it does not hold for UDP."""
    with_udp, _without = dantes
    d = daemon(["--tproxy", "true", "--udp", "true", "--proxy-url", with_udp.url, "--udp-idle-timeout", "2",
                "--route", f"proto=udp dst={INET2_V6} -> reject", "--route", "proto=tcp -> reject",
                "--control-socket", str(lab.tempdir("udp-policy-ctl") / "ctl.sock")],
               DAEMON_PORT, redirect=False, ns=lab.gw, listens=[f"[::]:{DAEMON_PORT}"])
    d.redirects.append(tproxy_udp(lab, DAEMON_PORT, (INET2_V4, INET2_V6)))
    def from_v6() -> list[str]:  # what reached the echo over IPv6: "PORT PEER PEER_PORT LENGTH" lines
        return [ln for ln in echo.read_text().splitlines() if len(f := ln.split()) == 4 and ":" in f[1]]

    before = from_v6()
    data, peer = exchange(lab, lab.client, INET2_V4, b"routed", ECHO_PORT)
    assert data == b"routed" and peer == (INET2_V4, ECHO_PORT)
    with pytest.raises(TimeoutError):
        exchange(lab, lab.client, INET2_V6, b"rejected", ECHO_PORT, timeout=1.0)
    text = wait_log(d, "outcome=not_allowed", timeout=10)
    assert from_v6() == before, "a rejected datagram reached the destination"
    rejected = [ln for ln in udp_lines(text) if "outcome=not_allowed" in ln]
    assert len(rejected) == 1 and f"dest=[{INET2_V6}]:{ECHO_PORT}" in rejected[0], text
