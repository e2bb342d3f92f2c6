"""usocksd's wire format: requests parsed whole, replies encoded with the client side's encoders."""

from __future__ import annotations

import socket
import struct

import pytest

from tests.unit.readers import reader_of
from transocks.core.netutil import Endpoint
from transocks.usocksd import protocol as p


def test_methods():
    assert p.read_methods(reader_of(b"\x02\x00\x02")) == b"\x00\x02"
    with pytest.raises(p.Malformed, match="no methods"):
        p.read_methods(reader_of(b"\x00"))
    with pytest.raises(EOFError):
        p.read_methods(reader_of(b"\x03\x00"))


def test_userpass():
    assert p.read_userpass(reader_of(b"\x01\x05alice\x06wonder")) == (b"alice", b"wonder")
    assert p.read_userpass(reader_of(b"\x01\x00\x00")) == (b"", b"")
    with pytest.raises(p.Malformed, match="version 0x05"):
        p.read_userpass(reader_of(b"\x05\x01a\x01b"))


@pytest.mark.parametrize("data, host, port", [
    (b"\x05\x01\x00\x01\xcb\x00\x71\x0a\x23\x28", "203.0.113.10", 9000),
    (b"\x05\x01\x00\x04" + socket.inet_pton(socket.AF_INET6, "2001:db8:2::10") + b"\x23\x28", "2001:db8:2::10", 9000),
    (b"\x05\x01\x00\x03\x09good.test\x01\xbb", "good.test", 443),
    (b"\x05\x01\x00\x03\x0fb\xc3\xbccher.example\x00\x50", "b\u00fccher.example", 80),
    (b"\x05\x01\x00\x03\x03a\xffb\x00\x50", "a\\xffb", 80),
])
def test_socks5_request(data, host, port):
    read = reader_of(data + b"tunnel bytes")
    request = p.read_socks5_request(read)
    assert (request.command, request.host, request.port) == (1, host, port)
    assert bytes(read.rest) == b"tunnel bytes"  # nothing behind the request is consumed


def test_socks5_request_errors():
    with pytest.raises(p.Refused) as info:
        p.read_socks5_request(reader_of(b"\x05\x01\x00\x09\x00\x00"))
    assert info.value.code == p.ADDRESS_TYPE_NOT_SUPPORTED
    with pytest.raises(p.Malformed):
        p.read_socks5_request(reader_of(b"\x04\x01\x00\x01" + bytes(6)))
    assert p.read_socks5_request(reader_of(b"\x05\x02\x00\x01" + bytes(6))).command == p.CMD_BIND


def test_socks4_and_4a():
    read = reader_of(struct.pack("!BH4s", 1, 9000, socket.inet_aton("203.0.113.10")) + b"bob\0rest")
    request, userid = p.read_socks4_request(read)
    assert (request.version, request.host, request.port, userid) == (4, "203.0.113.10", 9000, "bob")
    assert bytes(read.rest) == b"rest"
    read = reader_of(struct.pack("!BH4s", 1, 443, b"\0\0\0\x07") + b"\0good.test\0")
    request, userid = p.read_socks4_request(read)
    assert (request.host, request.port, userid) == ("good.test", 443, "")


@pytest.mark.parametrize("tail, what", [(b"u" * 300 + b"\0", "user id"), (b"\0" + b"h" * 300 + b"\0", "host name")])
def test_socks4_oversized_fields(tail, what):
    with pytest.raises(p.Malformed, match=f"{what} longer than 255"):
        p.read_socks4_request(reader_of(struct.pack("!BH4s", 1, 80, b"\0\0\0\x01") + tail))


def test_replies():
    assert p.method_selection(2) == b"\x05\x02"
    assert p.auth_status(True) == b"\x01\x00" and p.auth_status(False) == b"\x01\x01"
    assert p.socks5_reply(0, Endpoint("198.51.100.21", 40000)) == b"\x05\x00\x00\x01\xc6\x33\x64\x15\x9c\x40"
    v6 = p.socks5_reply(0, Endpoint("2001:db8:1::21", 1))
    assert v6[:4] == b"\x05\x00\x00\x04" and len(v6) == 22
    assert p.socks5_reply(p.CONNECTION_REFUSED) == b"\x05\x05\x00\x01" + bytes(6)
    assert p.socks4_reply(True, Endpoint("198.51.100.21", 40000)) == b"\x00\x5a\x9c\x40\xc6\x33\x64\x15"
    assert p.socks4_reply(True, Endpoint("2001:db8::1", 5)) == b"\x00\x5a\x00\x05" + bytes(4)
    assert p.socks4_reply(False) == b"\x00\x5b" + bytes(6)
    assert p.reply_text(6) == "06 TTL expired"
