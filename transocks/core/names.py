"""Names and address spellings: what a host name, a domain pattern, a port list, a subnet and each
spelling of an address are, for both daemons.

Why one module: three host-name validators disagreed (the sniffer refused `_`, the routes and the
ACLs accepted it, so `domain=_x.example` could never match), and domain patterns, port ranges,
IPv4-mapped subnets and brackets were parsed in two to five places with different rules.  Every
caller asks here.

Host names are ASCII labels of letters, digits, `-` and `_` (DNS carries `_` in labels: `_dmarc`,
SRV owners, some CDN hosts), 1-63 bytes each, no `-` at either end of a label, at most 253 bytes
without the one trailing dot allowed; lower case is their one spelling.  Text from settings and
SOCKS requests may be Unicode and is encoded to IDNA A-labels first; bytes from the wire (a
ClientHello's server_name, a Host header) must already be ASCII.  A name whose last label is
numeric (decimal or 0x hex) is refused: no such name exists in DNS, and resolvers read some of
them as addresses (`127.1`, `0x7f000001`).

An address has one spelling too: anything a resolver reads as an address (`127.1`, `0x7f.1`,
`2130706433`, `[::1]`) is that address, and IPv4-mapped IPv6 (`::ffff:a.b.c.d`, and a subnet
inside ::ffff:0:0/96) is the IPv4 address the kernel connects.  Other IPv6 addresses carry an IPv4
address that a translator or relay delivers to (`carried_ipv4`): NAT64 64:ff9b::/96 (RFC 6052) and
the local-use 64:ff9b:1::/48 (RFC 8215), 6to4 2002::/16, IPv4-compatible ::/96 and IPv4-translated
::ffff:0:0:0/96.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Host = str | IPAddress

MAX_NAME = 253  # bytes of a name without its trailing dot (RFC 1035's 255 on the wire)

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")
_IPV4_PART = re.compile(r"0x[0-9a-f]*|0[0-7]*|[1-9][0-9]*")

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")
_COMPATIBLE = ipaddress.IPv6Network("::/96")
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
_UNSPECIFIED_V4 = ipaddress.IPv4Address(0)


# --- host names ------------------------------------------------------------------------------


def _checked_name(name: str) -> str | None:
    """name (lower-case ASCII without the trailing dot) when it is a host name, else None."""
    if len(name) > MAX_NAME or not _NAME.fullmatch(name):
        return None
    if _NUMERIC_LABEL.fullmatch(name.rpartition(".")[2]):
        return None
    return name


def wire_host_name(raw: bytes) -> str | None:
    """The name in lower case when bytes a client sent (SNI, Host) are a host name, else None.

    Cheap and never raising: it runs on untrusted bytes for every sniffed connection.  The
    same few names come again and again (one site, many connections), so the answers for
    the last `WIRE_NAMES_KEPT` distinct spellings are kept: a dict lookup instead of two
    regular expressions (2.2 -> 0.1 us).  A client sending made-up names only empties it.
    """
    if len(raw) > MAX_NAME + 1:  # never a name (+1: the trailing dot), and not kept: a key as long as 16 KiB
        return None
    if raw.__class__ is not bytes:
        raw = bytes(raw)
    name = _wire_names.get(raw, _UNSEEN)
    if name is _UNSEEN:
        if len(_wire_names) >= WIRE_NAMES_KEPT:
            _wire_names.clear()
        name = _wire_names[raw] = _wire_host_name(raw)
    return name  # type: ignore[return-value]


WIRE_NAMES_KEPT = 1024
_wire_names: dict[bytes, str | None] = {}
_UNSEEN = object()


def _wire_host_name(raw: bytes) -> str | None:
    if raw.endswith(b"."):
        raw = raw[:-1]
    if len(raw) > MAX_NAME or not raw.isascii():
        return None
    return _checked_name(raw.decode("ascii").lower())


def host_name(text: str) -> str:
    """The one spelling of a host name (IDNA A-labels, lower case, no trailing dot); ValueError
    for anything else, an address in any spelling included."""
    host = canonical_host(text)
    if not isinstance(host, str):
        raise ValueError(f"{text!r} is an address, not a name")
    return host


def canonical_host(text: str) -> Host:
    """The one spelling of a destination host: an address object for anything that denotes an
    address, a host name otherwise; ValueError when it is neither."""
    if not text or len(text) > 255:
        raise ValueError("empty or oversized host")
    if text[-1].isdigit() or ":" in text:  # could be an address literal (names rarely end in a digit)
        literal = literal_ip(text)
        if literal is not None:
            return literal
    if ":" in text or text.startswith("["):
        inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        if "%" in inner:
            raise ValueError(f"scoped IPv6 address not allowed: {text!r}")
        try:
            return unmapped(ipaddress.IPv6Address(inner))
        except ValueError:
            raise ValueError(f"not a host name or address: {text!r}") from None
    try:
        name = text.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ValueError(f"not a valid (IDNA) host name: {text!r}") from None
    name = name.removesuffix(".")
    if not name:
        raise ValueError(f"empty host name: {text!r}")
    ip = resolver_ipv4(name)
    if ip is not None:
        return ip
    if _NUMERIC_LABEL.fullmatch(name.rpartition(".")[2]):
        raise ValueError(f"numeric host name that is not an IPv4 address: {text!r}")
    if _checked_name(name) is None:
        raise ValueError(f"not a valid host name: {text!r}")
    return name


@dataclass(frozen=True)
class DomainPattern:
    """`example.com` that name only, `.example.com` it and every name below, `*.example.com` below only."""

    base: str
    self_too: bool
    below: bool

    @classmethod
    def parse(cls, text: str) -> DomainPattern:
        t = text.strip()
        if t.startswith("*."):
            base, self_too, below = t[2:], False, True
        elif t.startswith("."):
            base, self_too, below = t[1:], True, True
        else:
            base, self_too, below = t, True, False
        try:
            name = host_name(base)
        except ValueError as exc:
            raise ValueError(f"bad domain {text!r} (example.com, .example.com or *.example.com): {exc}") from None
        return cls(name, self_too, below)

    def matches(self, name: str) -> bool:
        """For a name in its one spelling (`host_name`, `wire_host_name`)."""
        if self.self_too and name == self.base:
            return True
        return self.below and name.endswith("." + self.base)

    def __str__(self) -> str:
        return ("." if self.self_too else "*.") + self.base if self.below else self.base


# --- addresses -------------------------------------------------------------------------------


def ip_literal(text: str) -> tuple[int, bytes] | None:
    """(family, packed address) when text is a plain IPv4 dotted quad or IPv6 literal, else None.

    inet_pton accepts exactly the spellings every resolver reads the same
    way (no octal, hex or short IPv4 forms), at C speed.
    """
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return family, socket.inet_pton(family, text)
        except (OSError, ValueError):  # ValueError: a NUL in the text, which no address has
            continue
    return None


def unmapped(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 is the IPv4 address it carries (the kernel connects it as IPv4)."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def literal_ip(text: str) -> IPAddress | None:
    """A plain IPv4 dotted quad or IPv6 literal, unmapped; None for anything else.

    Parsing from packed bytes is 3 us where `ipaddress` parsing text is
    8-19 us: this runs for every connection.
    """
    literal = ip_literal(text)
    if literal is None:
        return None
    family, packed = literal
    return unmapped(ipaddress.IPv4Address(packed) if family == socket.AF_INET else ipaddress.IPv6Address(packed))


def address(text: str) -> IPAddress:
    """Setting type: an IP literal, brackets allowed around IPv6, IPv4-mapped as IPv4."""
    host, port = split_host_port(text)
    if port is not None:
        raise ValueError(f"an address without a port, got {text!r}")
    return unmapped(ipaddress.ip_address(host))


def resolver_ipv4(text: str) -> ipaddress.IPv4Address | None:
    """Read text the way inet_aton (and so getaddrinfo) does, or return None.

    One to four parts, each decimal, octal (leading 0) or hex (0x); the last
    part fills the remaining bytes: ``127.1``, ``0x7f.0.0.1``, ``2130706433``.
    """
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_IPV4_PART.fullmatch(p) for p in parts):
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


def carried_ipv4(ip: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses a NAT64, 6to4, IPv4-compatible or IPv4-translated address reaches.

    :: and ::1 are in ::/96 but are not IPv4-compatible addresses.  In the
    local-use prefix 64:ff9b:1::/48 the operator chooses the translator's
    prefix length, so every reading RFC 6052 allows there counts (see
    `_local_nat64`).
    """
    if not isinstance(ip, ipaddress.IPv6Address):
        return ()
    if ip.sixtofour is not None:
        return (ip.sixtofour,)
    if ip in _NAT64 or ip in _TRANSLATED or (ip in _COMPATIBLE and int(ip) > 1):
        return (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF),)
    if ip in _LOCAL_NAT64:
        return _local_nat64(int(ip))
    return ()


def _local_nat64(n: int) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 address inside n for each translator prefix of 96, 64, 56 and 48 bits (RFC 6052 2.2).

    Below /96 the IPv4 address skips the u octet (bits 64-71, zero) and the
    suffix after it is zero, so a shorter reading applies only to addresses
    shaped that way.  Such an address also reads as 0.0.0.0 under /96, which no
    translator delivers to: that reading is dropped when another one exists.
    """
    readings = [n & 0xFFFFFFFF]
    if (n >> 56) & 0xFF == 0:
        if n & 0xFFFFFF == 0:
            readings.append((n >> 24) & 0xFFFFFFFF)  # /64: bits 72-103
        if n & 0xFFFFFFFF == 0:
            readings.append(((n >> 64) & 0xFF) << 24 | ((n >> 32) & 0xFFFFFF))  # /56: bits 56-63, 72-95
        if n & 0xFFFFFFFFFF == 0:
            readings.append(((n >> 64) & 0xFFFF) << 16 | ((n >> 40) & 0xFFFF))  # /48: bits 48-63, 72-87
    out = tuple(ipaddress.IPv4Address(r) for r in dict.fromkeys(readings))
    if len(out) > 1:
        out = tuple(a for a in out if a != _UNSPECIFIED_V4)
    return out


def judged_as(ip: IPAddress) -> tuple[IPAddress, ...]:
    """The addresses rules see for ip: itself, and every IPv4 address it carries."""
    return (ip, *carried_ipv4(ip))


def network(text: str) -> IPNetwork:
    """A subnet such as ``10.0.0.0/8``, ``[2001:db8::]/32``; a bare address is a /32 or /128.

    Host bits set are a typo, not a subnet.  A subnet inside ::ffff:0:0/96 is
    the IPv4 subnet it maps, since mapped addresses are matched as IPv4.
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


def networks(text: str) -> tuple[IPNetwork, ...]:
    """A comma-separated list of `network`s."""
    out = []
    for part in text.split(","):
        try:
            out.append(network(part))
        except ValueError as exc:
            raise ValueError(f"bad CIDR {part.strip()!r}: {exc}") from None
    return tuple(out)


# --- ports and HOST:PORT -------------------------------------------------------------------


_PORT_HELP = "a port 1-65535, a range such as 1-1023, or *"


def ascii_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also says yes to "\u00b2" (which int() refuses), and int()
    also reads " 14", "1_4", "+14" and other scripts' digits."""
    return text.isascii() and text.isdigit()


def port_number(text: str) -> int:
    """A TCP port, 1-65535, in ASCII digits."""
    t = str(text).strip()
    if not ascii_number(t) or not 0 < int(t) < 65536:
        raise ValueError(f"bad port {text!r} (a port is 1-65535)")
    return int(t)


def port_range(text: str) -> tuple[int, int]:
    """`443`, `1-1023` or `*` (every port) as (low, high)."""
    if text == "*":
        return 1, 65535
    low_s, dash, high_s = text.partition("-")
    if not ascii_number(low_s) or (dash and not ascii_number(high_s)):
        raise ValueError(f"bad port {text!r} ({_PORT_HELP})")
    low, high = int(low_s), int(high_s) if dash else int(low_s)
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"bad port range {text!r} ({_PORT_HELP})")
    return low, high


def port_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """A comma-separated list of `port_range`s."""
    return tuple(port_range(part.strip()) for part in text.split(","))


def split_host_port(text: str) -> tuple[str, str | None]:
    """`HOST[:PORT]` as (host, port text or None), brackets removed.

    IPv6 (an address or a subnet) goes in brackets when a port follows:
    ``[2001:db8::1]:443``, ``[2001:db8::/32]:443``; an unbracketed host with
    more than one colon is a bare IPv6 address or subnet without a port.
    """
    t = text.strip()
    if not t.startswith("["):
        if t.count(":") > 1:
            return t, None
        host, colon, port = t.partition(":")
        return host, port if colon else None
    end = t.find("]")
    if end < 0:
        raise ValueError(f"unterminated [ in {text!r}")
    host, rest = t[1:end], t[end + 1 :]
    if ":" not in host:
        raise ValueError(f"brackets hold an IPv6 address: {text!r}")
    if rest and not rest.startswith(":"):
        raise ValueError(f"bad address {text!r}")
    return host, rest[1:] if rest else None


def format_hostport(host: str, port: int) -> str:
    """The inverse of `split_host_port`: IPv6 in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
