"""The destination's name, from what the client sends first: the TLS ClientHello's
server_name or the HTTP/1.x Host header.

Why: a REDIRECTed connection carries only an address, so an edge with name
rules (usocksd's deny_dest/allow_dest) never sees the name the client meant.
The parsers are pure (bytes in, a name or a `Verdict` out) and decide as soon as
the bytes allow, so a prefix that decides gives the answer the whole stream
would: splitting the bytes across TCP segments or TLS records never changes it.
`read_first` is the one step with I/O: it consumes at most `MAX_SNIFF` bytes
within a deadline and hands them back, so they go upstream first (the relay's
`early` bytes) and none is lost, duplicated or reordered.

Server-first protocols (SMTP, FTP, IMAP, MySQL) send nothing until the server
speaks; on a sniffed port such a destination pays the deadline once and is then
remembered in `SilentDestinations` (like mihomo's skip list) and not delayed again.
"""

from __future__ import annotations

import enum
import logging
import re
import struct
import time
from collections import OrderedDict
from typing import NamedTuple

from ..core import nio
from ..core.names import wire_host_name
from ..core.netutil import Endpoint
from ..core.nio import Deadline

log = logging.getLogger("transocks")

MAX_SNIFF = 16 * 1024  # bytes read at most; a ClientHello with post-quantum key shares is ~2 KiB
MAX_RECORD = 1 << 14  # TLS plaintext record limit (RFC 8446 5.1)
SILENT_ENTRIES = 1024
SILENT_TTL = 600.0  # seconds

_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_HOST_NAME = 0
_NOT_METHOD = re.compile(rb"[^A-Z_-]")  # a byte that cannot be in a request method
_MAX_METHOD = 20


class Verdict(enum.Enum):
    """What the parsers say when they return no name."""

    MORE = "more"  # the bytes so far may still become a name: read on
    NONE = "none"  # decided: these bytes carry no usable name


Sniffed = str | Verdict


# --- TLS -----------------------------------------------------------------------------------


_U16 = struct.Struct("!H").unpack_from
_U16_U16 = struct.Struct("!HH").unpack_from


def tls_server_name(data: bytes) -> Sniffed:
    """server_name of the ClientHello that `data` starts with.

    The handshake message is reassembled from consecutive handshake records
    (a ClientHello may be split across records as well as across segments);
    anything that is not a ClientHello decides NONE at the first byte that shows it.
    """
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
            if 4 + size + 5 > MAX_SNIFF:  # could never be read whole
                return Verdict.NONE
            if len(message) >= 4 + size:
                return _client_hello_name(bytes(message[4:4 + size]))
        if len(fragment) < length:
            return Verdict.MORE


def _client_hello_name(body: bytes) -> Sniffed:
    """The host_name of a complete ClientHello body (RFC 8446 4.1.2, RFC 6066 3).

    Offsets rather than a cursor object: this runs once per TLS connection, and
    plain integer arithmetic is five times cheaper.  Every length is checked
    against its enclosing structure before it is followed.
    """
    end = len(body)
    p = 34  # legacy_version, random
    if p + 1 > end:
        return Verdict.NONE
    p += 1 + body[p]  # legacy_session_id
    if p + 2 > end:
        return Verdict.NONE
    p += 2 + _U16(body, p)[0]  # cipher_suites
    if p + 1 > end:
        return Verdict.NONE
    p += 1 + body[p]  # legacy_compression_methods
    if p + 2 > end:
        return Verdict.NONE  # no extensions (or a truncated length)
    ext_end = p + 2 + _U16(body, p)[0]
    p += 2
    if ext_end > end:
        return Verdict.NONE
    while p + 4 <= ext_end:
        kind, size = _U16_U16(body, p)
        p += 4
        if p + size > ext_end:
            return Verdict.NONE
        if kind == _SERVER_NAME:
            return _server_name(body, p, p + size)
        p += size
    return Verdict.NONE


def _server_name(body: bytes, p: int, end: int) -> Sniffed:
    """The first host_name entry of a server_name extension's ServerNameList."""
    if p + 2 > end:
        return Verdict.NONE
    list_end = p + 2 + _U16(body, p)[0]
    p += 2
    if list_end > end:
        return Verdict.NONE
    while p + 3 <= list_end:
        name_type = body[p]
        size = _U16(body, p + 1)[0]
        p += 3
        if p + size > list_end:
            return Verdict.NONE
        if name_type == _HOST_NAME:
            return wire_host_name(body[p:p + size]) or Verdict.NONE
        p += size
    return Verdict.NONE


# --- HTTP ------------------------------------------------------------------------------------


def http_host(data: bytes) -> Sniffed:
    """Host header of the HTTP/1.x request that `data` starts with.

    Decided at the first Host line (later ones cannot change the answer), or
    NONE at the end of the header without one, or at the first byte that
    cannot belong to a request line.
    """
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
            return Verdict.NONE  # end of the header, no Host
        name, colon, value = line.partition(b":")
        if colon and name.lower() == b"host":
            return _host_value(value)
        pos = end + 1


def _chomp(line: bytes) -> bytes:
    return line[:-1] if line.endswith(b"\r") else line


def _host_value(value: bytes) -> Sniffed:
    """`name[:port]` from a Host header; a bracketed IPv6 literal is no name."""
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
    """The name in the first bytes of a connection: TLS first (its first byte is 0x16), else HTTP."""
    if not data:
        return Verdict.MORE
    if data[0] == _HANDSHAKE:
        return tls_server_name(data)
    return http_host(data)


# --- reading ------------------------------------------------------------------------------------


class FirstBytes(enum.Enum):
    """How reading a connection's first bytes ended."""

    NAMED = "named"  # a valid name was found
    NAMELESS = "nameless"  # bytes came, but no usable name in them (or not within the limits)
    SILENT = "silent"  # nothing within the deadline: a server-first protocol, most likely
    CLOSED = "closed"  # the client finished sending before a name was decided


class Read(NamedTuple):
    state: FirstBytes
    data: bytes  # everything consumed from the client: it goes upstream first
    name: str | None


class _SniffDeadline(Exception):
    pass


def read_first(client: nio.Stream, timeout: float, limit: int = MAX_SNIFF) -> Read:
    """Read from a non-blocking client socket until a name is decided, `limit` bytes
    were read, the client half-closes, or `timeout` passes.  OSError (a reset) propagates.

    A client usually sends its request with its handshake's last ACK, before the
    worker accepts: what is already there is read first, without arming the timer.
    """
    try:
        buf = client.sock.recv(limit)
    except BlockingIOError:
        buf = b""
    else:
        done = _decided(buf, limit)
        if done is not None:
            return done
    try:
        with Deadline(timeout, _SniffDeadline):
            while True:
                chunk = client.recv_reply(limit - len(buf))  # what was there is read: wait first
                if not chunk:
                    return Read(FirstBytes.CLOSED, buf, None)
                buf += chunk
                done = _decided(buf, limit)
                if done is not None:
                    return done
    except _SniffDeadline:
        return Read(FirstBytes.NAMELESS if buf else FirstBytes.SILENT, buf, None)


def _decided(buf: bytes, limit: int) -> Read | None:
    """What the first bytes say, or None while more may still name the destination."""
    if not buf:
        return Read(FirstBytes.CLOSED, buf, None)
    verdict = sniff(buf)
    if isinstance(verdict, str):
        return Read(FirstBytes.NAMED, buf, verdict)
    if verdict is Verdict.NONE or len(buf) >= limit:
        return Read(FirstBytes.NAMELESS, buf, None)
    return None


class SilentDestinations:
    """Destinations whose clients stayed silent on a sniffed port, remembered for `ttl`
    seconds, at most `size` of them (the oldest is forgotten first)."""

    def __init__(self, size: int = SILENT_ENTRIES, ttl: float = SILENT_TTL) -> None:
        self.size = size
        self.ttl = ttl
        self._since: OrderedDict[Endpoint, float] = OrderedDict()

    def __contains__(self, dest: Endpoint) -> bool:
        since = self._since.get(dest)
        if since is None:
            return False
        if time.monotonic() - since > self.ttl:
            del self._since[dest]
            return False
        return True

    def __len__(self) -> int:
        return len(self._since)

    def add(self, dest: Endpoint) -> None:
        self._since[dest] = time.monotonic()
        self._since.move_to_end(dest)
        while len(self._since) > self.size:
            self._since.popitem(last=False)


class Sniffer:
    """The handler's sniffing step for one configuration: which ports, how long, what to skip."""

    def __init__(self, ports: frozenset[int], timeout: float, silent: SilentDestinations | None = None) -> None:
        self.ports = ports
        self.timeout = timeout
        self.silent = silent if silent is not None else SilentDestinations()

    def read(self, client: nio.Stream, dest: Endpoint) -> Read:
        """Read the client's first bytes unless `dest` is known to be server-first."""
        if dest in self.silent:
            return Read(FirstBytes.SILENT, b"", None)
        result = read_first(client, self.timeout)
        if result.state is FirstBytes.SILENT:
            self.silent.add(dest)
            log.info("sniff: client silent for %gs to %s (server speaks first?); not waiting for it again for %gs",
                     self.timeout, dest, self.silent.ttl)
        return result
