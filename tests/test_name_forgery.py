"""Names a client cannot forge (issue 17), through real iptables REDIRECT.

transocks runs in the client namespace (as `daemon`, its own connections left alone by
the nat rules), edges in the gw (usocksd from this checkout, dante), and the servers are
recording listeners on extra documentation addresses of the inet namespace.  Names come
from hosts-file overlays of the client and gw namespaces.  Every security property is
decided by what reached which address (tests/lab/recorder.py): a connection that left
directly shows the client's address as its peer, one through an edge the gw's.

A forged name is a ClientHello's server_name or a request's Host header that does not
resolve to the address the client connected to: transocks must route such a connection
by its address alone and never send the name to an edge that would connect elsewhere.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest

from tests import usocksd_fixtures as uf
from tests.lab import upstreams as ups
from tests.lab.names import SilentDns, dns_lookups, hosts_overlay, rewrite_hosts
from tests.lab.netns import CLIENT_V4, GW_EXT_V4
from tests.lab.recorder import SynCount, recording
from tests.lab.tls import make_certs, start_client, start_s_server
from tests.test_datapath import connect, wait_log
from tests.test_exits import FIELD, nat_redirect
from tests.test_metrics import scrape
from tests.test_runtime import wait_for
from transocks.core.namecheck import RETRY_MISS

pytestmark = pytest.mark.netns

DENIED = "203.0.113.7"  # the edge refuses it
NAMED = "203.0.113.20"  # allowed.example and blocked.example (one IP, two names)
OTHER = "203.0.113.21"  # other.example: the server a forged name points at
PLAIN = "203.0.113.22"  # named by nobody; the edge lets it through
RR_A, RR_B, RR_C = "203.0.113.23", "203.0.113.24", "203.0.113.25"  # rr.example answers A, then B; never C
ADDRESSES = (DENIED, NAMED, OTHER, PLAIN, RR_A, RR_B, RR_C)
NAMES = {"allowed.example": [NAMED], "blocked.example": [NAMED], "other.example": [OTHER], "rr.example": [RR_A]}
LISTEN = 1110
DANTE_PORT = 1380  # a dante started after the gw's hosts overlay, so it resolves NAMES
METRICS_PORT = 19127
DIRECT_PEER = CLIENT_V4  # what a server sees of a connection transocks made itself
EDGE_PEER = GW_EXT_V4  # ... and of one an edge made


@pytest.fixture(scope="module")
def world(lab) -> Iterator[dict[str, list[str]]]:
    """ADDRESSES on the inet namespace's loopback, NAMES in the client's and gw's hosts files."""
    for addr in ADDRESSES:
        lab.run(lab.inet, ["ip", "addr", "add", f"{addr}/32", "dev", "lo"])
    try:
        with hosts_overlay(lab, lab.client, NAMES), hosts_overlay(lab, lab.gw, NAMES):
            yield NAMES
    finally:
        for addr in ADDRESSES:
            lab.run(lab.inet, ["ip", "addr", "del", f"{addr}/32", "dev", "lo"], check=False)


@pytest.fixture(scope="module")
def named_dante(lab, world, lab_logdir) -> Iterator[ups.Upstream]:
    """dante started inside the gw's hosts overlay: a third-party edge that resolves names."""
    up = ups.start_dante(lab, DANTE_PORT, workdir=lab_logdir)
    yield up
    up.stop(lab)


@pytest.fixture
def usocksd(lab, world, tmp_path):
    factory = uf.UsocksdFactory(lab, tmp_path)
    try:
        yield factory.start
    finally:
        factory.close()


@pytest.fixture
def transocks(lab, daemon):
    """Factory: transocks with the config `lines`; with `direct` (a route to direct) it runs as
    `daemon`, whose own connections the nat rules leave alone, so they are not redirected back
    to it.  (Not always: the python of this machine may live under /root, and the modules it
    imports late, like prometheus_client's gzip, are then unreadable to `daemon`.)"""

    def start(*lines: str, direct: bool = False, args: Sequence[str] = (), port: int = LISTEN):
        conf = lab.tempdir("conf") / "t.conf"
        conf.write_text("".join(f"{ln}\n" for ln in lines))
        if not direct:
            return daemon(["-c", str(conf), *args], port)
        d = daemon(["-c", str(conf), "--user", "daemon", *args], port, redirect=False)
        nat_redirect(lab, d, [["-m", "owner", "--uid-owner", "daemon", "-j", "RETURN"],
                              ["-j", "REDIRECT", "--to-ports", str(port)]])
        return d

    return start


# --- what a client sends, and what it got ------------------------------------------------------


def client_hello(name: str) -> bytes:
    """A real ClientHello (Python's ssl) with server_name `name`."""
    return start_client(name)[3]


def http_head(name: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {name}\r\nUser-Agent: forger\r\nAccept: */*\r\n\r\n".encode()


def forms(name: str) -> list[tuple[str, int, bytes]]:
    """The name as SNI on 443 and as Host on 80 (both default sniff ports)."""
    return [("sni", 443, client_hello(name)), ("host", 80, http_head(name))]


@dataclass
class Attempt:
    data: bytes
    reset: bool

    @property
    def served(self) -> bool:
        """The recording server answered: the connection reached it."""
        return self.data.startswith(b"seen ")


def attempt(lab, host: str, port: int, payload: bytes) -> Attempt:
    """Connect through the REDIRECT, send `payload`, read to EOF or reset."""
    data = b""
    try:
        sock = connect(lab, host, port, timeout=10)
    except ConnectionResetError:
        return Attempt(b"", True)
    try:
        sock.sendall(payload)
        while chunk := sock.recv(4096):
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        return Attempt(data, True)
    finally:
        sock.close()
    return Attempt(data, False)


def access(proc, keep, count: int = 1, timeout: float = 5.0) -> list[dict[str, str]]:
    """Access lines (transocks or usocksd) that `keep` accepts, once there are `count` of them:
    a line is written when the connection has ended on both sides."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [{k: v.strip('"') for k, v in FIELD.findall(ln)} for ln in proc.log_text().splitlines()
                 if ln.startswith("time=")]
        kept = [ln for ln in lines if keep(ln)]
        if len(kept) >= count or time.monotonic() > deadline:
            return kept
        time.sleep(0.05)


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- 1. a forged name on a name route ---------------------------------------------------------


@pytest.mark.parametrize("target", ["direct", "pool"])
def test_forged_name_on_a_domain_route_goes_by_address(lab, world, upstreams, usocksd, transocks, target):
    """`domain=allowed.example` routes to direct (or to a pool without send_domain, dante that
    would reach anything); the default is a usocksd edge that denies DENIED and NAMED.  A
    connection to DENIED carrying allowed.example (SNI or Host) goes by its address, to the edge,
    which refuses it: DENIED records nothing.  The same name sent to NAMED, where it resolves,
    takes the name's route: NAMED is reached, which by address alone it could not be."""
    edge = usocksd(["--deny-dest", DENIED, "--deny-dest", NAMED])
    if target == "direct":
        lines, peer = ["route = domain=allowed.example -> direct"], DIRECT_PEER
    else:
        lines = [f"pool = alt {upstreams.dante.url}", "route = domain=allowed.example -> alt"]
        peer = EDGE_PEER
    transocks(f"proxy_url = {edge.url()}", *lines, direct=target == "direct")
    with recording(lab, lab.inet, [(h, p) for h in (DENIED, NAMED) for p in (80, 443)]) as rec:
        for kind, port, payload in forms("allowed.example"):
            forged = attempt(lab, DENIED, port, payload)
            assert rec.at(DENIED) == [], f"forged {kind} reached {DENIED}: {rec.at(DENIED)}"
            assert forged.reset and not forged.data, (kind, forged)
            honest = attempt(lab, NAMED, port, payload)
            assert honest.served, (kind, honest)
            assert [h.peer for h in rec.at(NAMED, port)] == [peer], (kind, rec.hits)
    refused = access(edge, lambda ln: ln.get("dest") == hostport(DENIED, 443), 1)
    assert refused and refused[0].get("outcome") != "ok", refused


# --- 2. a forged name sent to the edge --------------------------------------------------------


@pytest.mark.parametrize("edge_kind", ["dante", "usocksd", "usocksd-refuse"])
def test_forged_name_with_send_domain_never_reaches_the_names_server(lab, world, request, usocksd, transocks,
                                                                     edge_kind):
    """send_domain = true; a connection to PLAIN carrying other.example (which resolves to OTHER).
    dante (third party) gets the address, not the unverified name; usocksd gets both and connects
    to the original address (dest_name_mismatch = address) or refuses (= refuse).  Either way
    OTHER records nothing from it; the honest other.example to OTHER is still served by name."""
    if edge_kind == "dante":
        url, edge = request.getfixturevalue("named_dante").url, None
    else:
        edge = usocksd(["--dest-name-mismatch", "refuse"] if edge_kind == "usocksd-refuse" else [])
        url = edge.url()
    refuse = edge_kind == "usocksd-refuse"
    transocks(f"proxy_url = {url}", "send_domain = true", f"metrics_listen = 127.0.0.1:{METRICS_PORT}")
    with recording(lab, lab.inet, [(h, p) for h in (PLAIN, OTHER) for p in (80, 443)]) as rec:
        for kind, port, payload in forms("other.example"):
            forged = attempt(lab, PLAIN, port, payload)
            assert rec.at(OTHER, port) == [], f"forged {kind} reached the name's server: {rec.hits}"
            if refuse:
                assert rec.at(PLAIN, port) == [] and forged.reset and not forged.data, (kind, forged, rec.hits)
            else:
                assert forged.served, (kind, forged)
                assert [h.peer for h in rec.at(PLAIN, port)] == [EDGE_PEER], (kind, rec.hits)
            honest = attempt(lab, OTHER, port, payload)
            assert honest.served, (kind, honest)
            assert [h.peer for h in rec.at(OTHER, port)] == [EDGE_PEER], (kind, rec.hits)
    if edge is not None:  # the edge's access line says which name and address were asked for
        for host, match in ((PLAIN, "no"), (OTHER, "yes")):
            for port in (80, 443):
                lines = access(edge, lambda ln, h=host, p=port: ln.get("dest") == hostport(h, p), 1)
                assert [(ln.get("host"), ln.get("name_match")) for ln in lines] == [("other.example", match)], lines
    else:  # transocks checked the names itself before sending one to a third party
        for outcome in ("unverified", "verified"):
            sample = f'transocks_name_checks_total{{outcome="{outcome}"}}'
            wait_for(lambda s=sample: metric(lab, s) >= 2, 10, sample)  # workers flush once a second


def metric(lab, sample: str) -> float:
    try:
        return scrape(lab, METRICS_PORT).get(sample, 0.0)
    except subprocess.CalledProcessError:  # the metrics listener may come after the workers
        return 0.0


# --- 3. round-robin answers -------------------------------------------------------------------


def test_rotating_answers_do_not_flap_the_domain_route(lab, world, upstreams, transocks):
    """rr.example answers {A}, then {B}, then {A} again (the client's hosts file rewritten between
    connections); within name_cache_ttl (default 60 s) connections to A and B carrying the name keep
    taking its direct route (the server sees the client's own address), while the name sent to C,
    never among its answers, goes by address to the default exit (dante).  After each change of
    answers the test waits out RETRY_MISS: an address missing from the union asks the resolver
    again at most that often (a forger cannot buy a lookup per connection)."""
    transocks(f"proxy_url = {upstreams.dante.url}", "route = domain=rr.example -> direct", direct=True)
    hello = client_hello("rr.example")
    try:
        with recording(lab, lab.inet, [(h, 443) for h in (RR_A, RR_B, RR_C)]) as rec:
            answered = [RR_A]
            for answers, dest in (([RR_A], RR_A), ([RR_B], RR_B), ([RR_B], RR_A), ([RR_A], RR_B), ([RR_A], RR_A)):
                if answers != answered:
                    rewrite_hosts(lab, lab.client, {**NAMES, "rr.example": answers})
                    answered = answers
                    time.sleep(RETRY_MISS + 0.2)
                before = len(rec.at(dest))
                got = attempt(lab, dest, 443, hello)
                assert got.served, (answers, dest, got)
                assert [h.peer for h in rec.at(dest)[before:]] == [DIRECT_PEER], (answers, dest, rec.hits)
            got = attempt(lab, RR_C, 443, hello)
            assert got.served and [h.peer for h in rec.at(RR_C)] == [EDGE_PEER], (got, rec.hits)
    finally:
        rewrite_hosts(lab, lab.client, NAMES)


# --- 4. a lookup that never answers -----------------------------------------------------------


def test_lookup_timeout_goes_on_unverified(lab, world, upstreams, transocks):
    """slow.example is in no hosts file and the client namespace's DNS server never answers; with
    name_check_timeout = 0.5 the connection goes on as a nameless one: by address to the default
    exit (dante), not by the name's direct route; the access line says host_unverified=."""
    dns = SilentDns(lab, lab.client)
    try:
        with dns_lookups(lab, lab.client, dns.host), recording(lab, lab.inet, [(PLAIN, 443)]) as rec:
            d = transocks(f"proxy_url = {upstreams.dante.url}", "route = domain=slow.example -> direct",
                          direct=True, args=["--name-check-timeout", "0.5"])  # over the lab's default
            got = attempt(lab, PLAIN, 443, client_hello("slow.example"))
            assert got.served, got
            assert [h.peer for h in rec.at(PLAIN)] == [EDGE_PEER], rec.hits
            assert dns.queries >= 1  # the lookup was asked and hung: the deadline, not a failure, ended it
    finally:
        dns.close()
    wait_log(d, "host_unverified=slow.example")


# --- 5. the honest names still work ----------------------------------------------------------


def test_two_names_on_one_ip_are_served_and_refused_by_name(lab, world, usocksd, transocks):
    """The issue's Done-when: `curl https://allowed.example/` and `curl https://blocked.example/`,
    both names on NAMED, through a usocksd edge with deny_dest = blocked.example and send_domain:
    the first is served, the second refused by its name (no SYN of it reaches NAMED), and the edge
    connects to the original address, having checked the name against it."""
    certs = make_certs(lab.tempdir("ca"), ["allowed.example", "blocked.example"])
    servers = start_s_server(lab, certs, hosts=(NAMED,))
    syns = SynCount(lab, lab.inet, NAMED, 443)
    try:
        edge = usocksd(["--deny-dest", "blocked.example"])
        transocks(f"proxy_url = {edge.url()}", "send_domain = true")
        results = {}
        for name in ("allowed.example", "blocked.example"):
            before = syns.count()
            res = lab.run(lab.client, ["curl", "-sS", "-4", "--max-time", "10", "--cacert", str(certs.ca),
                                       "-o", "/dev/null", "-w", "%{http_code}", f"https://{name}/"],
                          check=False, timeout=20)
            results[name] = (res.returncode, res.stdout.strip(), syns.count() - before)
        assert results["allowed.example"] == (0, "200", 1), results
        rc, code, reached = results["blocked.example"]
        assert rc != 0 and code != "200" and reached == 0, results
    finally:
        syns.close()
        for svc in servers:
            svc.stop(lab)
    served = access(edge, lambda ln: ln.get("host") == "allowed.example", 1)
    assert [(ln.get("dest"), ln.get("name_match"), ln.get("outcome")) for ln in served] == \
        [(hostport(NAMED, 443), "yes", "ok")], served
    refused = access(edge, lambda ln: ln.get("host") == "blocked.example", 1)
    assert len(refused) == 1 and refused[0].get("outcome") != "ok", refused
