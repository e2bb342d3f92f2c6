"""UDP end to end (issue 21, item 5): real clients and servers in namespaces.

The first tests are the fixtures' own, through the kernel NAT transocks replaces (a gw that
masquerades the client network in a lab of its own): `dig` against dnsmasq, an NTP exchange
with chronyd, `iperf3 -u` with its loss counted, and the UDP recorder's view of who sent what.
They prove the fixtures (and are the bench's baseline), so they pass on any tree.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.lab.dns import Dnsmasq, answer_addresses, dig, exchange, query, start_dnsmasq
from tests.lab.netns import (
    CLIENT_NET_V6,
    GW_EXT_V6,
    GW_NAT_V4,
    INET2_V4,
    INET_V4,
    INET_V6,
    Lab,
    require_root_and_tools,
)
from tests.lab.ntp import Chronyd, ntp_query, start_chronyd
from tests.lab.services import Service, start_iperf3
from tests.lab.udp import UdpRecorder, iperf3_udp, port_unreachable_after, send_and_receive

pytestmark = pytest.mark.netns

UDP_TOOLS = ("dig", "dnsmasq", "chronyd", "chronyc", "iperf3", "setpriv")
NAME = "www.example"
IPERF_PORT = 5201
ECHO_PORT = 7000


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
    assert after.requests == (before.requests if before else 0) + 1


def test_nat_iperf3_udp_reports_its_loss(nat_lab):
    lab, _ = nat_lab
    got = iperf3_udp(lab, lab.client, INET_V4, IPERF_PORT, rate="10M", seconds=1)
    assert got.packets > 0 and 0 <= got.lost <= got.packets


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
