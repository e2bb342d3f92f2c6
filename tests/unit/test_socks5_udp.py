"""Property tests of the SOCKS5 UDP datagram codec (RFC 1928 section 7), which usocksd runs on
every datagram a client or the Internet sends: what `udp_datagram` writes, `parse_udp_datagram`
reads back; every truncation, a bad ATYP, a non-zero RSV and an empty name raise ProtocolError;
arbitrary bytes raise nothing else.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.unit.test_wire_properties import same_host
from transocks.core.netutil import Endpoint
from transocks.wire import ProtocolError, socks5

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=63)
names = st.lists(labels, min_size=1, max_size=8).map(".".join).filter(lambda n: len(n) <= 255)
ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
hosts = st.one_of(ipv4, ipv6, names)
ports = st.integers(0, 65535)
payloads = st.binary(max_size=200)


@FUZZ
@given(hosts, ports, payloads, st.integers(0, 255))
def test_round_trip(host, port, payload, frag):
    address = socks5.encode_address(Endpoint(host, port))
    datagram = bytearray(socks5.udp_datagram(address, payload))
    assert datagram[:3] == b"\0\0\0"
    datagram[2] = frag
    got_frag, dest, offset = socks5.parse_udp_datagram(bytes(datagram))
    assert got_frag == frag
    assert same_host(dest.host, host) and dest.port == port
    assert offset == 3 + len(address) <= socks5.UDP_HEADER_MAX
    assert bytes(datagram[offset:]) == payload


@FUZZ
@given(hosts, ports)
def test_every_truncation_of_the_header_raises(host, port):
    header = socks5.udp_datagram(socks5.encode_address(Endpoint(host, port)), b"")
    for end in range(len(header)):
        with pytest.raises(ProtocolError):
            socks5.parse_udp_datagram(header[:end])


@FUZZ
@given(st.integers(0, 255).filter(lambda a: a not in (socks5.ATYP_IPV4, socks5.ATYP_DOMAIN, socks5.ATYP_IPV6)),
       st.binary(max_size=300))
def test_unknown_address_type_raises(atyp, rest):
    with pytest.raises(ProtocolError):
        socks5.parse_udp_datagram(b"\0\0\0" + bytes([atyp]) + rest)


@FUZZ
@given(st.integers(0, 255), st.integers(0, 255).filter(bool), hosts, ports, payloads)
def test_non_zero_rsv_raises(first, second, host, port, payload):
    datagram = socks5.udp_datagram(socks5.encode_address(Endpoint(host, port)), payload)
    for rsv in (bytes([first, second]), bytes([second, first])):
        with pytest.raises(ProtocolError):
            socks5.parse_udp_datagram(rsv + datagram[2:])


@FUZZ
@given(st.integers(0, 255), st.binary(max_size=300))
def test_empty_name_raises(frag, rest):
    with pytest.raises(ProtocolError):
        socks5.parse_udp_datagram(bytes([0, 0, frag, socks5.ATYP_DOMAIN, 0]) + rest)


@FUZZ
@given(st.binary(max_size=600))
@example(b"")
@example(b"\0\0\0\x03")
@example(b"\0\0\0\x03\xff" + b"\xff" * 257)
@example(b"\0\0\0\x04" + bytes(17))
def test_arbitrary_bytes_parse_or_raise_protocol_error(data):
    try:
        frag, dest, offset = socks5.parse_udp_datagram(data)
    except ProtocolError:
        return
    assert data[0] == data[1] == 0 and frag == data[2]
    assert 10 <= offset <= min(len(data), socks5.UDP_HEADER_MAX)
    assert 0 <= dest.port <= 65535 and dest.host
