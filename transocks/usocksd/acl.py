"""Who may connect and where to: client subnets and destination rules.

Every destination host goes through `canonical_host` before any rule sees it,
so one host has one spelling: names are IDNA A-labels in lower case without
the trailing dot, and anything the resolver would read as an address
(``127.1``, ``0x7f.1``, ``2130706433``, ``::ffff:127.0.0.1``) becomes that
address, with IPv4-mapped IPv6 turned into plain IPv4.  Subnet rules are
checked against the addresses actually dialled (a literal, or what a name
resolved to), so a name pointing at a forbidden address is refused too.

Other IPv6 addresses carry an IPv4 address that a translator or relay
delivers to: NAT64 (64:ff9b::/96, RFC 6052), 6to4 (2002::/16, RFC 3056),
IPv4-compatible (::/96) and IPv4-translated (::ffff:0:0:0/96, RFC 2765).
They are dialled as they are (they are IPv6 on the wire), but a deny rule
that matches the IPv4 address inside refuses them, so ``64:ff9b::7f00:1``
cannot reach past ``deny_dest 127.0.0.0/8``.  Allow rules match the address
as dialled only.  Client addresses are not unwrapped (beyond mapped ones):
an embedded address says nothing about who the client is.

Rule entries (`allow_dest`, `deny_dest`) are ``HOST[:PORTS]``:

  HOST   ``*`` any destination; ``example.com`` exactly that name;
         ``.example.com`` that name and every name under it;
         ``*.example.com`` only names under it; ``10.0.0.0/8``,
         ``192.0.2.7`` (a /32), ``2001:db8::/32``, ``2001:db8::1`` (a /128),
         in brackets when a port follows: ``[2001:db8::/32]:443``
  PORTS  ``443``, a range ``1-1023`` or ``*`` (the default: any port)

Deny wins: a request is refused when any deny rule matches its name or any of
its addresses; otherwise it is allowed when an allow rule matches its name or
allow rules match every one of its addresses; otherwise `dest_policy` decides.
Name rules match only requests by name; subnet rules match literal and
resolved addresses alike.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from ..core.netutil import ip_literal, unmapped
from ..wire import ascii_number

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Host = str | IPAddress

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)\Z")
_IPV4_PART = re.compile(r"(?:0x[0-9a-f]*|0[0-7]*|[1-9][0-9]*)\Z")
_MAX_NAME = 253


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_COMPATIBLE = ipaddress.IPv6Network("::/96")
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")


canonical_ip = unmapped  # IPv4-mapped IPv6 is the IPv4 address it carries (the kernel connects it as IPv4)


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address a NAT64, 6to4, IPv4-compatible or IPv4-translated address reaches, if any.

    :: and ::1 are in ::/96 but are not IPv4-compatible addresses.
    """
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or ip in _TRANSLATED or (ip in _COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def judged_as(ip: IPAddress) -> tuple[IPAddress, ...]:
    """The addresses the deny rules see for ip: itself, and the IPv4 address it carries."""
    inner = embedded_ipv4(ip)
    return (ip,) if inner is None else (ip, inner)


def literal_ip(text: str) -> IPAddress | None:
    """A plain IPv4 dotted quad or IPv6 literal, canonical; None for anything else.

    Parsing from packed bytes is 3 us where `ipaddress` parsing text is
    8-19 us: this runs for every connection.
    """
    literal = ip_literal(text)
    if literal is None:
        return None
    family, packed = literal
    return canonical_ip(ipaddress.IPv4Address(packed) if family == socket.AF_INET else ipaddress.IPv6Address(packed))


def parse_ipv4_like_resolver(text: str) -> ipaddress.IPv4Address | None:
    """Read text the way inet_aton (and so getaddrinfo) does, or return None.

    One to four parts, each decimal, octal (leading 0) or hex (0x); the last
    part fills the remaining bytes: ``127.1``, ``0x7f.0.0.1``, ``2130706433``.
    """
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_IPV4_PART.match(p) for p in parts):
        return None
    values = []
    for p in parts:
        if p.startswith("0x"):
            values.append(int(p[2:] or "0", 16))
        elif p.startswith("0") and len(p) > 1:
            values.append(int(p, 8))
        else:
            values.append(int(p))
    head, last = values[:-1], values[-1]
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = 0
    for v in head:
        number = number << 8 | v
    number = number << (8 * (4 - len(head))) | last
    return ipaddress.IPv4Address(number)


def canonical_host(host: str) -> Host:
    """The one spelling of a destination host, or ValueError when it is none.

    Returns an IP address object for anything that denotes an address and a
    lower-case A-label name otherwise.  Names whose last label is numeric
    but which are not an address are refused: no such name exists in DNS and
    resolvers disagree about them.
    """
    if not host or len(host) > 255:
        raise ValueError("empty or oversized host")
    if host[-1].isdigit() or ":" in host:  # could be an address literal (names rarely end in a digit)
        literal = literal_ip(host)
        if literal is not None:
            return literal
    if ":" in host or host.startswith("["):
        inner = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if "%" in inner:
            raise ValueError(f"scoped IPv6 address not allowed: {host!r}")
        try:
            return canonical_ip(ipaddress.IPv6Address(inner))
        except ValueError:
            raise ValueError(f"not a host name or address: {host!r}") from None
    try:
        ascii_name = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ValueError(f"not a valid (IDNA) host name: {host!r}") from None
    ascii_name = ascii_name.removesuffix(".")
    if not ascii_name:
        raise ValueError(f"empty host name: {host!r}")
    ip = parse_ipv4_like_resolver(ascii_name)
    if ip is not None:
        return ip
    labels = ascii_name.split(".")
    if _NUMERIC_LABEL.match(labels[-1]):
        raise ValueError(f"numeric host name that is not an IPv4 address: {host!r}")
    if len(ascii_name) > _MAX_NAME or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"not a valid host name: {host!r}")
    return ascii_name


def network(text: str) -> IPNetwork:
    """A subnet such as ``10.0.0.0/8``, ``[2001:db8::]/32``; a bare address is a /32 or /128.

    A subnet inside ::ffff:0:0/96 becomes the IPv4 subnet it maps, since
    mapped clients and destinations are matched as IPv4.
    """
    t = text.strip()
    if t.startswith("["):
        end = t.find("]")
        if end < 0:
            raise ValueError(f"unterminated [ in {text!r}")
        t = t[1:end] + t[end + 1 :]
    net = ipaddress.ip_network(t, strict=True)
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


class ClientFilter:
    """`allow_from`: the subnets whose clients may talk to us at all."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks = list(networks)

    def allows(self, ip: IPAddress) -> bool:
        ip = canonical_ip(ip)
        return any(ip.version == n.version and ip in n for n in self.networks)


@dataclass(frozen=True)
class DestRule:
    """One `allow_dest` / `deny_dest` entry."""

    kind: str  # "any", "exact", "domain" (.x: x and below), "below" (*.x: below only), "net"
    target: str | IPNetwork | None
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
        if self.kind == "exact":
            return name == self.target
        if self.kind == "domain":
            return name == self.target or name.endswith("." + str(self.target))
        if self.kind == "below":
            return name.endswith("." + str(self.target))
        return False

    def matches_addr(self, ip: IPAddress, port: int) -> bool:
        if not self._port(port):
            return False
        if self.kind == "any":
            return True
        if self.kind == "net":
            net = self.target
            assert isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network))
            return ip.version == net.version and ip in net
        return False


def _ports(text: str, entry: str) -> tuple[int, int]:
    if text in ("", "*"):
        return 1, 65535
    low_s, sep, high_s = text.partition("-")
    bad = f"bad port {text!r} in {entry!r} (a port 1-65535, a range such as 1-1023, or *)"
    if not ascii_number(low_s) or (sep and not ascii_number(high_s)):
        raise ValueError(bad)
    low, high = int(low_s), int(high_s) if sep else int(low_s)
    if not 1 <= low <= high <= 65535:
        raise ValueError(bad)
    return low, high


def dest_rule(text: str) -> DestRule:
    """Parse one rule entry; see the module docstring for the syntax."""
    entry = text.strip()
    if entry.startswith("["):
        end = entry.find("]")
        if end < 0:
            raise ValueError(f"unterminated [ in {entry!r}")
        host, rest = entry[1:end], entry[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad rule {entry!r}")
        ports = rest[1:]
    elif entry.count(":") > 1:
        host, ports = entry, ""
    else:
        host, _, ports = entry.partition(":")
    low, high = _ports(ports, entry)
    if host == "*":
        return DestRule("any", None, low, high, entry)
    if "/" in host or ":" in host:
        return DestRule("net", network(host), low, high, entry)
    kind = "exact"
    if host.startswith("*."):
        kind, host = "below", host[2:]
    elif host.startswith("."):
        kind, host = "domain", host[1:]
    target = canonical_host(host)
    if not isinstance(target, str):
        if kind != "exact":
            raise ValueError(f"{entry!r}: a domain pattern needs a name, not an address")
        return DestRule("net", ipaddress.ip_network(target), low, high, entry)
    return DestRule(kind, target, low, high, entry)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str


class DestPolicy:
    """Deny wins, then allow, then the default; see the module docstring."""

    def __init__(self, allow: Iterable[DestRule], deny: Iterable[DestRule], default_allow: bool) -> None:
        self.allow = list(allow)
        self.deny = list(deny)
        self.default_allow = default_allow

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
        for dialled in addrs:
            for ip in judged_as(dialled):
                carried = f" (carried in {dialled})" if ip is not dialled else ""
                if ip.is_unspecified:
                    return Verdict(False, f"{ip} is the unspecified address (this host){carried}")
                for rule in self.deny:
                    if rule.matches_addr(ip, port):
                        via = f" ({name} resolves to {dialled})" if name is not None else ""
                        return Verdict(False, f"{ip}:{port} matches deny_dest {rule}{carried}{via}")
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
