"""The destination's name, from what the client sends first: the TLS ClientHello's
server_name or the HTTP/1.x Host header.

Why: a REDIRECTed connection carries only an address, so an edge with name
rules (usocksd's deny_dest/allow_dest) never sees the name the client meant.
The parser (`NameParser`) is pure (chunks in, a name or a `Verdict` out), works
on each byte a bounded number of times however the bytes are chunked, and decides
as soon as the bytes allow, so a prefix that decides gives the answer the whole
stream would: splitting the bytes across TCP segments or TLS records never changes
it.  Reading is the one step with I/O (`read_now`, what is there without waiting,
then `read_more` within a deadline; `read_first` is both): it consumes at most
`MAX_SNIFF` bytes and hands them back, so they go upstream first (the relay's
`early` bytes) and none is lost, duplicated or reordered.

Server-first protocols (SMTP, FTP, IMAP, MySQL) send nothing until the server
speaks; on a sniffed port such a destination pays the deadline once and is then
remembered in `SilentDestinations` (like mihomo's skip list) and not delayed again.
The list saves only the wait: what a client has already sent is still read.
"""

from __future__ import annotations

import enum
import logging
import re
import socket
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
# A whole request line as the steps below accept it (method, one space, a target and a version
# without spaces, the version HTTP/1.x): the usual first chunk's, taken in one match.
_WHOLE_REQUEST_LINE = re.compile(rb"[A-Z_-]{1,%d} [^ \n]* HTTP/1\.[^ \n]*\n" % _MAX_METHOD)
_WHOLE_HOST_LINE = re.compile(rb"[Hh][Oo][Ss][Tt]:([^\n]*)\n")  # as the header loop takes one, usually the first


class Verdict(enum.Enum):
    """What the parsers say when they return no name."""

    MORE = "more"  # the bytes so far may still become a name: read on
    NONE = "none"  # decided: these bytes carry no usable name


Sniffed = str | Verdict


# --- parsing ----------------------------------------------------------------------------------


class Parse(enum.Enum):
    """Where a `NameParser` stands in a connection's first bytes."""

    START = "start"  # nothing yet: the first byte says TLS (0x16) or HTTP
    RECORD_HEADER = "record header"  # TLS: waiting for a record's 5-byte header
    RECORD_BODY = "record body"  # TLS: waiting for the rest of the record its header announced
    METHOD = "method"  # HTTP: the request method, up to its space
    REQUEST_LINE = "request line"  # HTTP: the rest of the request line
    HEADERS = "headers"  # HTTP: header lines, up to Host or the empty line
    DONE = "done"  # decided: `verdict` is a name or NONE


_U16 = struct.Struct("!H").unpack_from
_U16_U16 = struct.Struct("!HH").unpack_from


class NameParser:
    """The name in a connection's first bytes, parsed as they arrive: `feed` each chunk.

    Why incremental: parsing the whole buffer again on every arrival is quadratic,
    and a client chooses how its bytes arrive (a 16 KiB ClientHello as 2,730 one-byte
    TLS records, re-parsed from the start on each, cost 3.1 s of CPU; now 6 ms, see
    `bench.sniff`).  Here every byte is looked at a bounded number of times
    (`examined` counts them): a TLS record is taken only once the length its header
    announces is in, and the ClientHello is parsed once, when whole; an HTTP head is
    searched for line ends from where the last search stopped, each line split once.
    A decision depends only on the bytes, never on how they were chunked, and comes
    at the first byte that allows it (a record header or request method that cannot
    be right).  The usual first chunk holds the whole request: that path copies
    nothing (a ClientHello in one record is parsed where it lies).
    """

    __slots__ = ("_data", "_line", "_message", "_pos", "_record_end", "examined", "state", "verdict")

    def __init__(self) -> None:
        self._data: bytes | bytearray = b""  # everything fed: bytes while it came in one chunk
        self.state = _START
        self.verdict: Sniffed = _MORE
        self.examined = 0  # bytes looked at so far, for the bound on the work (tests, bench)
        self._pos = 0  # TLS: the record being read; HTTP: where the search for a line end resumes
        self._line = 0  # HTTP: where the current header line starts
        self._record_end = 0  # TLS: the end of the record being read
        self._message: bytearray | None = None  # TLS: a ClientHello spread over records, reassembled

    @property
    def data(self) -> bytes:
        """Every byte fed so far, in order."""
        data = self._data
        return data if data.__class__ is bytes else bytes(data)

    @property
    def size(self) -> int:
        return len(self._data)

    def feed(self, chunk: bytes) -> Sniffed:
        """Add `chunk`; the name, NONE, or MORE while the bytes so far do not decide."""
        data = self._data
        if not data:
            data = self._data = chunk  # the usual case, the whole request in one chunk: no copy
        else:
            if data.__class__ is bytes:
                data = self._data = bytearray(data)
            data += chunk  # type: ignore[operator]  # a bytearray, grown in place
        state = self.state
        if state is _START:
            if not data:
                return _MORE
            state = _RECORD_HEADER if data[0] == _HANDSHAKE else _METHOD
        elif state is _DONE:
            return self.verdict
        verdict = self._tls(data, state) if state is _RECORD_HEADER or state is _RECORD_BODY else self._http(data, state)
        if verdict is not _MORE:
            self.state = _DONE
            self.verdict = verdict
        return verdict

    # --- TLS ---------------------------------------------------------------------------------------

    def _tls(self, data: bytes | bytearray, state: Parse) -> Sniffed:
        """Records whole as they complete; the ClientHello once the records carry all of it.

        A ClientHello may be split across records as well as across segments;
        anything that is not a ClientHello decides NONE at the first record that shows it.
        """
        end = len(data)
        pos = self._pos
        while True:
            if state is _RECORD_HEADER:
                if end - pos < 5:  # its first two bytes may decide already
                    if (end > pos and data[pos] != _HANDSHAKE) or (end > pos + 1 and data[pos + 1] != 3):
                        return _NONE
                    self._pos, self.state = pos, state
                    return _MORE
                self.examined += 5
                if data[pos] != _HANDSHAKE or data[pos + 1] != 3:
                    return _NONE
                length = (data[pos + 3] << 8) | data[pos + 4]
                if not 0 < length <= MAX_RECORD or pos + 5 + length > MAX_SNIFF:  # could never be read whole
                    return _NONE
                self._record_end = pos + 5 + length
                state = _RECORD_BODY
            record_end = self._record_end
            if end < record_end:
                self._pos, self.state = pos, state
                return _MORE
            self.examined += record_end - pos - 5
            message = self._message
            if message is None:  # the first record
                if data[pos + 5] != _CLIENT_HELLO:
                    return _NONE
                if record_end - pos >= 9:  # the usual case: the whole hello in this one record
                    size = (data[pos + 6] << 16) | (data[pos + 7] << 8) | data[pos + 8]
                    if pos + 9 + size <= record_end:  # (then it fits MAX_SNIFF, as the record does)
                        self.examined += size
                        body = data[pos + 9:pos + 9 + size]
                        return _client_hello_name(body if body.__class__ is bytes else bytes(body))
                message = self._message = bytearray(data[pos + 5:record_end])
            else:
                message += data[pos + 5:record_end]
            if len(message) >= 4:
                size = (message[1] << 16) | (message[2] << 8) | message[3]
                if 4 + size + 5 > MAX_SNIFF:  # could never be read whole
                    return _NONE
                if len(message) >= 4 + size:
                    self.examined += size
                    return _client_hello_name(bytes(message[4:4 + size]))
            pos = record_end
            state = _RECORD_HEADER

    # --- HTTP --------------------------------------------------------------------------------------

    def _http(self, data: bytes | bytearray, state: Parse) -> Sniffed:
        """Host header of the HTTP/1.x request the bytes start with.

        Decided at the first Host line (later ones cannot change the answer), or
        NONE at the end of the header without one, or at the first byte that
        cannot belong to a request line.
        """
        end = len(data)
        pos = self._pos
        seen = 0
        if state is _METHOD and (whole := _WHOLE_REQUEST_LINE.match(data)) is not None:
            pos = seen = whole.end()  # what the two steps below decide, in one match (2.5x cheaper)
            state = _HEADERS
            self._line = pos
            if (whole := _WHOLE_HOST_LINE.match(data, pos)) is not None:
                self.examined += whole.end()
                value = whole[1]
                return _host_value(value[:-1] if value.endswith(b"\r") else value)
        if state is _METHOD:
            stop = end if end <= _MAX_METHOD else _MAX_METHOD + 1
            found = _NOT_METHOD.search(data, pos, stop)
            seen += stop - pos
            if found is None:
                if stop > _MAX_METHOD:
                    return _NONE  # a method longer than any
                self._pos, self.state = stop, state
                self.examined += seen
                return _MORE
            pos = found.start()
            if pos == 0 or data[pos] != 0x20:  # no method, or a byte no method has
                return _NONE
            pos += 1
            state = _REQUEST_LINE
        if state is _REQUEST_LINE:
            eol = data.find(b"\n", pos)
            if eol < 0:
                self._pos, self.state = end, state
                self.examined += seen + end - pos
                return _MORE
            seen += eol - pos + eol
            line = data[:eol]
            if line.endswith(b"\r"):
                line = line[:-1]
            parts = line.split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                return _NONE
            pos = start = eol + 1
            state = _HEADERS
        else:
            start = self._line
        while True:
            eol = data.find(b"\n", pos)
            if eol < 0:
                self._pos, self._line, self.state = end, start, state
                self.examined += seen + end - pos
                return _MORE
            seen += eol - pos + eol - start
            line = data[start:eol]
            if line.endswith(b"\r"):
                line = line[:-1]
            pos = start = eol + 1
            if not line:
                self.examined += seen
                return _NONE  # end of the header, no Host
            name, colon, value = line.partition(b":")
            if colon and name.lower() == b"host":
                self.examined += seen
                return _host_value(value)


_START, _RECORD_HEADER, _RECORD_BODY = Parse.START, Parse.RECORD_HEADER, Parse.RECORD_BODY
_METHOD, _REQUEST_LINE, _HEADERS, _DONE = Parse.METHOD, Parse.REQUEST_LINE, Parse.HEADERS, Parse.DONE
_MORE, _NONE = Verdict.MORE, Verdict.NONE


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


def _host_value(value: bytes | bytearray) -> Sniffed:
    """`name[:port]` from a Host header; a bracketed IPv6 literal is no name."""
    value = value.strip(b" \t")
    if value.__class__ is not bytes:  # from a head that came in several chunks
        value = bytes(value)
    if value.startswith(b"["):
        return Verdict.NONE
    host, colon, port = value.rpartition(b":")
    if colon:
        if port and not port.isdigit():
            return Verdict.NONE
        value = host
    return wire_host_name(value) or Verdict.NONE


def sniff(data: bytes) -> Sniffed:
    """The name in the first bytes of a connection, all of them at once."""
    return NameParser().feed(data)


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


def read_first(client: nio.Stream, timeout: float, limit: int = MAX_SNIFF, wait: bool = True) -> Read:
    """Read from a non-blocking client socket until a name is decided, `limit` bytes
    were read, the client half-closes, or `timeout` passes.  OSError (a reset) propagates.

    A client usually sends its request with its handshake's last ACK, before the
    worker accepts: what is already there is read first, without arming the timer
    (`read_now`).  Without `wait` that free read is all: what it brings is used,
    nothing is waited for.
    """
    started = read_now(client.sock, limit)
    if started.__class__ is Read:
        return started  # type: ignore[return-value]
    if not wait:
        return _undecided(started)  # type: ignore[arg-type]
    return read_more(client, started, timeout, limit)  # type: ignore[arg-type]


def read_now(sock: socket.socket, limit: int = MAX_SNIFF) -> Read | NameParser:
    """What the client has sent already, without waiting: the Read when it decides, else
    the parser holding it (empty when nothing was there), for `read_more`."""
    parser = NameParser()
    try:
        chunk = sock.recv(limit)
    except BlockingIOError:
        return parser
    return _decided(parser, chunk, limit) or parser


def read_more(client: nio.Stream, parser: NameParser, timeout: float, limit: int = MAX_SNIFF) -> Read:
    """`read_first` after `read_now`: wait for more (what was there is read) until it decides."""
    try:
        with Deadline(timeout, _SniffDeadline):
            while True:
                chunk = client.recv_reply(limit - parser.size)
                done = _decided(parser, chunk, limit)
                if done is not None:
                    return done
    except _SniffDeadline:
        return _undecided(parser)


def _undecided(parser: NameParser) -> Read:
    return Read(FirstBytes.NAMELESS if parser.size else FirstBytes.SILENT, parser.data, None)


def _decided(parser: NameParser, chunk: bytes, limit: int) -> Read | None:
    """What the first bytes say with `chunk`, or None while more may still name the destination."""
    if not chunk:
        return Read(FirstBytes.CLOSED, parser.data, None)
    verdict = parser.feed(chunk)
    if isinstance(verdict, str):
        return Read(FirstBytes.NAMED, parser.data, verdict)
    if verdict is Verdict.NONE or parser.size >= limit:
        return Read(FirstBytes.NAMELESS, parser.data, None)
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
        """Read the client's first bytes; for a destination known to be server-first, only
        what is already there."""
        started = self.start(client.sock, dest)
        return started if started.__class__ is Read else self.finish(client, dest, started)  # type: ignore[return-value, arg-type]

    def start(self, sock: socket.socket, dest: Endpoint) -> Read | NameParser:
        """What needs no wait: the Read when the bytes already there decide (the usual case)
        or when `dest` is known to be server-first, else the parser for `finish`.

        The skip list saves only the wait: one client that stays silent must not
        blind sniffing for everyone else's connections to the same destination.
        """
        started = read_now(sock)
        if started.__class__ is not Read and dest in self.silent:
            return _undecided(started)  # type: ignore[arg-type]
        return started

    def finish(self, client: nio.Stream, dest: Endpoint, parser: NameParser) -> Read:
        """After `start`, in a greenlet: wait for the rest, up to the timeout."""
        result = read_more(client, parser, self.timeout)
        if result.state is FirstBytes.SILENT:
            self.silent.add(dest)
            log.info("sniff: client silent for %gs to %s (server speaks first?); not waiting for it again for %gs",
                     self.timeout, dest, self.silent.ttl)
        return result
