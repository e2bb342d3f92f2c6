"""Routing rules: each matcher, first match wins, and the parse errors an operator sees."""

from __future__ import annotations

import pytest

from transocks.core.names import DomainPattern
from transocks.core.netutil import Endpoint
from transocks.redirector.flow import Flow
from transocks.redirector.route import Router, parse_rule


def conn(dest="203.0.113.10", port=443, src="192.0.2.2", listen=1081, name=None, proto="tcp") -> Flow:
    return Flow(Endpoint(dest, port), Endpoint(src, 40000), listen, name, proto)


@pytest.mark.parametrize("rule, hit, miss", [
    ("dst=203.0.113.0/24 -> a", conn(), conn(dest="198.51.100.1")),
    ("dst=10.0.0.0/8,2001:db8::/32 -> a", conn(dest="2001:db8:2::10"), conn(dest="2001:db9::1")),
    ("port=80,443 -> a", conn(port=80), conn(port=8080)),
    ("port=8000-8100 -> a", conn(port=8100), conn(port=8101)),
    ("src=192.0.2.0/28 -> a", conn(src="192.0.2.3"), conn(src="192.0.2.200")),
    ("src=2001:db8:c::/64 -> a", conn(src="2001:db8:c::2"), conn(src="192.0.2.2")),
    ("listen=1082 -> a", conn(listen=1082), conn(listen=1081)),
    ("domain=example.com -> a", conn(name="example.com"), conn(name="www.example.com")),
    ("domain=.Example.COM. -> a", conn(name="www.example.com"), conn(name="badexample.com")),
    ("domain=_x.example -> a", conn(name="_x.example"), conn(name="x.example")),
    ("domain=b\u00fccher.example -> a", conn(name="xn--bcher-kva.example"), conn(name="bucher.example")),
    ("dst=::ffff:10.0.0.0/104 -> a", conn(dest="10.1.2.3"), conn(dest="11.1.2.3")),
    ("domain=*.example.com -> a", conn(name="a.b.example.com"), conn(name="example.com")),
    ("domain=example.com,example.org -> a", conn(name="example.org"), conn(name=None)),
    ("dst=203.0.113.0/24 port=443 -> a", conn(), conn(port=80)),  # all must hold
    ("proto=udp -> a", conn(proto="udp"), conn()),
    ("proto=TCP -> a", conn(), conn(proto="udp")),
    ("port=53 proto=udp -> a", conn(port=53, proto="udp"), conn(port=53)),
])
def test_each_matcher(rule, hit, miss):
    r = parse_rule(rule)
    assert r(hit)
    assert not r(miss)


def test_listen_needs_the_listener_port():
    assert not parse_rule("listen=1081 -> a")(conn(listen=None))


def test_domain_patterns():
    exact, dot, star = (DomainPattern.parse(t) for t in ("example.com", ".example.com", "*.example.com"))
    assert exact.matches("example.com") and not exact.matches("a.example.com")
    assert dot.matches("example.com") and dot.matches("a.example.com")
    assert not star.matches("example.com") and star.matches("a.example.com")
    assert not dot.matches("notexample.com")


def test_first_match_wins_default_otherwise():
    rules = [parse_rule("port=443 -> first"), parse_rule("dst=203.0.113.0/24 -> second")]
    router = Router([(r, r.target) for r in rules], "default")
    c = conn()
    assert router.route(c) == "first" and c.rule is rules[0]
    assert router.route(conn(port=80)) == "second"
    other = conn(dest="198.51.100.7", port=80)
    assert router.route(other) == "default" and other.rule is None


def test_rule_text_is_normalised():
    assert str(parse_rule("  dst=10.0.0.0/8   port=80  ->   direct ")) == "dst=10.0.0.0/8 port=80 -> direct"


@pytest.mark.parametrize("text, words", [
    ("dst=10.0.0.0/8", "expected MATCH"),
    ("dst=10.0.0.0/8 -> a b", "one TARGET"),
    ("-> a", "no MATCH"),
    ("dest=10.0.0.0/8 -> a", "unknown MATCH"),
    ("dst=10.0.0.1/8 -> a", "bad CIDR"),
    ("domain=127.1 -> a", "bad domain"),
    ("port=\u0664\u0664\u0663 -> a", "bad port"),
    ("port=0 -> a", "bad port range"),
    ("port=90-80 -> a", "bad port range"),
    ("port=http -> a", "bad port"),
    ("domain=exa_mple..com -> a", "bad domain"),
    ("domain=-x.com -> a", "bad domain"),
    ("port=80 port=81 -> a", "given twice"),
    ("port= -> a", "needs a value"),
    ("port=80 -> 1abc", "bad pool name"),
    ("proto=icmp -> a", "proto= is tcp or udp"),
    ("proto=tcp,udp -> a", "proto= is tcp or udp"),
    ("proto=udp proto=tcp -> a", "given twice"),
    ("prot=udp -> a", r"unknown MATCH .*proto="),
])
def test_parse_errors(text, words):
    with pytest.raises(ValueError, match=words):
        parse_rule(text)


def test_integer_matching_agrees_with_ipaddress():
    """dst=/src= compare integers; they must say what ipaddress says, for both families."""
    import ipaddress
    import random

    rng = random.Random(9)
    nets = ["10.0.0.0/8", "203.0.113.128/25", "0.0.0.0/0", "2001:db8::/32", "2001:db8:2::10/128", "::/0"]
    for text in nets:
        rule = parse_rule(f"dst={text} -> a")
        net = ipaddress.ip_network(text)
        for _ in range(300):
            if net.version == 4:
                ip = ipaddress.IPv4Address(rng.getrandbits(32) if rng.random() < 0.5 else
                                           int(net.network_address) + rng.getrandbits(32 - net.prefixlen))
            else:
                ip = ipaddress.IPv6Address(rng.getrandbits(128) if rng.random() < 0.5 else
                                           int(net.network_address) + rng.getrandbits(128 - net.prefixlen))
            assert rule(conn(dest=str(ip))) == (ip in net), (text, ip)
        other = "2001:db8::1" if net.version == 4 else "10.0.0.1"
        assert not rule(conn(dest=other))  # never across families


# --- UDP flows ----------------------------------------------------------------------


def test_a_flow_is_tcp_unless_said_and_rules_without_proto_hold_for_both():
    assert conn().proto == "tcp"
    rule = parse_rule("dst=203.0.113.0/24 port=53 -> a")
    assert rule(conn(port=53)) and rule(conn(port=53, proto="udp"))


def test_domain_rules_never_hold_for_udp_flows():
    rule = parse_rule("domain=.example.com -> a")
    assert not rule(conn(proto="udp")) and not rule.may_hold("udp") and rule.may_hold("tcp")


def test_targets_each_protocol_can_reach():
    rules = [parse_rule(t) for t in ("proto=tcp -> t", "domain=example.com -> d", "port=53 -> dns",
                                     "dst=10.0.0.0/8 -> dns", "proto=udp -> u", "port=5353 -> never")]
    router = Router([(r, r.target) for r in rules], "default")
    assert router.reachable("udp") == ["dns", "u"]  # proto=udp alone takes every UDP flow: the default none
    assert router.reachable("tcp") == ["t"]  # likewise proto=tcp for TCP
    router = Router([(r, r.target) for r in rules[1:4]], "default")
    assert router.reachable("udp") == ["dns", "default"]
    assert router.reachable("tcp") == ["d", "dns", "default"]
