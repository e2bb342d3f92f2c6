"""usocksd access control: rule syntax, deny wins, safety defaults, evasion attempts (the spellings
themselves: test_names)."""

from __future__ import annotations

import ipaddress

import pytest

from transocks.core.names import DomainPattern, canonical_host, carried_ipv4, network
from transocks.usocksd.acl import ClientFilter, DestPolicy, dest_rule

ip = ipaddress.ip_address


# --- client subnets ------------------------------------------------------------


def test_client_filter_both_families_and_mapped():
    f = ClientFilter([network("192.0.2.0/24"), network("2001:db8:c::/64"), network("198.51.100.7"), network("::1")])
    assert f.allows(ip("192.0.2.200"))
    assert f.allows(ip("::ffff:192.0.2.3"))  # a v4 client on a dual-stack listener
    assert f.allows(ip("2001:db8:c::99"))
    assert f.allows(ip("198.51.100.7")) and not f.allows(ip("198.51.100.8"))
    assert f.allows(ip("::1")) and not f.allows(ip("::2"))
    assert not f.allows(ip("192.0.3.1"))
    assert not f.allows(ip("2001:db8:d::1"))


# --- rule syntax -----------------------------------------------------------------


@pytest.mark.parametrize("text, kind, target, low, high", [
    ("*", "any", None, 1, 65535),
    ("*:25", "any", None, 25, 25),
    ("example.com", "name", DomainPattern("example.com", True, False), 1, 65535),
    ("Example.COM.:443", "name", DomainPattern("example.com", True, False), 443, 443),
    (".example.com", "name", DomainPattern("example.com", True, True), 1, 65535),
    ("*.example.com:1-1023", "name", DomainPattern("example.com", False, True), 1, 1023),
    ("_x.example", "name", DomainPattern("_x.example", True, False), 1, 65535),
    ("10.0.0.0/8", "net", ipaddress.ip_network("10.0.0.0/8"), 1, 65535),
    ("10.0.0.0/8:22", "net", ipaddress.ip_network("10.0.0.0/8"), 22, 22),
    ("192.0.2.7", "net", ipaddress.ip_network("192.0.2.7/32"), 1, 65535),
    ("127.1", "net", ipaddress.ip_network("127.0.0.1/32"), 1, 65535),
    ("2001:db8::/32", "net", ipaddress.ip_network("2001:db8::/32"), 1, 65535),
    ("2001:db8::1", "net", ipaddress.ip_network("2001:db8::1/128"), 1, 65535),
    ("[2001:db8::/32]:443", "net", ipaddress.ip_network("2001:db8::/32"), 443, 443),
    ("[::1]:*", "net", ipaddress.ip_network("::1/128"), 1, 65535),
    ("::ffff:127.0.0.0/104", "net", ipaddress.ip_network("127.0.0.0/8"), 1, 65535),
])
def test_rule_syntax(text, kind, target, low, high):
    rule = dest_rule(text)
    assert (rule.kind, rule.target, rule.low, rule.high) == (kind, target, low, high)
    assert str(rule) == text


@pytest.mark.parametrize("bad", ["example.com:0", "example.com:70000", "example.com:9-3", "example.com:http",
                                 "10.0.0.1/8", "[2001:db8::/32", "[::1]x", ".127.0.0.1", "a..b", "",
                                 "example.com:\u00b2", "example.com:\u0664\u0664\u0663", "example.com:1-\uff19",
                                 "example.com: 443", "example.com:+443", "example.com:4_43", "example.com:",
                                 "example.0x1f", "*.127.0.0.1", "[example.com]:80"])
def test_bad_rules_are_refused(bad):
    with pytest.raises(ValueError):
        dest_rule(bad)


# --- decisions -------------------------------------------------------------------


def policy(allow=(), deny=(), default="allow", host=frozenset()):
    return DestPolicy([dest_rule(r) for r in allow], [dest_rule(r) for r in deny], default == "allow", host)


def test_name_patterns():
    p = policy(deny=["exact.test", ".domain.test", "*.below.test"])
    assert p.name_denied("exact.test", 80)
    assert not p.name_denied("www.exact.test", 80)
    assert p.name_denied("domain.test", 80) and p.name_denied("a.b.domain.test", 80)
    assert not p.name_denied("notdomain.test", 80)
    assert p.name_denied("www.below.test", 80)
    assert not p.name_denied("below.test", 80)
    assert not p.name_denied("xbelow.test", 80)


def test_ports_and_ranges():
    p = policy(deny=["*:25", "mail.test:465-587"])
    assert not p.decide(None, [ip("203.0.113.10")], 25).allowed
    assert not p.decide("any.test", [], 25).allowed
    assert p.decide("mail.test", [ip("203.0.113.10")], 443).allowed
    assert not p.decide("mail.test", [ip("203.0.113.10")], 500).allowed


def test_deny_wins_over_allow():
    p = policy(allow=[".example.test", "203.0.113.0/24"], deny=["bad.example.test", "203.0.113.66"])
    assert p.decide("www.example.test", [ip("198.51.100.5")], 443).allowed
    assert not p.decide("bad.example.test", [ip("203.0.113.10")], 443).allowed
    assert not p.decide(None, [ip("203.0.113.66")], 443).allowed
    assert p.decide(None, [ip("203.0.113.10")], 443).allowed


def test_default_deny_needs_an_allow():
    p = policy(allow=[".good.test:443", "203.0.113.0/24"], default="deny")
    assert p.decide("www.good.test", [ip("198.51.100.5")], 443).allowed
    assert not p.decide("www.good.test", [ip("198.51.100.5")], 80).allowed
    assert p.decide("other.test", [ip("203.0.113.10")], 80).allowed  # every resolved address allowed
    assert not p.decide("other.test", [ip("203.0.113.10"), ip("198.51.100.5")], 80).allowed
    verdict = p.decide(None, [ip("198.51.100.5")], 80)
    assert not verdict.allowed and "dest_policy deny" in verdict.reason


def test_name_resolving_to_a_forbidden_address_is_refused():
    p = policy(allow=["evil.test"], deny=["127.0.0.0/8", "::1", "192.0.2.0/24"])
    verdict = p.decide("evil.test", [ip("203.0.113.10"), ip("127.0.0.1")], 80)
    assert not verdict.allowed
    assert "127.0.0.1:80 matches deny_dest 127.0.0.0/8 (evil.test resolves to 127.0.0.1)" == verdict.reason
    assert not p.decide("evil.test", [ip("::1")], 80).allowed
    assert not p.decide("evil.test", [ip("192.0.2.2")], 80).allowed


@pytest.mark.parametrize("spelling", ["127.1", "0x7f.1", "2130706433", "0177.0.0.1", "::ffff:127.0.0.1",
                                      "[::ffff:7f00:1]", "127.0.0.1."])
def test_alternate_address_spellings_cannot_evade_subnet_rules(spelling):
    p = policy(deny=["127.0.0.0/8"])
    host = canonical_host(spelling)
    assert not isinstance(host, str)
    assert not p.decide(None, [host], 80).allowed


@pytest.mark.parametrize("spelling", ["BLOCKED.test", "blocked.test.", "www.Blocked.Test.", "blocked\u3002test"])
def test_case_trailing_dot_and_idna_dots_cannot_evade_name_rules(spelling):
    p = policy(deny=[".blocked.test"])
    host = canonical_host(spelling)
    assert isinstance(host, str) and p.name_denied(host, 443)


def test_mapped_ipv6_rule_matches_plain_ipv4_and_the_reverse():
    assert not policy(deny=["::ffff:10.0.0.0/104"]).decide(None, [canonical_host("10.1.2.3")], 80).allowed
    assert not policy(deny=["10.0.0.0/8"]).decide(None, [canonical_host("::ffff:10.1.2.3")], 80).allowed


def test_unspecified_address_is_always_refused():
    p = policy(allow=["*"])
    assert not p.decide(None, [ip("0.0.0.0")], 80).allowed
    assert not p.decide(None, [ip("::")], 80).allowed
    assert not p.decide("zero.test", [ip("0.0.0.0")], 80).allowed


def test_name_rules_do_not_match_literals_and_subnet_rules_do_not_match_names():
    p = policy(allow=["example.test"], deny=["10.0.0.0/8"], default="deny")
    assert not p.decide(None, [ip("203.0.113.10")], 80).allowed
    assert p.name_denied("example.test", 80) is None


# --- IPv6 spellings that carry an IPv4 address --------------------------------------------------


@pytest.mark.parametrize("spelling, inner", [
    ("64:ff9b::7f00:1", "127.0.0.1"), ("64:ff9b::127.0.0.1", "127.0.0.1"), ("[64:ff9b::a01:203]", "10.1.2.3"),
    ("2002:7f00:1::", "127.0.0.1"), ("2002:a01:203:1::5", "10.1.2.3"),
    ("::127.0.0.1", "127.0.0.1"), ("::a01:203", "10.1.2.3"),
    ("::ffff:0:7f00:1", "127.0.0.1"), ("::ffff:0:10.1.2.3", "10.1.2.3"),
    ("64:ff9b:1::7f00:1", "127.0.0.1"), ("64:ff9b:1:fffe::a01:203", "10.1.2.3"),  # RFC 8215, a /96 in it
])
def test_nat64_6to4_and_compatible_spellings_hit_ipv4_deny_rules(spelling, inner):
    assert carried_ipv4(canonical_host(spelling)) == (ip(inner),)
    p = policy(deny=["127.0.0.0/8", "10.0.0.0/8"])
    verdict = p.decide(None, [canonical_host(spelling)], 80)
    assert not verdict.allowed
    assert f"{inner}:80 matches deny_dest" in verdict.reason and "(carried in " in verdict.reason
    resolved = p.decide("dns64.test", [canonical_host(spelling)], 80)  # e.g. a DNS64 answer
    assert not resolved.allowed and "dns64.test resolves to" in resolved.reason


def test_local_use_nat64_spellings_hit_ipv4_deny_rules_whatever_the_prefix_length():
    """The issue's case: 64:ff9b:1::c633:6407 passed a rule denying 198.51.100.7.  In 64:ff9b:1::/48
    the translator's prefix may be /48, /56, /64 or /96; each spelling of the address is refused."""
    p = policy(deny=["198.51.100.7"])
    for spelling in ("64:ff9b:1::c633:6407", "64:ff9b:1::198.51.100.7", "64:ff9b:1:fffe::c633:6407",
                     "64:ff9b:1:0:c6:3364:700:0", "64:ff9b:1:c6:33:6407::", "64:ff9b:1:c633:64:700::"):
        verdict = p.decide(None, [canonical_host(spelling)], 443)
        assert not verdict.allowed and "198.51.100.7:443 matches deny_dest 198.51.100.7 (carried in" in verdict.reason
    assert p.decide(None, [ip("64:ff9b:1::c633:6408")], 443).allowed
    assert p.decide(None, [ip("64:ff9b:2::c633:6407")], 443).allowed  # outside the prefix


def test_carried_addresses_are_not_invented():
    for plain in ("::", "::1", "2001:db8::1", "fe80::1", "2003::7f00:1", "::1:0:0:1"):
        assert carried_ipv4(ip(plain)) == (), plain
    assert carried_ipv4(ip("127.0.0.1")) == ()
    assert policy(deny=["127.0.0.0/8"]).decide(None, [ip("2001:db8::7f00:1")], 80).allowed


def test_embedded_unspecified_is_refused_and_allow_rules_see_the_dialled_address():
    assert not policy().decide(None, [ip("64:ff9b::")], 80).allowed
    strict = policy(allow=["203.0.113.0/24"], default="deny")
    assert strict.decide(None, [ip("203.0.113.5")], 80).allowed
    assert not strict.decide(None, [ip("64:ff9b::203.0.113.5")], 80).allowed  # allow: as dialled
    assert policy(allow=["64:ff9b::/96"], default="deny").decide(None, [ip("64:ff9b::203.0.113.5")], 80).allowed


def test_client_addresses_are_not_unwrapped_beyond_mapped():
    """A 6to4 or NAT64 source says nothing about who the client is: allow_from 10.0.0.0/8 must not
    admit 2002:a00:1::1."""
    clients = ClientFilter([network("10.0.0.0/8")])
    assert clients.allows(ip("::ffff:10.0.0.1"))
    assert not clients.allows(ip("2002:a00:1::1")) and not clients.allows(ip("64:ff9b::a00:1"))


# --- safety defaults ------------------------------------------------------------------------------


HOST = {ip("192.0.2.1"), ip("2001:db8:1::1"), ip("fe80::1"), ip("127.0.0.1"), ip("::1")}


@pytest.mark.parametrize("dest, what", [
    ("127.0.0.1", "a loopback address"), ("127.9.9.9", "a loopback address"), ("::1", "a loopback address"),
    ("0.0.0.0", "the unspecified address"), ("::", "the unspecified address"),
    ("169.254.1.1", "a link-local address"), ("fe80::99", "a link-local address"),
    ("192.0.2.1", "an address of this host"), ("2001:db8:1::1", "an address of this host"),
    ("fe80::1", "an address of this host"),
    # every spelling of item 1
    ("::ffff:127.0.0.1", "a loopback address"), ("64:ff9b::7f00:1", "a loopback address"),
    ("64:ff9b:1::7f00:1", "a loopback address"), ("2002:7f00:1::", "a loopback address"),
    ("::127.0.0.1", "a loopback address"), ("64:ff9b::c000:201", "an address of this host"),
    ("64:ff9b:1:c000:2:100::", "an address of this host"), ("2002:c000:201::1", "an address of this host"),
    ("64:ff9b::a9fe:101", "a link-local address"),
])
def test_loopback_link_local_unspecified_and_this_host_are_refused_by_default(dest, what):
    for p in (policy(host=HOST), policy(allow=["*", "0.0.0.0/0", "::/0", "192.0.2.0/24", "2001:db8::/32",
                                               "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "fe00::/8"],
                                        host=HOST)):
        verdict = p.decide(None, [canonical_host(dest)], 8080)
        assert not verdict.allowed and f"is {what}" in verdict.reason, (dest, verdict)
    named = p.decide("edge.test", [canonical_host(dest)], 8080)  # a name resolving there
    assert not named.allowed and f"(edge.test resolves to {canonical_host(dest)})" in named.reason


@pytest.mark.parametrize("rule, dest", [
    ("127.0.0.0/8", "127.0.0.1"), ("127.0.0.1:8080", "127.0.0.1"), ("[::1]:8080", "::1"), ("::1", "::1"),
    ("0.0.0.0", "0.0.0.0"), ("169.254.0.0/16", "169.254.1.1"), ("fe80::/10", "fe80::99"),
    ("192.0.2.1:8080", "192.0.2.1"), ("2001:db8:1::1", "2001:db8:1::1"),
])
def test_an_allow_rule_naming_them_lifts_the_default(rule, dest):
    p = policy(allow=[rule], host=HOST)
    assert p.decide(None, [ip(dest)], 8080).allowed
    assert not p.decide(None, [ip(dest)], 8081).allowed or ":8080" not in rule  # the rule's ports only
    assert not policy(allow=[rule], deny=[rule], host=HOST).decide(None, [ip(dest)], 8080).allowed  # deny wins


def test_a_rule_for_a_class_does_not_name_this_host_in_it():
    """fe80::1 is this host's: fe80::/10 names link-local addresses, not this host's own."""
    p = policy(allow=["fe80::/10", "192.0.2.0/24"], host=HOST)
    assert not p.decide(None, [ip("fe80::1")], 80).allowed
    assert not p.decide(None, [ip("192.0.2.1")], 80).allowed
    assert p.decide(None, [ip("192.0.2.2")], 80).allowed


def test_ordinary_destinations_are_untouched():
    p = policy(host=HOST)
    for dest in ("198.51.100.7", "2001:db8:2::7", "10.0.0.1", "64:ff9b::c633:6407"):
        assert p.decide(None, [ip(dest)], 443).allowed, dest
