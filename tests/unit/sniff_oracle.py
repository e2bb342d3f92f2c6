"""The name parsers as they were before issue 17 (whole buffer in, re-parsed on every arrival),
kept as the oracle the incremental `NameParser` must agree with on valid inputs.

Quadratic when fed growing prefixes; only the tests call it, on one whole input at a time.
Names are checked by today's rule (`wire_host_name`, as `_client_hello_name` does): what is
compared is the framing.
"""

from __future__ import annotations

from transocks.core.names import wire_host_name
from transocks.redirector.sniff import (
    _CLIENT_HELLO,
    _HANDSHAKE,
    _MAX_METHOD,
    _NOT_METHOD,
    MAX_RECORD,
    MAX_SNIFF,
    Sniffed,
    Verdict,
    _client_hello_name,
)


def tls_server_name(data: bytes) -> Sniffed:
    message = bytearray()
    pos = 0
    while True:
        header = data[pos:pos + 5]
        if header[:1] and header[0] != _HANDSHAKE:
            return Verdict.NONE
        if header[1:2] and header[1] != 3:
            return Verdict.NONE
        if len(header) < 5:
            return Verdict.MORE
        length = int.from_bytes(header[3:5], "big")
        if not 0 < length <= MAX_RECORD:
            return Verdict.NONE
        fragment = data[pos + 5:pos + 5 + length]
        message += fragment
        pos += 5 + len(fragment)
        if message and message[0] != _CLIENT_HELLO:
            return Verdict.NONE
        if len(message) >= 4:
            size = int.from_bytes(message[1:4], "big")
            if 4 + size + 5 > MAX_SNIFF:
                return Verdict.NONE
            if len(message) >= 4 + size:
                return _client_hello_name(bytes(message[4:4 + size]))
        if len(fragment) < length:
            return Verdict.MORE


def http_host(data: bytes) -> Sniffed:
    end = data.find(b"\n")
    line = data if end < 0 else data[:end]
    space = line.find(b" ")
    method = line if space < 0 else line[:space]
    if len(method) > _MAX_METHOD or _NOT_METHOD.search(method):
        return Verdict.NONE
    if space == 0 or (space < 0 and end >= 0):
        return Verdict.NONE
    if end < 0:
        return Verdict.MORE
    parts = _chomp(line).split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return Verdict.NONE
    pos = end + 1
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            return Verdict.MORE
        line = _chomp(data[pos:end])
        if not line:
            return Verdict.NONE
        name, colon, value = line.partition(b":")
        if colon and name.lower() == b"host":
            return _host_value(value)
        pos = end + 1


def _chomp(line: bytes) -> bytes:
    return line[:-1] if line.endswith(b"\r") else line


def _host_value(value: bytes) -> Sniffed:
    value = value.strip(b" \t")
    if value.startswith(b"["):
        return Verdict.NONE
    host, colon, port = value.rpartition(b":")
    if colon:
        if port and not port.isdigit():
            return Verdict.NONE
        value = host
    return wire_host_name(value) or Verdict.NONE


def sniff(data: bytes) -> Sniffed:
    if not data:
        return Verdict.MORE
    if data[0] == _HANDSHAKE:
        return tls_server_name(data)
    return http_host(data)
