"""`transocks rules` with `udp = true`, applied and removed in the lab's namespaces.

A plain UDP socket with IP_TRANSPARENT and IP_RECVORIGDSTADDR bound on the
listen address stands in for transocks' UDP listener: what the rules divert
reaches it, and the original destination it reads from the ancillary data is
what these tests check.  A datagram to a port in udp_reject_ports is refused
in the kernel with ICMP port unreachable, so a connected UDP client learns it
at once (ECONNREFUSED).  A reply socket bound on the original destination
sends the answers from there and takes none of the flow's later datagrams
(with a socket match in the rules it would).  The host's own traffic (mangle OUTPUT mark, policy
routing through lo, TPROXY in PREROUTING) and a gateway's (PREROUTING from
the client namespace), both formats, both families; --remove leaves the
namespace's rules, ip rules and routes exactly as they were.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import sys
from collections.abc import Iterator

import pytest

from tests.lab.netns import Lab
from tests.lab.rulesets import snapshot, transocks

pytestmark = pytest.mark.netns

FORMATS = ["iptables", "nft"]
PORT = 1095
# "The Internet": addresses no namespace has, so only the rules can deliver a datagram sent there.
DNS = {4: "198.51.100.53", 6: "2001:db8:1::53"}
IP_TRANSPARENT, IP_RECVORIGDSTADDR = 19, 20
IPV6_RECVORIGDSTADDR, IPV6_TRANSPARENT = 74, 75
WAIT = 10.0  # a ceiling for what should come at once, never a measurement


class StandIn:
    """transocks' UDP listener as far as the rules can tell: transparent, reading original destinations."""

    def __init__(self, lab: Lab, ns: str, host: str, port: int) -> None:
        v6 = ":" in host
        with lab.netns(ns):
            self.sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        if v6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self.sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            self.sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
        else:
            self.sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
            self.sock.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
        self.sock.bind((host, port))
        self.sock.settimeout(WAIT)

    def receive(self) -> tuple[bytes, tuple[str, int], tuple[str, int]]:
        """(payload, sender, original destination) of the next datagram."""
        data, ancdata, _flags, sender = self.sock.recvmsg(2048, 256)
        for level, kind, raw in ancdata:
            if (level, kind) == (socket.IPPROTO_IP, IP_RECVORIGDSTADDR):
                port, addr = struct.unpack_from("!H4s", raw, 2)
                return data, sender[:2], (socket.inet_ntop(socket.AF_INET, addr), port)
            if (level, kind) == (socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR):
                port, _flow, addr = struct.unpack_from("!HI16s", raw, 2)
                return data, sender[:2], (socket.inet_ntop(socket.AF_INET6, addr), port)
        raise AssertionError(f"no original destination in {ancdata!r}")

    def empty(self) -> bool:
        """Nothing queued now (a datagram the rules diverted is queued before its sender's call returns)."""
        return self.nothing_queued(self.sock)

    @staticmethod
    def nothing_queued(sock: socket.socket) -> bool:
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            sock.recv(2048)
        except BlockingIOError:
            return True
        finally:
            sock.settimeout(timeout)
        return False

    def close(self) -> None:
        self.sock.close()


def client(lab: Lab, ns: str, host: str, port: int) -> socket.socket:
    """A connected UDP socket of a process in `ns`."""
    with lab.netns(ns):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(WAIT)
    sock.connect((host, port))
    return sock


def refused(sock: socket.socket) -> bool:
    """Whether the kernel refused the datagram with ICMP port unreachable.

    REJECT in OUTPUT fails the host's send() itself (EPERM) and queues the
    ICMP error for the next receive; through a gateway only the ICMP error
    comes back.  Either way a connected socket's recv() sees ECONNREFUSED.
    """
    with contextlib.suppress(PermissionError):
        sock.send(b"quic initial")
    try:
        sock.recv(2048)
    except ConnectionRefusedError:
        return True
    except OSError as exc:
        raise AssertionError(f"expected ECONNREFUSED, got {exc!r}") from exc
    return False


def dig_refused(lab: Lab, ns: str, host: str) -> bool:
    """dig (a real client) to QUIC's port: it reports the ICMP error rather than a timeout."""
    res = lab.run(ns, ["dig", f"@{host}", "-p", "443", "+tries=1", "+timeout=5", "example.test"], check=False)
    return f"communications error to {host}#443: connection refused" in res.stdout + res.stderr


@contextlib.contextmanager
def icmp_unlimited(lab: Lab, ns: str) -> Iterator[None]:
    """The kernel rate-limits ICMP errors to each remote host (after a burst of about 6, one a
    second): a gateway refusing these tests' many datagrams would start to stay silent.  Loopback,
    where the host's own errors go, is never limited."""
    names = ("net.ipv4.icmp_ratelimit", "net.ipv6.icmp.ratelimit")
    saved = {n: lab.run(ns, ["sysctl", "-n", n]).stdout.strip() for n in names}
    for name in names:
        lab.sysctl(ns, f"{name}=0")
    try:
        yield
    finally:
        for name, value in saved.items():
            lab.sysctl(ns, f"{name}={value}")


@contextlib.contextmanager
def listeners(lab: Lab, ns: str, hosts: tuple[str, ...]) -> Iterator[dict[int, StandIn]]:
    made = {ipaddress.ip_address(h).version: StandIn(lab, ns, h, PORT) for h in hosts}
    try:
        yield made
    finally:
        for s in made.values():
            s.close()


def rule_args(*extra: str) -> list[str]:
    return ["-c", "/dev/null", "--udp", "true", "--proxy-url", "socks5://192.0.2.1:1080", *extra]


@contextlib.contextmanager
def applied(lab: Lab, ns: str, *args: str) -> Iterator[None]:
    """--apply (twice: the second changes nothing), then --remove, after which all is as before."""
    before = snapshot(lab, ns)
    transocks(lab, ns, "rules", "--apply", *args)
    try:
        once = snapshot(lab, ns)
        assert once != before
        transocks(lab, ns, "rules", "--apply", *args)
        assert snapshot(lab, ns) == once
        yield
    finally:  # a failed check must not leave rules behind for the next test
        transocks(lab, ns, "rules", "--remove")
    assert snapshot(lab, ns) == before


def send_as_nobody(lab: Lab, ns: str, host: str, port: int, payload: str) -> None:
    code = ("import socket,sys; h,p,m=sys.argv[1:]; "
            "s=socket.socket(socket.AF_INET6 if ':' in h else socket.AF_INET, socket.SOCK_DGRAM); "
            "s.sendto(m.encode(), (h, int(p)))")
    lab.run(ns, ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c", code,
                 host, str(port), payload])


@pytest.mark.parametrize("fmt", FORMATS)
def test_host_udp_reaches_the_listener_with_its_original_destination(lab, fmt):
    """The host's own datagrams (not its daemon user's) reach the transparent listener, which reads
    where they were going; a reply from a transparent socket bound there reaches the client from the
    original destination, and later datagrams to it still reach the listener; QUIC's port is refused."""
    ns = lab.client
    with listeners(lab, ns, ("127.0.0.1", "::1")) as standin, \
            applied(lab, ns, *rule_args("--format", fmt, "--user", "nobody",
                                        f"--listen=127.0.0.1:{PORT}", f"--listen=[::1]:{PORT}")):
        for version, host in DNS.items():
            send_as_nobody(lab, ns, host, 53, "daemon's own")  # excluded by owner: not diverted
            sock = client(lab, ns, host, 53)
            sock.send(b"query")
            data, sender, original = standin[version].receive()
            assert (data, original) == (b"query", (host, 53))
            assert sender == sock.getsockname()[:2]
            assert standin[version].empty()
            check_reply_sockets(lab, ns, sock, host, standin[version])
            sock.close()
            quic = client(lab, ns, host, 443)
            assert refused(quic)
            quic.close()
            assert dig_refused(lab, ns, host)
            assert standin[version].empty()


def check_reply_sockets(lab: Lab, ns: str, sock: socket.socket, host: str, standin: StandIn,
                        client_ns: str | None = None) -> None:
    """What transocks does for a flow's replies: a transparent socket bound on the original destination
    sends them, so the client sees them come from there.  Bound only (transocks' kind), it takes no
    datagram: the flow's next one and another flow's still reach the listener.  Connected to the
    client, it takes that flow's later datagrams (TPROXY finds it first) and still no other flow's."""
    client_addr = sock.getsockname()[:2]
    for connected in (False, True):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with lab.netns(ns):
            reply = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                reply.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                reply.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
            reply.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            reply.settimeout(WAIT)
            reply.bind((host, 53))
            if connected:
                reply.connect(client_addr)
            reply.sendto(b"answer", client_addr)
            data, peer = sock.recvfrom(2048)
            assert (data, peer[:2]) == (b"answer", (host, 53))
            sock.send(b"next")
            if connected:
                assert reply.recv(2048) == b"next"
            else:
                assert standin.receive() == (b"next", client_addr, (host, 53))
            assert standin.empty() and StandIn.nothing_queued(reply)
            other = client(lab, client_ns or ns, host, 53)  # another flow to the same destination
            other.send(b"other flow")
            assert standin.receive() == (b"other flow", other.getsockname()[:2], (host, 53))
            assert StandIn.nothing_queued(reply)
            other.close()
        finally:
            reply.close()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tproxy", [False, True], ids=["tcp-redirect", "tcp-tproxy"])
def test_gateway_udp_from_a_second_namespace(lab, fmt, tproxy):
    """A gateway's rules (--from cl0, on the gw): the client namespace's datagrams reach the gw's
    transparent listener with their original destinations, replies reach the client from there;
    QUIC's port is refused with ICMP."""
    ns = lab.gw
    extra = ["--tproxy", "true"] if tproxy else []
    with icmp_unlimited(lab, ns), listeners(lab, ns, ("0.0.0.0", "::")) as standin, \
            applied(lab, ns, *rule_args("--format", fmt, "--from", "cl0", f"--listen=0.0.0.0:{PORT}",
                                        f"--listen=[::]:{PORT}", *extra)):
        for version, host in DNS.items():
            sock = client(lab, lab.client, host, 53)
            sock.send(b"query")
            data, sender, original = standin[version].receive()
            assert (data, original) == (b"query", (host, 53))
            assert sender == sock.getsockname()[:2]
            check_reply_sockets(lab, ns, sock, host, standin[version], lab.client)
            sock.close()
            quic = client(lab, lab.client, host, 443)
            assert refused(quic)
            quic.close()
            assert dig_refused(lab, lab.client, host)
            assert standin[version].empty()


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_reject_list_lets_quic_through_like_any_udp(lab, fmt):
    ns = lab.client
    with listeners(lab, ns, ("127.0.0.1",)) as standin, \
            applied(lab, ns, *rule_args("--format", fmt, "--udp-reject-ports", "", f"--listen=127.0.0.1:{PORT}")):
        sock = client(lab, ns, DNS[4], 443)
        sock.send(b"quic initial")
        data, _sender, original = standin[4].receive()
        assert (data, original) == (b"quic initial", (DNS[4], 443))
        sock.close()


def test_udp_false_adds_no_udp_rules(lab):
    """The default (udp = false) is TCP's rules alone: no UDP chain, no policy routing."""
    ns = lab.client
    with applied(lab, ns, "-c", "/dev/null", "--proxy-url", "socks5://192.0.2.1:1080", "--format", "iptables"):
        now = snapshot(lab, ns)
        assert "udp" not in (now["iptables"] + now["ip6tables"]).lower()
        assert "fwmark" not in now["rule4"] + now["rule6"]


def test_nft_gateway_rejects_quic_even_where_it_does_not_forward(lab):
    """nft rejects in prerouting, before routing: a gateway that forwards nothing (only TPROXY takes
    its clients' traffic) still answers QUIC with ICMP port unreachable.  (iptables can REJECT only in
    the filter table, so there the refusal is in FORWARD and needs forwarding on.)"""
    ns = lab.gw
    forwarding = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")
    stack = contextlib.ExitStack()
    try:  # off before the "before" snapshot: turning IPv6 forwarding on re-adds anycast routes
        stack.enter_context(icmp_unlimited(lab, ns))
        for name in forwarding:
            lab.sysctl(ns, f"{name}=0")
        with applied(lab, ns, *rule_args("--format", "nft", "--from", "cl0", f"--listen=0.0.0.0:{PORT}",
                                         f"--listen=[::]:{PORT}")):
            for host in DNS.values():
                quic = client(lab, lab.client, host, 443)
                assert refused(quic)
                quic.close()
    finally:
        for name in forwarding:
            lab.sysctl(ns, f"{name}=1")
        stack.close()


def test_remove_restores_a_table_that_lacked_the_chains_apply_used(lab):
    """iptables-nft makes built-in chains only as rules need them: where filter held only INPUT (as
    another program may leave it), the FORWARD that the gateway's reject brings goes again at remove."""
    ns = lab.gw
    existing = lab.run(ns, ["nft", "list", "tables"]).stdout.split("\n")
    made = [fam for fam in ("ip", "ip6") if f"table {fam} filter" not in existing]
    for fam in made:
        lab.run(ns, ["nft", f"add table {fam} filter; add chain {fam} filter INPUT "
                           "{ type filter hook input priority 0; policy accept; }"])
    try:
        with applied(lab, ns, *rule_args("--format", "iptables", "--from", "cl0", f"--listen=0.0.0.0:{PORT}",
                                         f"--listen=[::]:{PORT}")):
            assert "chain FORWARD" in lab.run(ns, ["nft", "list", "table", "ip", "filter"]).stdout
    finally:
        for fam in made:
            lab.run(ns, ["nft", "delete", "table", fam, "filter"], check=False)
