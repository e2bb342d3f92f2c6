"""The one definition of names and address spellings (core.names), held against the cases and the
code of each caller that had its own copy: the sniffer's host-name check, the routes' domain
patterns, ports and CIDRs, usocksd's canonical hosts, rule ports and subnets.

The old copies are kept below, verbatim, as oracles: hypothesis checks that the one definition
agrees with each of them everywhere except where the issue decided otherwise (`_` in names,
numeric last labels, IPv4-mapped subnets), and those differences are tested by name.
"""

from __future__ import annotations

import ipaddress
import re
import socket

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from transocks.core import names
from transocks.core.names import (
    DomainPattern,
    canonical_host,
    carried_ipv4,
    host_name,
    network,
    networks,
    port_number,
    port_range,
    port_ranges,
    split_host_port,
    wire_host_name,
)

ip = ipaddress.ip_address


# --- the old copies (main before issue 17), as oracles ----------------------------------------


_OLD_SNIFF_LABEL = rb"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_OLD_SNIFF_NAME = re.compile(rb"(?:%s\.)*%s" % (_OLD_SNIFF_LABEL, _OLD_SNIFF_LABEL))


def old_sniff_valid_hostname(raw: bytes) -> str | None:
    """redirector/sniff.py valid_hostname."""
    if raw.endswith(b"."):
        raw = raw[:-1]
    if not 0 < len(raw) <= 253:
        return None
    if not _OLD_SNIFF_NAME.fullmatch(raw) or raw.rpartition(b".")[2].isdigit():
        return None
    name = raw.decode("ascii").lower()
    try:
        socket.inet_aton(name)
    except OSError:
        return name
    return None


def old_route_domain(text: str) -> tuple[str, bool, bool] | None:
    """redirector/route.py DomainPattern.parse (None where it raised)."""
    t = text.strip().lower().rstrip(".")
    if t.startswith("*."):
        base, self_too, below = t[2:], False, True
    elif t.startswith("."):
        base, self_too, below = t[1:], True, True
    else:
        base, self_too, below = t, True, False
    labels = base.split(".")
    if not base or len(base) > 253 or not all(
            0 < len(label) <= 63 and label[0] != "-" and label[-1] != "-"
            and all(c.isascii() and (c.isalnum() or c in "-_") for c in label) for label in labels):
        return None
    return base, self_too, below


def old_route_ports(text: str) -> tuple[tuple[int, int], ...] | None:
    """redirector/route.py _ports."""
    ranges = []
    for part in text.split(","):
        lo_s, dash, hi_s = part.strip().partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if dash else lo
        except ValueError:
            return None
        if not 0 < lo <= hi < 65536:
            return None
        ranges.append((lo, hi))
    return tuple(ranges)


def old_route_networks(text: str):
    """redirector/route.py _networks."""
    nets = []
    for part in text.split(","):
        try:
            net = ipaddress.ip_network(part.strip(), strict=True)
        except ValueError:
            return None
        if net.version == 6 and net.network_address.ipv4_mapped is not None and net.prefixlen >= 96:
            return None
        nets.append(net)
    return tuple(nets)


_OLD_ACL_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_OLD_ACL_NUMERIC = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)\Z")
_OLD_ACL_IPV4_PART = re.compile(r"(?:0x[0-9a-f]*|0[0-7]*|[1-9][0-9]*)\Z")


def _old_unmapped(a):
    return a.ipv4_mapped if a.version == 6 and a.ipv4_mapped is not None else a


def _old_ipv4_like(text: str):
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_OLD_ACL_IPV4_PART.match(p) for p in parts):
        return None
    values = [int(p[2:] or "0", 16) if p.startswith("0x") else int(p, 8) if p.startswith("0") and len(p) > 1
              else int(p) for p in parts]
    head, last = values[:-1], values[-1]
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = 0
    for v in head:
        number = number << 8 | v
    return ipaddress.IPv4Address(number << (8 * (4 - len(head))) | last)


def old_acl_canonical_host(host: str):
    """usocksd/acl.py canonical_host (None where it raised)."""
    if not host or len(host) > 255:
        return None
    if host[-1].isdigit() or ":" in host:
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                return _old_unmapped(ip(socket.inet_ntop(family, socket.inet_pton(family, host))))
            except (OSError, ValueError):  # ValueError: an embedded NUL
                continue
    if ":" in host or host.startswith("["):
        inner = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if "%" in inner:
            return None
        try:
            return _old_unmapped(ipaddress.IPv6Address(inner))
        except ValueError:
            return None
    try:
        ascii_name = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    ascii_name = ascii_name.removesuffix(".")
    if not ascii_name:
        return None
    addr = _old_ipv4_like(ascii_name)
    if addr is not None:
        return addr
    labels = ascii_name.split(".")
    if _OLD_ACL_NUMERIC.match(labels[-1]):
        return None
    if len(ascii_name) > 253 or not all(_OLD_ACL_LABEL.match(label) for label in labels):
        return None
    return ascii_name


def old_acl_ports(text: str) -> tuple[int, int] | None:
    """usocksd/acl.py _ports."""
    if text in ("", "*"):
        return 1, 65535
    low_s, sep, high_s = text.partition("-")
    ok = low_s.isascii() and low_s.isdigit() and (not sep or (high_s.isascii() and high_s.isdigit()))
    if not ok:
        return None
    low, high = int(low_s), int(high_s) if sep else int(low_s)
    return (low, high) if 1 <= low <= high <= 65535 else None


def _or_none(f, *args):
    try:
        return f(*args)
    except ValueError:
        return None


# --- strategies ---------------------------------------------------------------------------------


label = st.text("abcxyzABZ019-_", min_size=1, max_size=12)
hexlabel = st.from_regex(r"0x[0-9a-f]{0,4}", fullmatch=True)
numeric = st.from_regex(r"[0-9]{1,4}", fullmatch=True)
name_like = st.lists(st.one_of(label, label, label, numeric, hexlabel), min_size=1, max_size=5).map(".".join)
name_text = st.one_of(name_like, name_like.map(lambda n: n + "."), st.text(max_size=40),
                      st.text("abc.-_0x19:[]%*\u3002\uff11\u00fc", max_size=30))


def _numeric_last_label(text: str) -> bool:
    return re.fullmatch(r"0x[0-9a-f]*|[0-9]+", text.lower().rstrip(".").rpartition(".")[2]) is not None


# --- host names: the sniffer's cases and code ------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    (b"example.com", "example.com"),
    (b"WWW.Example.COM", "www.example.com"),
    (b"example.com.", "example.com"),
    (b"localhost", "localhost"),
    (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
    (b"a-b.c9", "a-b.c9"),
    (b"a" * 63 + b".com", "a" * 63 + ".com"),
    (b"under_score.com", "under_score.com"),  # was refused by the sniffer alone
    (b"_dmarc.Example.COM.", "_dmarc.example.com"),
    (b"_x.example", "_x.example"),
])
def test_wire_names(raw, expected):
    assert wire_host_name(raw) == expected
    assert host_name(raw.decode()) == expected  # the same answer for text from settings and SOCKS


@pytest.mark.parametrize("raw", [
    b"", b".", b"..", b"a..b", b".example.com", b"example.com..",
    b"a" * 64 + b".com",  # label too long
    b".".join([b"a" * 63] * 4) + b".com",  # 256 bytes
    b"-a.com", b"a-.com", b"sp ace.com", b"tab\t.com",
    b"nul\x00.com", b"new\nline.com", b"del\x7f.com", b"caf\xc3\xa9.com",
    b"1.2.3.4", b"127.1", b"0x7f000001", b"0177.0.0.1", b"10.0.0.1.", b"::1", b"[::1]",
    b"2001:db8::1", b"example.123", b"example.0x1f", b"*.example.com", b"example.com:443",
])
def test_wire_non_names(raw):
    assert wire_host_name(raw) is None


def test_name_of_exactly_253_bytes():
    name = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(name) == 253 and wire_host_name(name.encode()) == name
    assert wire_host_name(name.encode() + b".") == name
    assert wire_host_name(b"c" + name.encode()) is None


@given(st.one_of(st.binary(max_size=300), name_text.map(lambda t: t.encode("utf-8", "replace"))))
@example(b"_x.example")
@example(b"a.0x1f")
def test_wire_names_agree_with_the_old_sniffer_but_for_underscores_and_hex(raw):
    new, old = wire_host_name(raw), old_sniff_valid_hostname(raw)
    if b"_" in raw or (new is None and old is not None and _numeric_last_label(old)):
        assert old is None or new is None
        if new is not None:
            assert b"_" in raw and old is None
        return
    assert new == old
    if new is not None:
        assert 0 < len(new) <= 253 and new == new.lower()
        assert all(c.isascii() and (c.isalnum() or c in "-._") for c in new)


@given(st.binary(max_size=300))
def test_wire_names_never_raise_and_are_host_names(raw):
    name = wire_host_name(raw)
    if name is not None:
        assert host_name(name) == name and wire_host_name(name.encode()) == name


# --- canonical hosts: usocksd's cases and code ---------------------------------------------------


@pytest.mark.parametrize("spelling", [
    "127.0.0.1", "127.1", "127.0.1", "0x7f.1", "0x7F.0.0.1", "0177.0.0.1", "0177.1", "2130706433",
    "0x7f000001", "017700000001", "127.0.0.1.", "::ffff:127.0.0.1", "[::ffff:127.0.0.1]", "::ffff:7f00:1",
    "0:0:0:0:0:ffff:7f00:1", "\uff11\uff12\uff17.\uff10.\uff10.\uff11",
])
def test_every_spelling_of_loopback_is_127_0_0_1(spelling):
    assert canonical_host(spelling) == ip("127.0.0.1")
    with pytest.raises(ValueError, match="address, not a name"):
        host_name(spelling)


@pytest.mark.parametrize("spelling, canonical", [
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("EVIL.Test.", "evil.test"),
    ("b\u00fccher.example", "xn--bcher-kva.example"),
    ("B\u00dcCHER.example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("evil\u3002test", "evil.test"),
    ("_dmarc.example.com", "_dmarc.example.com"),
    ("[::1]", ip("::1")),
    ("2001:DB8::0:1", ip("2001:db8::1")),
    ("0", ip("0.0.0.0")),
])
def test_canonical_forms(spelling, canonical):
    assert canonical_host(spelling) == canonical


@pytest.mark.parametrize("bad", [
    "", "a..b", "x" * 64 + ".com", ("a." * 127) + "com", "1.2.3.4.5", "256.1.1.1", "example.123", "example.0x1f",
    "::1%lo", "fe80::1%eth0", "evil.test\x00.good.test", "ex ample.com", "-a.com", "a-.com", "exa\\mple.com",
    "[::1", "1:2", "*.example.com", "a" * 256,
])
def test_invalid_hosts_are_refused(bad):
    with pytest.raises(ValueError):
        canonical_host(bad)


@given(name_text)
@example("_x.example")
@example("127.1")
def test_canonical_host_is_usocksd_s_old_definition(text):
    assert _or_none(canonical_host, text) == old_acl_canonical_host(text)


# --- domain patterns: the routes' and usocksd's cases and code -----------------------------------


def test_domain_patterns():
    exact, dot, star = (DomainPattern.parse(t) for t in ("example.com", ".example.com", "*.example.com"))
    assert exact.matches("example.com") and not exact.matches("a.example.com")
    assert dot.matches("example.com") and dot.matches("a.example.com")
    assert not star.matches("example.com") and star.matches("a.example.com")
    assert not dot.matches("notexample.com") and not star.matches("xexample.com")
    assert DomainPattern.parse("_x.example").matches("_x.example")
    assert DomainPattern.parse(".B\u00fccher.Example.").matches("www.xn--bcher-kva.example")
    assert [str(p) for p in (exact, dot, star)] == ["example.com", ".example.com", "*.example.com"]


@pytest.mark.parametrize("bad", ["", ".", "*.", "exa_mple..com", "-x.com", "127.1", ".127.0.0.1", "*.10.0.0.1",
                                 "::1", "example.123", "a b.com", "**.example.com", "example.com.."])
def test_bad_domain_patterns(bad):
    with pytest.raises(ValueError, match="bad domain"):
        DomainPattern.parse(bad)


@given(name_text)
@example("_x.example")
@example("example.com..")
def test_domain_patterns_are_the_routes_old_ones_but_stricter(text):
    new = _or_none(DomainPattern.parse, text)
    old = old_route_domain(text)
    if new is not None:
        # Every pattern accepted now was accepted before, or is a Unicode name now in A-labels.
        assert old == (new.base, new.self_too, new.below) or not text.isascii()
    elif old is not None:
        # Refused now: a numeric last label (an address or no DNS name), or several trailing dots.
        assert _numeric_last_label(old[0]) or text.strip().endswith("..")


# --- ports -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("443", (443, 443)), ("1-1023", (1, 1023)), ("*", (1, 65535)), ("65535", (65535, 65535)), ("8-8", (8, 8)),
])
def test_port_ranges(text, expected):
    assert port_range(text) == expected


@pytest.mark.parametrize("bad, words", [
    ("0", "bad port range"), ("90-80", "bad port range"), ("70000", "bad port range"), ("http", "bad port"),
    ("", "bad port"), ("\u00b2", "bad port"), ("\u0664\u0664\u0663", "bad port"), ("1-\uff19", "bad port"),
    (" 443", "bad port"), ("+443", "bad port"), ("4_43", "bad port"), ("1-", "bad port"), ("-5", "bad port"),
])
def test_bad_ports(bad, words):
    with pytest.raises(ValueError, match=words):
        port_range(bad)


def test_port_lists_and_numbers():
    assert port_ranges("80,443,8000-8100") == ((80, 80), (443, 443), (8000, 8100))
    assert port_ranges("80, 443") == ((80, 80), (443, 443))
    assert port_number("1080") == 1080 and port_number(" 1080 ") == 1080
    for bad in ("0", "65536", "x", "\u00b2", "1_080"):
        with pytest.raises(ValueError, match="bad port"):
            port_number(bad)


ports_text = st.lists(st.one_of(st.integers(0, 70000).map(str),
                                st.tuples(st.integers(0, 70000), st.integers(0, 70000)).map(lambda t: f"{t[0]}-{t[1]}"),
                                st.text("0123456789-*+ _\u00b2", max_size=6)), min_size=1, max_size=4).map(",".join)


@given(ports_text)
def test_port_lists_are_the_routes_old_ones_in_ascii(text):
    new = _or_none(port_ranges, text)
    old = old_route_ports(text)
    if new is not None:
        assert new == old or "*" in text
    elif old is not None:
        assert any(c in text for c in "+_ \u00b2")  # int() read those


@given(st.one_of(ports_text, st.text(max_size=8)))
def test_rule_ports_are_usocksd_s_old_ones(text):
    assume("," not in text and text != "")
    assert _or_none(port_range, text) == old_acl_ports(text)


# --- subnets ------------------------------------------------------------------------------------------


def test_networks():
    assert network("10.0.0.0/8") == ipaddress.ip_network("10.0.0.0/8")
    assert network("192.0.2.7").prefixlen == 32 and network("2001:db8::1").prefixlen == 128
    assert network("[2001:db8::]/32") == ipaddress.ip_network("2001:db8::/32")
    assert network("::ffff:10.0.0.0/104") == ipaddress.ip_network("10.0.0.0/8")
    assert networks("10.0.0.0/8, 2001:db8::/32") == (ipaddress.ip_network("10.0.0.0/8"),
                                                     ipaddress.ip_network("2001:db8::/32"))
    for bad in ("10.0.0.1/8", "example.com", "[2001:db8::/32", ""):
        with pytest.raises(ValueError):
            network(bad)
    with pytest.raises(ValueError, match="bad CIDR '10.0.0.1/8'"):
        networks("10.0.0.0/8,10.0.0.1/8")


v4_nets = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
    lambda t: ipaddress.IPv4Network((t[0], t[1]), strict=False))
v6_nets = st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)).map(
    lambda t: ipaddress.IPv6Network((t[0], t[1]), strict=False))


@given(st.lists(st.one_of(v4_nets, v6_nets), min_size=1, max_size=3))
def test_route_subnets_are_the_old_ones_and_mapped_ones_are_ipv4_now(nets):
    text = ",".join(map(str, nets))
    old = old_route_networks(text)
    new = networks(text)
    if old is not None:
        assert new == old
    else:  # refused before: a mapped subnet, now the IPv4 subnet it maps
        assert any(n.version == 6 and n.prefixlen >= 96 and n.network_address.ipv4_mapped for n in nets)
    for n in new:
        assert not (n.version == 6 and n.prefixlen >= 96 and n.network_address.ipv4_mapped)


# --- HOST:PORT and brackets ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("example.com", ("example.com", None)), ("example.com:443", ("example.com", "443")),
    ("192.0.2.7:80", ("192.0.2.7", "80")), ("[2001:db8::1]:443", ("2001:db8::1", "443")),
    ("[2001:db8::/32]:443", ("2001:db8::/32", "443")), ("[::1]", ("::1", None)), ("2001:db8::1", ("2001:db8::1", None)),
    ("*:25", ("*", "25")), ("[::1]:*", ("::1", "*")), (" name:1 ", ("name", "1")),
])
def test_split_host_port(text, expected):
    assert split_host_port(text) == expected


@pytest.mark.parametrize("bad", ["[::1", "[::1]x", "[::1]443", "[example.com]:80"])
def test_bad_brackets(bad):
    with pytest.raises(ValueError):
        split_host_port(bad)


@given(st.one_of(st.ip_addresses().map(str), name_like), st.integers(1, 65535))
def test_format_and_split_are_inverse(host, port):
    assert split_host_port(names.format_hostport(host, port)) == (host, str(port))


# --- IPv6 spellings that carry an IPv4 address -----------------------------------------------------


@pytest.mark.parametrize("spelling, inner", [
    ("64:ff9b::7f00:1", ["127.0.0.1"]), ("64:ff9b::127.0.0.1", ["127.0.0.1"]), ("64:ff9b::a01:203", ["10.1.2.3"]),
    ("2002:7f00:1::", ["127.0.0.1"]), ("2002:a01:203:1::5", ["10.1.2.3"]),
    ("::127.0.0.1", ["127.0.0.1"]), ("::a01:203", ["10.1.2.3"]),
    ("::ffff:0:7f00:1", ["127.0.0.1"]), ("::ffff:0:10.1.2.3", ["10.1.2.3"]),
    # RFC 8215's local-use prefix, with the translator's prefix length unknown: every RFC 6052 reading.
    ("64:ff9b:1::c633:6407", ["198.51.100.7"]),  # /96 64:ff9b:1::/96
    ("64:ff9b:1:fffe::198.51.100.7", ["198.51.100.7"]),  # /96 elsewhere in the /48
    ("64:ff9b:1:0:c6:3364:700:0", ["7.0.0.0", "198.51.100.7"]),  # /64
    ("64:ff9b:1:c6:33:6407::", ["51.100.7.0", "198.51.100.7"]),  # /56
    ("64:ff9b:1:c633:64:700::", ["100.7.0.0", "51.100.7.0", "198.51.100.7"]),  # /48
    ("64:ff9b:1::", ["0.0.0.0"]), ("64:ff9b:1::1", ["0.0.0.1"]),
])
def test_carried_ipv4(spelling, inner):
    assert carried_ipv4(canonical_host(spelling)) == tuple(ip(a) for a in inner)
    assert names.judged_as(ip(spelling)) == (ip(spelling), *map(ip, inner))


def test_carried_addresses_are_not_invented():
    for plain in ("::", "::1", "2001:db8::1", "fe80::1", "2003::7f00:1", "::1:0:0:1", "64:ff9b:2::7f00:1",
                  "64:ff9a:ffff:ffff:ffff:ffff:ffff:ffff", "127.0.0.1", "::ffff:127.0.0.1"):
        assert carried_ipv4(canonical_host(plain)) == (), plain


@given(st.integers(0, 2**32 - 1), st.sampled_from([48, 56, 64, 96]), st.integers(0, 2**48 - 1))
def test_every_rfc6052_spelling_in_the_local_use_prefix_carries_its_address(v4, length, subnet):
    """RFC 6052 2.2: the IPv4 address follows the prefix, skipping bits 64-71 (the u octet)."""
    addr = 0x0064FF9B0001 << 80 | (subnet & ((1 << (length - 48)) - 1)) << (128 - length)
    if length == 96:
        addr |= v4
    else:
        tail_bytes = 4 - (64 - length) // 8
        addr |= (v4 >> 8 * tail_bytes) << 64 | (v4 & ((1 << 8 * tail_bytes) - 1)) << (56 - 8 * tail_bytes)
    carried = carried_ipv4(ipaddress.IPv6Address(addr))
    assert ipaddress.IPv4Address(v4) in carried or (v4 == 0 and carried)  # 0.0.0.0 gives way to another reading


@given(st.lists(st.one_of(st.binary(max_size=40), st.sampled_from([b"www.example.com", b"Example.COM.", b"a..b", b"127.1"])),
                max_size=60))
def test_wire_host_name_answers_from_its_memory_as_it_would_afresh(raws: list[bytes]) -> None:
    """The kept answers are the function's answers, in any order, across the bound's clearing."""
    kept = names.WIRE_NAMES_KEPT
    names.WIRE_NAMES_KEPT = 8
    names._wire_names.clear()
    try:
        for raw in raws + raws:
            assert names.wire_host_name(raw) == names._wire_host_name(raw)
            assert names.wire_host_name(bytearray(raw)) == names._wire_host_name(raw)
            assert len(names._wire_names) <= 8
    finally:
        names.WIRE_NAMES_KEPT = kept


def test_wire_host_name_keeps_no_answer_for_bytes_longer_than_any_name() -> None:
    """A client's 16 KiB Host must not be kept as a key (1,024 of them would hold 16 MiB)."""
    raw = b"a" * (names.MAX_NAME + 2)
    assert names.wire_host_name(raw) is None and raw not in names._wire_names
    edge = b"b" * 63 + b"." + b"c" * 63 + b"." + b"d" * 63 + b"." + b"e" * 61 + b"."  # 253 bytes and the dot
    assert names.wire_host_name(edge) == names._wire_host_name(edge) == edge[:-1].decode()
