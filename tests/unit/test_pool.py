"""Pools: parsing, balance order, health state, failover, probes and discovery (no namespaces)."""

from __future__ import annotations

import logging
import socket

import gevent
import pytest
from gevent.hub import Waiter

from tests.unit.test_dialers import recv_n, send, serve_script
from transocks.core import outcome
from transocks.core.config import Config, ConfigError
from transocks.core.netutil import Endpoint
from transocks.redirector import health as health_mod
from transocks.redirector.cli import describe_exits, make_router, validate
from transocks.redirector.exits.config import parse_pool
from transocks.redirector.exits.member import Health, HealthPolicy, Member, UdpHealth
from transocks.redirector.exits.registry import DialSettings, Exits
from transocks.redirector.flow import Flow
from transocks.redirector.health import Discovery, HealthChecker
from transocks.redirector.route import udp_without_exit
from transocks.redirector.settings import SETTINGS
from transocks.redirector.upstream import UpstreamError, parse_proxy_url
from transocks.redirector.upstream.base import at_member
from transocks.redirector.upstream.dial import Phase
from transocks.redirector.upstream.socks5 import check_reply

DEST = Endpoint("203.0.113.10", 9000)


def exits(rise=2, fall=3, connect_timeout=2.0, handshake_timeout=2.0) -> Exits:
    return Exits(DialSettings(connect_timeout, handshake_timeout), HealthPolicy(rise, fall))


def urls(*ports: int) -> list:
    return [parse_proxy_url(f"socks5://192.0.2.1:{p}") for p in ports]


def flow(dest: Endpoint = DEST, name: str | None = None) -> Flow:
    return Flow(dest, Endpoint("192.0.2.2", 40000), 1081, name)


class FakeDialer:
    """Stands in for a member's dialer: each dial pops the next scripted result."""

    def __init__(self, label: str, results: list, scheme: str = "socks5") -> None:
        self.label = label
        self.url = parse_proxy_url(f"{scheme}://192.0.2.1:1" if scheme != "direct" else "direct://")
        self.results = results
        self.dialed: list[Endpoint] = []

    def __str__(self) -> str:
        return self.label

    @property
    def upstream(self) -> Endpoint:
        return Endpoint("192.0.2.1", 1)

    def begin(self, dest: Endpoint, wire: bytes | None, on_done, claim=None) -> FakeDial:
        self.dialed.append(Endpoint(claim.name, dest.port) if claim else dest)  # a claim names it
        result = self.results.pop(0) if self.results else "ok"
        d = FakeDial(result)
        if result != "slow":  # a slow one never ends by itself
            d.phase = Phase.FAILED if isinstance(result, BaseException) else Phase.OPEN
            on_done(d)
        return d


class FakeDial:
    """What a Dial shows the pool: its phase, its error, its stream."""

    def __init__(self, result) -> None:
        self.phase = Phase.CONNECTING
        self.result = result
        self.error = result if isinstance(result, BaseException) else None
        self.cancelled = False

    @property
    def under_way(self) -> bool:
        return self.phase is Phase.CONNECTING

    def stream(self):
        return self.result

    def cancel(self) -> None:
        self.cancelled = True


def open_tunnel(pool, conn):
    """The pool's `begin`, waited for in this greenlet: the tunnel, or the failure raised."""
    waiter = Waiter()
    opening = pool.begin(conn, lambda _opening, _context: waiter.switch(None))
    try:
        waiter.get()
    except BaseException:
        opening.abort("the test's greenlet was stopped")
        raise
    return opening.stream()


def fake_pool(*scripts: list, balance="round-robin", retries="all", send_domain=False, **kw):
    ex = exits(**kw)
    pool = ex.pool("p", urls(*range(1, len(scripts) + 1)), balance, send_domain, retries)
    for m, script in zip(pool.members, scripts):
        m.dialer = FakeDialer(str(m.dialer), script)
    pool._turn = iter(range(0, 10**6, len(scripts)))  # round-robin always starts at the first member
    return ex, pool


REFUSED_BY_MEMBER = UpstreamError(outcome.UPSTREAM_UNREACHABLE, "connect to upstream: Connection refused")
DEST_REFUSED = UpstreamError(outcome.DEST_REFUSED, "socks5 reply 05: connection refused")


# --- configuration ----------------------------------------------------------------


def test_parse_pool():
    p = parse_pool("eu socks5://u:pw@192.0.2.5:1080 http://edge.example:3128 balance=least-conn send_domain=true")
    assert p.name == "eu" and [u.scheme for u in p.urls] == ["socks5", "http"]
    assert p.balance == "least-conn" and p.send_domain
    assert "pw" not in str(p) and "socks5://u@192.0.2.5:1080" in str(p)
    assert parse_pool("x direct://").balance == "sticky"


@pytest.mark.parametrize("text, words", [
    ("eu", "expected NAME URL"),
    ("default socks5://192.0.2.1:1", "reserved"),
    ("eu balance=sticky send_domain=true", "no member URL"),
    ("eu socks5://192.0.2.1:1 weight=3", "unknown pool option"),
    ("eu socks5://192.0.2.1:1 balance=random", "balance must be"),
    ("eu socks5://192.0.2.1:1 send_domain=maybe", "true/false"),
    ("eu reject://", "cannot be a pool member"),
    ("eu gopher://x:1", "unsupported proxy scheme"),
])
def test_parse_pool_errors(text, words):
    with pytest.raises(ValueError, match=words):
        parse_pool(text)


def load(argv, env=None):
    return Config("transocks", SETTINGS, "TRANSOCKS", "/nonexistent", validate=validate).load(argv, env or {})


def test_config_lines_add_up_and_errors_name_the_line(tmp_path):
    f = tmp_path / "t.conf"
    f.write_text("proxy_url = socks5://192.0.2.1:1080\nproxy_url = socks5://192.0.2.2:1080\n"
                 "pool = eu socks5://u:topsecret@192.0.2.9:1080 balance=round-robin\n"
                 "route = port=25 -> reject\nroute = domain=.example.com -> eu\n")
    cfg = load(["-c", str(f)])
    assert [str(u) for u in cfg.proxy_url] == ["socks5://192.0.2.1:1080", "socks5://192.0.2.2:1080"]
    assert [str(r) for r in cfg.route] == ["port=25 -> reject", "domain=.example.com -> eu"]
    shown = describe_exits(cfg)
    assert "topsecret" not in shown
    assert shown.index("port=25 -> reject") < shown.index("domain=.example.com -> eu")
    assert f"{f} (line 5)" in shown
    f.write_text(f.read_text() + "route = dst=10.0.0.0/8 -> us\n")
    with pytest.raises(ConfigError, match=rf"{f} \(line 6\): route dst=10.0.0.0/8 -> us: no pool named 'us'"):
        load(["-c", str(f)])
    f.write_text("pool = eu socks5://u:topsecret@192.0.2.9:1080 balance=fastest\n")
    with pytest.raises(ConfigError, match=r"\(line 1\): balance must be") as e:
        load(["-c", str(f)])
    assert "topsecret" not in str(e.value) and "u:***@" in str(e.value)
    f.write_text("pool = eu socks5://192.0.2.9:1080\npool = eu socks5://192.0.2.8:1080\n")
    with pytest.raises(ConfigError, match=r"\(line 2\): pool 'eu' is defined twice"):
        load(["-c", str(f)])


def test_routes_from_env_and_flags():
    cfg = load([], {"TRANSOCKS_ROUTE": "port=25 -> reject; dst=10.0.0.0/8 -> direct"})
    assert [r.target for r in cfg.route] == ["reject", "direct"]
    cfg = load(["--route", "listen=1082 -> direct", "--proxy-url", "http://u:pw@192.0.2.1:3128"])
    assert [r.target for r in cfg.route] == ["direct"]
    with pytest.raises(ConfigError) as e:
        load(["--proxy-url", "http://u:pw@192.0.2.1:bad"])
    assert ":pw@" not in str(e.value)


def test_router_targets_from_config():
    cfg = load(["--pool", "eu socks5://192.0.2.9:1080", "--route", "port=25 -> reject",
                "--route", "port=80 -> eu", "--route", "port=81 -> direct"])
    router = make_router(cfg, exits())
    assert router.route(flow(Endpoint("203.0.113.1", 25))) == "reject"
    assert str(router.route(flow(Endpoint("203.0.113.1", 80)))) == "eu"
    direct = router.route(flow(Endpoint("203.0.113.1", 81)))
    assert str(direct) == "direct" and not direct.checked
    assert str(router.route(flow(Endpoint("203.0.113.1", 82)))) == "default"


# --- balance order ----------------------------------------------------------------


def test_sticky_is_stable_and_a_removed_member_moves_only_its_share():
    ex = exits()
    pool = ex.pool("p", urls(1, 2, 3, 4))
    dests = [Endpoint(f"203.0.113.{i}", 443) for i in range(1, 201)]
    best = {d: pool.order(d)[0] for d in dests}
    assert all(pool.order(Endpoint(d.host, 21))[0] is best[d] for d in dests)  # the port does not matter
    assert len({id(m) for m in best.values()}) == 4  # every member gets a share
    gone = pool.members[1]
    gone.state = Health.DOWN
    for d in dests:
        chosen = pool.candidates(d)[0]
        if best[d] is gone:
            assert chosen is pool.order(d)[1]  # its share goes to each destination's next best
        else:
            assert chosen is best[d]  # everyone else stays put


def test_sticky_order_is_the_same_in_another_worker():
    a, b = exits().pool("p", urls(1, 2, 3)), exits().pool("p", urls(3, 1, 2))
    for i in range(50):
        d = Endpoint(f"198.51.100.{i}", 80)
        assert [str(m) for m in a.order(d)] == [str(m) for m in b.order(d)]


def test_round_robin_and_least_conn():
    pool = exits().pool("p", urls(1, 2, 3), "round-robin")
    firsts = [str(pool.order(DEST)[0]) for _ in range(6)]
    assert firsts[:3] == [str(m) for m in pool.members] and firsts[3:] == firsts[:3]
    pool = exits().pool("p", urls(1, 2, 3), "least-conn")
    pool.members[0].active, pool.members[1].active, pool.members[2].active = 5, 1, 3
    assert [m.active for m in pool.order(DEST)] == [1, 3, 5]


def test_candidates_skip_down_members_and_try_the_best_when_all_are_down():
    pool = exits().pool("p", urls(1, 2, 3), "sticky", retries=1)
    order = pool.order(DEST)
    assert pool.candidates(DEST) == order[:2]  # retries=1: the first and one more
    order[0].state = Health.DOWN
    assert pool.candidates(DEST) == order[1:3]
    for m in order:
        m.state = Health.DOWN
    assert pool.candidates(DEST) == order[:1]


# --- health state -------------------------------------------------------------------


def test_rise_and_fall_log_each_change_once(caplog):
    m = Member(FakeDialer("socks5://192.0.2.1:1", []), "socks5://edge.example:1")  # type: ignore[arg-type]
    policy = HealthPolicy(rise=2, fall=3)
    caplog.set_level(logging.INFO, logger="transocks")
    for _ in range(2):
        m.record(False, policy, "refused", "checks")
    assert m.up
    m.record(True, policy, "", "dials")  # a success in between starts the count again
    for _ in range(5):
        m.record(False, policy, "refused", "checks")
    assert m.state is Health.DOWN
    m.record(True, policy, "", "checks")
    assert not m.up
    m.record(True, policy, "", "checks")
    m.record(True, policy, "", "checks")
    assert m.up
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "down after 3 failed checks in a row: refused" in lines[0] and "(socks5://edge.example:1)" in lines[0]
    assert "up again" in lines[1]


def test_which_failures_are_the_members():
    assert at_member(REFUSED_BY_MEMBER)
    assert at_member(UpstreamError(outcome.AUTH_FAILED, "x"))
    assert at_member(UpstreamError(outcome.UPSTREAM_TIMEOUT, "x"))
    assert not at_member(DEST_REFUSED)
    for rep, member in ((0x01, True), (0x02, False), (0x04, False), (0x05, False)):
        with pytest.raises(UpstreamError) as e:
            check_reply(rep)
        assert at_member(e.value) is member, rep


# --- failover ----------------------------------------------------------------------


def test_failover_to_the_next_member():
    _ex, pool = fake_pool([REFUSED_BY_MEMBER], ["ok"])
    conn = flow()
    assert open_tunnel(pool, conn) == "ok"
    assert conn.tries == 2 and conn.member is pool.members[1]
    assert pool.members[0].fails == 1 and pool.members[1].fails == 0


def test_destination_answer_is_not_retried():
    _ex, pool = fake_pool([DEST_REFUSED], ["ok"])
    conn = flow()
    with pytest.raises(UpstreamError) as e:
        open_tunnel(pool, conn)
    assert e.value is DEST_REFUSED and conn.tries == 1
    assert pool.members[1].dialer.dialed == []
    assert pool.members[0].fails == 0  # it answered: it works


def test_retries_bound_and_last_error_passed_on():
    _ex, pool = fake_pool([REFUSED_BY_MEMBER], [REFUSED_BY_MEMBER], ["ok"], retries=1)
    conn = flow()
    with pytest.raises(UpstreamError) as e:
        open_tunnel(pool, conn)
    assert e.value.outcome == outcome.UPSTREAM_UNREACHABLE and conn.tries == 2


def test_passive_failures_take_a_member_out():
    _ex, pool = fake_pool([REFUSED_BY_MEMBER] * 3, ["ok"] * 3, fall=3)
    first = pool.members[0]
    for _ in range(3):
        open_tunnel(pool, flow())
    assert first.state is Health.DOWN
    conn = flow()
    open_tunnel(pool, conn)
    assert conn.tries == 1 and conn.member is pool.members[1]


def test_failover_within_the_connections_deadline():
    _ex, pool = fake_pool(["slow"], ["ok"], connect_timeout=0.2, handshake_timeout=0.1)
    conn = flow()
    with pytest.raises(UpstreamError, match=r"no tunnel within 0.3s \(1 tried\)") as e:
        open_tunnel(pool, conn)
    assert e.value.outcome == outcome.UPSTREAM_TIMEOUT


def test_send_domain_dials_the_name():
    _ex, pool = fake_pool(["ok"], send_domain=True)
    open_tunnel(pool, flow(name="www.example.com"))
    open_tunnel(pool, flow())
    assert pool.members[0].dialer.dialed == [Endpoint("www.example.com", 9000), DEST]
    _ex, plain = fake_pool(["ok"])
    open_tunnel(plain, flow(name="www.example.com"))
    assert plain.members[0].dialer.dialed == [DEST]


def test_empty_pool_refuses():
    ex = exits()
    pool = ex.pool("p", [parse_proxy_url("socks5://edge.invalid:1080")])
    with pytest.raises(UpstreamError, match="no members"):
        open_tunnel(pool, flow())


# --- active checks ----------------------------------------------------------------


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_probe_is_greeting_and_login():
    def script(conn):
        assert recv_n(conn, 5) == b"\x05\x03\x00\x02\x8c"
        send(conn, b"\x05\x02")
        assert recv_n(conn, 6) == b"\x01\x01u\x02pw"
        send(conn, b"\x01\x00")
        gevent.sleep(0.05)
        conn.close()

    port, g = serve_script(script)
    ex = exits()
    ex.pool("p", [parse_proxy_url(f"socks5://u:pw@127.0.0.1:{port}")])
    checker = HealthChecker(ex, 5, 1, None)
    m = ex.checked_members()[0]
    assert checker.check(m) and m.fails == 0
    g.join()
    assert g.successful()


def test_probe_with_target_opens_a_tunnel():
    seen = {}

    def script(conn):
        assert recv_n(conn, 5) == b"\x05\x03\x00\x8a\x8b"  # auto pipelining offers PIPELINED and NAMED too
        send(conn, b"\x05\x00")
        seen["request"] = recv_n(conn, 10)
        send(conn, b"\x05\x05\x00\x01" + bytes(6))  # the target refuses
        conn.close()

    port, g = serve_script(script)
    ex = exits(fall=1)
    ex.pool("p", [parse_proxy_url(f"socks5://127.0.0.1:{port}")])
    checker = HealthChecker(ex, 5, 1, Endpoint("203.0.113.10", 80))
    m = ex.checked_members()[0]
    assert not checker.check(m)
    assert seen["request"][3:] == b"\x01\xcb\x00\x71\x0a\x00\x50"
    assert m.state is Health.DOWN and "reply 05" in m.last_error
    g.join()


def test_probe_of_a_closed_port_and_a_silent_server_fail():
    ex = exits(fall=1)
    ex.pool("p", [parse_proxy_url(f"socks5://127.0.0.1:{free_port()}")])
    checker = HealthChecker(ex, 5, 0.5, None)
    m = ex.checked_members()[0]
    assert not checker.check(m) and "refused" in m.last_error

    silent = socket.create_server(("127.0.0.1", 0))
    try:
        ex = exits(fall=1)
        ex.pool("p", [parse_proxy_url(f"socks5://127.0.0.1:{silent.getsockname()[1]}")])
        m = ex.checked_members()[0]
        assert not HealthChecker(ex, 5, 0.3, None).check(m)
        assert "timed out" in m.last_error
    finally:
        silent.close()


def test_direct_exit_is_not_checked():
    ex = exits()
    ex.pool("direct", [parse_proxy_url("direct://")], checked=False)
    ex.pool("p", urls(1))
    assert [str(m) for m in ex.checked_members()] == ["socks5://192.0.2.1:1"]


# --- discovery --------------------------------------------------------------------


def test_discovery_makes_each_address_a_member(monkeypatch):
    answers = {"edge.example": ["192.0.2.7", "2001:db8::7"]}

    def fake_getaddrinfo(host, port, family, kind):
        if host not in answers:
            raise OSError(-2, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, kind, 6, "", (a, port)) for a in answers[host]]

    monkeypatch.setattr(health_mod, "getaddrinfo", fake_getaddrinfo)
    ex = exits()
    pool = ex.pool("p", [parse_proxy_url("socks5://edge.example:1080"), parse_proxy_url("socks5://192.0.2.1:1")])
    changes = []
    discovery = Discovery(ex, 30, lambda: changes.append(sorted(map(str, ex.endpoints()))))
    discovery.resolve_all()
    assert [str(m) for m in pool.members] == ["socks5://192.0.2.7:1080", "socks5://[2001:db8::7]:1080",
                                             "socks5://192.0.2.1:1"]
    assert changes == [["192.0.2.1:1", "192.0.2.7:1080", "[2001:db8::7]:1080"]]
    kept = pool.members[1]
    kept.state = Health.DOWN
    answers["edge.example"] = ["2001:db8::7"]
    discovery.resolve_all()
    assert pool.members[0] is kept and kept.state is Health.DOWN  # its state stays with the address
    assert len(pool.members) == 2 and len(changes) == 2
    discovery.resolve_all()
    assert len(changes) == 2  # unchanged: nothing to tell
    del answers["edge.example"]
    discovery.resolve_all()
    assert pool.members[0] is kept  # a failed lookup keeps the addresses it had


# --- UDP flows ----------------------------------------------------------------------


def udp_flow(dest: Endpoint = DEST) -> Flow:
    return Flow(dest, Endpoint("192.0.2.2", 40000), 1081, None, "udp")


def mixed_pool(balance="sticky"):
    ex = exits()
    pool = ex.pool("p", [parse_proxy_url(u) for u in ("http://192.0.2.1:3128", "socks5://192.0.2.1:1",
                                                       "socks4://192.0.2.1:2", "socks5://192.0.2.1:3",
                                                       "direct://")], balance)
    return ex, pool


def test_udp_flows_skip_members_without_udp_in_balance_order():
    _ex, pool = mixed_pool()
    udp = {"socks5://192.0.2.1:1", "socks5://192.0.2.1:3", "direct://"}
    for i in range(40):
        d = Endpoint(f"203.0.113.{i}", 53)
        tcp_order = [str(m) for m in pool.order(d)]
        assert len(tcp_order) == 5
        # the same sticky order with the others left out: one destination, one member, as for TCP
        assert [str(m) for m in pool.order(d, "udp")] == [s for s in tcp_order if s in udp]
        assert [str(m) for m in pool.candidates(d, "udp")] == [s for s in tcp_order if s in udp]
    _ex, rr = mixed_pool("round-robin")
    assert {str(rr.order(DEST, "udp")[0]) for _ in range(6)} == udp


def test_udp_state_is_apart_from_tcp_and_counts_rise_and_fall(caplog):
    _ex, pool = mixed_pool()
    policy = HealthPolicy(rise=2, fall=2)
    http, socks, socks4, other, direct = pool.members
    assert [m.udp for m in pool.members] == [UdpHealth.NONE, UdpHealth.UP, UdpHealth.NONE, UdpHealth.UP,
                                              UdpHealth.UP]
    caplog.set_level(logging.INFO, logger="transocks")
    for _ in range(3):
        socks.record_udp(False, policy, "socks5 reply 07: command not supported", "udp associate checks")
    assert socks.udp is UdpHealth.DOWN and socks.up  # out for UDP, still in for TCP
    assert socks.usable("tcp") and not socks.usable("udp")
    assert socks not in pool.candidates(DEST, "udp") and socks in pool.candidates(DEST)
    http.record_udp(False, policy, "x", "udp associate checks")  # no UDP state to change
    assert http.udp is UdpHealth.NONE
    other.state = Health.DOWN  # down for TCP: out for UDP too
    assert pool.candidates(DEST, "udp") == [direct]
    socks.record_udp(True, policy, "", "udp associate checks")
    assert socks.udp is UdpHealth.DOWN
    socks.record_udp(True, policy, "", "udp associate checks")
    assert socks.udp is UdpHealth.UP and socks.usable("udp")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "socks5://192.0.2.1:1 is out for UDP after 2 failed udp associate checks in a row: socks5 reply 07" \
        in lines[0]
    assert "carries UDP again" in lines[1]


def test_udp_candidates_when_every_member_is_out_try_the_best_that_carries_udp():
    _ex, pool = mixed_pool()
    for m in pool.members:
        m.state = Health.DOWN
    best = pool.order(DEST, "udp")[0]
    assert pool.candidates(DEST, "udp") == [best] and best.carries("udp")


def test_a_pool_without_udp_members_fails_its_udp_flows_clearly():
    ex = exits()
    pool = ex.pool("web", [parse_proxy_url("http://192.0.2.1:3128"), parse_proxy_url("socks4a://192.0.2.1:1")])
    assert pool.candidates(DEST, "udp") == [] and pool.lacks("tcp") == ""
    assert pool.lacks("udp") == "pool web has no member that carries UDP (direct://, reject://, socks5://)"
    with pytest.raises(UpstreamError, match="pool web has no member that carries UDP") as e:
        open_tunnel(pool, udp_flow())
    assert e.value.outcome == outcome.UPSTREAM_UNREACHABLE


@pytest.mark.parametrize("argv, pools", [
    (["--proxy-url", "http://192.0.2.1:3128"], ["default"]),
    (["--proxy-url", "http://192.0.2.1:3128", "--route", "proto=udp -> direct"], []),
    (["--proxy-url", "http://192.0.2.1:3128", "--route", "proto=udp port=53 -> direct"], ["default"]),
    (["--proxy-url", "socks5://192.0.2.1:1", "--pool", "web http://192.0.2.1:3128 socks4://192.0.2.1:2",
      "--route", "port=53 -> web"], ["web"]),
    (["--proxy-url", "socks5://192.0.2.1:1", "--pool", "web http://192.0.2.1:3128",
      "--route", "proto=tcp port=53 -> web", "--route", "domain=example.com -> web"], []),
    (["--proxy-url", "socks4://192.0.2.1:1", "--pool", "web http://192.0.2.1:3128 direct://",
      "--route", "proto=udp -> web", "--route", "port=53 -> default"], []),
    (["--proxy-url", "socks5://192.0.2.1:1", "--proxy-url", "http://192.0.2.1:3128"], []),
])
def test_pools_udp_flows_reach_without_an_exit_for_them(argv, pools):
    cfg = load(argv)
    lines = udp_without_exit(cfg.proxy_url, cfg.pool, cfg.route)
    assert [line.split("pool ")[1].split()[0] for line in lines] == pools
    for line in lines:
        assert "has no member that carries UDP" in line and "UDP needs socks5:// or direct://" in line


class AssociatingServer:
    """A SOCKS5 server on loopback for the checks: the greeting, then UDP ASSOCIATE answered
    with `rep` (0: a relay address) and held open until the client leaves; counts commands."""

    def __init__(self, rep: int = 0) -> None:
        self.rep = rep
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.greetings = 0
        self.commands: list[int] = []
        self.task = gevent.spawn(self._serve)

    def _serve(self) -> None:
        from transocks.core import nio

        while True:
            nio.wait(self.sock, 1)
            conn, _ = self.sock.accept()
            conn.setblocking(False)
            gevent.spawn(self._one, conn)

    def _one(self, conn) -> None:
        from transocks.core import nio

        try:
            head = recv_n(conn, 2)
            recv_n(conn, head[1])
            self.greetings += 1
            send(conn, b"\x05\x00")
            request = recv_n(conn, 10)  # an IPv4 request (ANY is 0.0.0.0:0)
            self.commands.append(request[1])
            send(conn, bytes([5, self.rep, 0, 1, 127, 0, 0, 1, 0x27, 0x0f]))
            nio.wait(conn, 1)
            conn.recv(1)
        except (OSError, EOFError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.task.kill()
        self.sock.close()


def udp_checker(server_port: int, udp: bool = True, fall: int = 1) -> tuple[HealthChecker, Member]:
    ex = exits(fall=fall, rise=1)
    pool = ex.pool("p", [parse_proxy_url(f"socks5://127.0.0.1:{server_port}")])
    return HealthChecker(ex, 5, 1, None, [pool, "reject"] if udp else ()), pool.members[0]


def test_udp_check_opens_an_association_after_the_tcp_check():
    server = AssociatingServer()
    try:
        checker, m = udp_checker(server.port)
        assert checker.check(m)
        gevent.sleep(0.05)
        assert server.greetings == 2 and server.commands == [3]  # the probe's greeting, then one ASSOCIATE
        assert m.up and m.udp is UdpHealth.UP and m.usable("udp")
    finally:
        server.close()


def test_a_refused_association_takes_the_member_out_for_udp_only():
    server = AssociatingServer(rep=7)
    try:
        checker, m = udp_checker(server.port, fall=2)
        assert checker.check(m) and m.udp is UdpHealth.UP  # one failure: fall=2
        assert checker.check(m)  # the TCP check passes: the result is TCP's
        assert m.up and m.udp is UdpHealth.DOWN and "reply 07" in m.udp_error
        assert server.commands == [3, 3]
        server.rep = 0
        checker.check(m)
        assert m.udp is UdpHealth.UP  # rise=1
    finally:
        server.close()


def test_no_association_without_udp_or_outside_the_pools_udp_reaches():
    server = AssociatingServer(rep=7)
    try:
        checker, m = udp_checker(server.port, udp=False)
        assert checker.check(m)
        ex = exits(fall=1)
        tcp_only = ex.pool("t", [parse_proxy_url(f"socks5://127.0.0.1:{server.port}")])
        reached = ex.pool("u", [parse_proxy_url("socks5://127.0.0.1:1")])
        checker = HealthChecker(ex, 5, 1, None, [reached])
        assert not checker.checks_udp(tcp_only.members[0]) and checker.checks_udp(reached.members[0])
        assert checker.check(tcp_only.members[0])
        gevent.sleep(0.05)
        assert server.greetings == 2 and server.commands == [] and m.udp is UdpHealth.UP
    finally:
        server.close()


def test_no_association_when_the_tcp_check_fails():
    checker, m = udp_checker(free_port())
    assert not checker.check(m) and not m.up
    assert m.udp is UdpHealth.UP and m.udp_error == ""  # its UDP state is left as it was


def test_udp_state_in_the_metrics_of_socks5_members_when_udp_is_on():
    from transocks.redirector.exits.metrics import report_members
    from transocks.runtime.metrics import ConnectionStats

    ex, pool = mixed_pool()
    pool.members[1].udp = UdpHealth.DOWN
    stats = ConnectionStats()
    report_members(ex, stats, udp=True)
    for refresh in stats.refresh:
        refresh()
    udp = {labels[1]: v for (name, labels), v in stats.gauges.items() if name == "upstream_udp_up"}
    assert udp == {"socks5://192.0.2.1:1": 0.0, "socks5://192.0.2.1:3": 1.0}
    stats = ConnectionStats()
    report_members(ex, stats)
    for refresh in stats.refresh:
        refresh()
    assert "upstream_udp_up" not in stats.families and all(k[0] != "upstream_udp_up" for k in stats.gauges)
