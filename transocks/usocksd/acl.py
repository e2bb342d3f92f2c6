"""Who may connect and where to: client subnets and destination rules.

Every destination host goes through `names.canonical_host` before any rule
sees it, so one host has one spelling: names are IDNA A-labels in lower case
without the trailing dot, and anything the resolver would read as an address
(``127.1``, ``0x7f.1``, ``2130706433``, ``::ffff:127.0.0.1``) becomes that
address, with IPv4-mapped IPv6 turned into plain IPv4.  Subnet rules are
checked against the addresses actually dialled (a literal, or what a name
resolved to), so a name pointing at a forbidden address is refused too.

Other IPv6 addresses carry an IPv4 address that a translator or relay
delivers to (`names.carried_ipv4`: NAT64 64:ff9b::/96 and 64:ff9b:1::/48,
6to4, IPv4-compatible, IPv4-translated).  They are dialled as they are (they
are IPv6 on the wire), but a deny rule that matches an IPv4 address inside
refuses them, so ``64:ff9b::7f00:1`` cannot reach past ``deny_dest
127.0.0.0/8``.  Allow rules match the address as dialled only.  Client
addresses are not unwrapped (beyond mapped ones): an embedded address says
nothing about who the client is.

Safety defaults: loopback, link-local, the unspecified addresses and every
address of this host (in every spelling above) are refused unless an
allow_dest subnet rule names them, i.e. matches and lies inside that class
(``127.0.0.0/8``, ``[::1]:8080``, ``fe80::/10``, the host's address itself):
``*`` and wide subnets never do.  Two usocksd on one host could otherwise
chain through each other, and a name resolving to the edge would reach it.

Rule entries (`allow_dest`, `deny_dest`) are ``HOST[:PORTS]``:

  HOST   ``*`` any destination; ``example.com`` exactly that name;
         ``.example.com`` that name and every name under it;
         ``*.example.com`` only names under it; ``10.0.0.0/8``,
         ``192.0.2.7`` (a /32), ``2001:db8::/32``, ``2001:db8::1`` (a /128),
         in brackets when a port follows: ``[2001:db8::/32]:443``
  PORTS  ``443``, a range ``1-1023`` or ``*`` (the default: any port)

Deny wins: a request is refused when any deny rule matches its name or any of
its addresses; then the safety defaults; otherwise it is allowed when an
allow rule matches its name or allow rules match every one of its addresses;
otherwise `dest_policy` decides.  Name rules match only requests by name;
subnet rules match literal and resolved addresses alike.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Container, Iterable
from dataclasses import dataclass

from ..core.names import (
    DomainPattern,
    IPAddress,
    IPNetwork,
    canonical_host,
    judged_as,
    network,
    port_range,
    split_host_port,
    unmapped,
)

_LOOPBACK = (ipaddress.IPv4Network("127.0.0.0/8"), ipaddress.IPv6Network("::1/128"))
_LINK_LOCAL = (ipaddress.IPv4Network("169.254.0.0/16"), ipaddress.IPv6Network("fe80::/10"))
_NETWORKS = (ipaddress.IPv4Network, ipaddress.IPv6Network)


class ClientFilter:
    """`allow_from`: the subnets whose clients may talk to us at all."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks = list(networks)

    def allows(self, ip: IPAddress) -> bool:
        ip = unmapped(ip)
        return any(ip.version == n.version and ip in n for n in self.networks)


@dataclass(frozen=True)
class DestRule:
    """One `allow_dest` / `deny_dest` entry."""

    kind: str  # "any", "name" (a DomainPattern), "net"
    target: DomainPattern | IPNetwork | None
    low: int
    high: int
    text: str

    def __str__(self) -> str:
        return self.text

    def _port(self, port: int) -> bool:
        return self.low <= port <= self.high

    def matches_name(self, name: str, port: int) -> bool:
        if not self._port(port):
            return False
        if self.kind == "any":
            return True
        return isinstance(self.target, DomainPattern) and self.target.matches(name)

    def matches_addr(self, ip: IPAddress, port: int) -> bool:
        if not self._port(port):
            return False
        if self.kind == "any":
            return True
        net = self.target
        return isinstance(net, _NETWORKS) and ip.version == net.version and ip in net

    def names_address(self, ip: IPAddress, port: int, within: IPNetwork) -> bool:
        """Whether this subnet rule names ip explicitly: it matches and lies inside `within`."""
        net = self.target
        return (isinstance(net, _NETWORKS) and self.matches_addr(ip, port)
                and net.version == within.version and net.subnet_of(within))  # type: ignore[arg-type]


def dest_rule(text: str) -> DestRule:
    """Parse one rule entry; see the module docstring for the syntax."""
    entry = text.strip()
    host, ports = split_host_port(entry)
    low, high = (1, 65535) if ports is None else port_range(ports)
    if host == "*":
        return DestRule("any", None, low, high, entry)
    if "/" in host or ":" in host:
        return DestRule("net", network(host), low, high, entry)
    if host.startswith((".", "*.")):
        return DestRule("name", DomainPattern.parse(host), low, high, entry)
    target = canonical_host(host)
    if isinstance(target, str):
        return DestRule("name", DomainPattern(target, True, False), low, high, entry)
    return DestRule("net", ipaddress.ip_network(target), low, high, entry)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str


class DestPolicy:
    """Deny wins, then the safety defaults, then allow, then the default; see the module docstring."""

    def __init__(self, allow: Iterable[DestRule], deny: Iterable[DestRule], default_allow: bool,
                 host: Container[IPAddress] = frozenset()) -> None:
        self.allow = list(allow)
        self.deny = list(deny)
        self.default_allow = default_allow
        self.host = host  # this host's addresses (`loopguard.HostAddresses`)

    def name_denied(self, name: str, port: int) -> str | None:
        """Before resolving: the deny rule that matches the name, so it is never looked up."""
        for rule in self.deny:
            if rule.matches_name(name, port):
                return f"{name}:{port} matches deny_dest {rule}"
        return None

    def decide(self, name: str | None, addrs: list[IPAddress], port: int) -> Verdict:
        """Judge a request by name (None for a literal) and the addresses it would dial."""
        if name is not None:
            denied = self.name_denied(name, port)
            if denied:
                return Verdict(False, denied)
        judged = [(dialled, ip) for dialled in addrs for ip in judged_as(dialled)]
        for dialled, ip in judged:
            for rule in self.deny:
                if rule.matches_addr(ip, port):
                    return Verdict(False, _refusal(ip, port, f"matches deny_dest {rule}", dialled, name))
        for dialled, ip in judged:
            unsafe = self.unsafe(ip, port)
            if unsafe:
                return Verdict(False, _refusal(ip, port, f"is {unsafe}", dialled, name)
                               + ", refused unless an allow_dest subnet rule names it")
        if name is not None:
            for rule in self.allow:
                if rule.matches_name(name, port):
                    return Verdict(True, f"allow_dest {rule}")
        if addrs and all(any(r.matches_addr(ip, port) for r in self.allow) for ip in addrs):
            return Verdict(True, "allow_dest")
        if self.default_allow:
            return Verdict(True, "dest_policy allow")
        what = name if name is not None else ", ".join(map(str, addrs))
        return Verdict(False, f"{what}:{port} matches no allow_dest rule (dest_policy deny)")

    def unsafe(self, ip: IPAddress, port: int) -> str | None:
        """What makes ip a destination refused by default (None: nothing), unless an allow_dest
        subnet rule inside that class of addresses matches it: `*` or 0.0.0.0/0 never names it.

        Integer tests rather than ipaddress's is_* properties: this runs for every
        address of every request, and they cost a network lookup each.
        """
        n = int(ip)
        v4 = ip.version == 4
        within: IPNetwork
        if n == 0:
            what, within = "the unspecified address (this host)", ipaddress.ip_network(ip)
        elif (n >> 24 == 127) if v4 else n == 1:
            what, within = "a loopback address", _LOOPBACK[not v4]
        elif ip in self.host:
            what, within = "an address of this host", ipaddress.ip_network(ip)
        elif (n >> 16 == 0xA9FE) if v4 else (n >> 118 == 0x3FA):
            what, within = "a link-local address", _LINK_LOCAL[not v4]
        else:
            return None
        if any(rule.names_address(ip, port, within) for rule in self.allow):
            return None
        return what


def _refusal(ip: IPAddress, port: int, why: str, dialled: IPAddress, name: str | None) -> str:
    """`IP:PORT why`, saying which dialled address carried ip and which name resolved to it."""
    carried = f" (carried in {dialled})" if ip is not dialled else ""
    via = f" ({name} resolves to {dialled})" if name is not None else ""
    return f"{ip}:{port} {why}{carried}{via}"
