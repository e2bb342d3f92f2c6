"""SOCKS5 dialer (RFC 1928) with username/password authentication (RFC 1929)."""

from __future__ import annotations

import enum

from ...core import outcome
from ...core.config import AUTO
from ...core.netutil import Endpoint
from ...wire import ProtocolError
from ...wire.socks5 import (
    ATYP_IPV4,
    ATYP_IPV6,
    CMD_CONNECT,
    NAMED,
    NAMED_USERPASS,
    NO_ACCEPTABLE,
    NO_AUTH,
    PIPELINED,
    REPLIES,
    USERPASS,
    VERSION,
    connect_request,
    encode_address,
    greeting,
    named_connect_request,
    parse_reply,
    userpass_request,
)
from .base import Claim, Dialer, ProxyURL, UpstreamError, at_least, receive
from .dial import Handshake, Steps

REPLY_OUTCOMES = {
    0x02: outcome.UPSTREAM_REFUSED,
    0x03: outcome.DEST_UNREACHABLE,
    0x04: outcome.DEST_UNREACHABLE,
    0x05: outcome.DEST_REFUSED,
    0x06: outcome.DEST_UNREACHABLE,
}


CONNECT_HEAD = bytes([VERSION, CMD_CONNECT, 0])
GENERAL_FAILURE = 0x01  # the server's own trouble: another member may do better


def check_reply(rep: int) -> None:
    if rep != 0:
        text = REPLIES.get(rep, "unassigned reply code")
        raise UpstreamError(REPLY_OUTCOMES.get(rep, outcome.UPSTREAM_REFUSED), f"socks5 reply {rep:02x}: {text}",
                            member_fault=True if rep == GENERAL_FAILURE else None)


class Socks5Dialer(Dialer):
    """CONNECT through a SOCKS5 proxy, each reply taken from one receive.

    Pipelining (the request sent behind the greeting) saves a round trip
    and a wakeup; `pipelining` True always does it, False never, AUTO only
    once the member chose the PIPELINED or NAMED method, which usocksd does and
    other servers ignore (microsocks would hang on a pipelined request).
    A member that chose NAMED (or NAMED_USERPASS) gets a claimed name together
    with the original address (CMD_CONNECT_NAMED) and judges the pair itself;
    any other gets the name only when it was verified here, else the address.
    """

    def __init__(self, url: ProxyURL, *args: object, pipelining: bool | str = AUTO, **kwargs: object) -> None:
        super().__init__(url, *args, **kwargs)  # type: ignore[arg-type]
        self.pipelining = pipelining
        self.pipelines = pipelining is True and url.username is None  # what the next handshake does
        self.names = False  # whether the member takes CMD_CONNECT_NAMED, as it last said
        if url.username is not None:
            self._offered = bytes([NO_AUTH, USERPASS, NAMED_USERPASS])
        elif pipelining == AUTO:
            self._offered = bytes([NO_AUTH, PIPELINED, NAMED])
        else:
            self._offered = bytes([NO_AUTH, NAMED])
        self._greeting = greeting(self._offered)
        self._inline = frozenset(m for m in (NO_AUTH, PIPELINED, NAMED) if m in self._offered)  # see InlineConnect

    def handshake(self, dest: Endpoint, wire: bytes | None = None, claim: Claim | None = None) -> Steps:
        if self.url.username is None:
            return InlineConnect(self, dest, wire, claim, self.pipelines)
        return self._handshake(dest, wire, claim, self.pipelines)

    def _handshake(self, dest: Endpoint, wire: bytes | None, claim: Claim | None, pipelined: bool) -> Handshake:
        request = self._request(dest, wire, claim) if pipelined else b""
        buf = yield from self._login(request)
        if not pipelined:
            _nothing_before(buf, "request")
            buf = yield from receive(buf, "reply", self._request(dest, wire, claim))
        while (parsed := parse_reply(buf)) is None:
            chunk = yield b""
            if not chunk:
                if len(buf) >= 2:
                    check_reply(buf[1])  # a refusal cut short still says why
                raise EOFError(f"connection closed after {len(buf)} bytes of the reply")
            buf += chunk
        rep, _bound, end = parsed
        check_reply(rep)
        return buf[end:]

    def _request(self, dest: Endpoint, wire: bytes | None, claim: Claim | None) -> bytes:
        """The request as far as this member is known: a claim goes with the address to a
        member that judges names; elsewhere only a verified name replaces the address."""
        if claim is not None:
            try:
                if self.names:
                    return named_connect_request(wire or encode_address(dest), claim.name)
                if claim.verified:
                    return connect_request(Endpoint(claim.name, dest.port))
            except (UnicodeError, ValueError):
                pass  # a name no request can carry: the address alone
        return CONNECT_HEAD + wire if wire else connect_request(dest)

    def greet(self) -> Handshake:
        yield from self._login(b"")
        return b""

    def _login(self, pipelined: bytes) -> Handshake:
        """Greeting (with a pipelined request behind it) and, when asked, user/pass;
        returns what arrived behind the answers."""
        buf = yield from at_least(b"", 2, "method selection", self._greeting + pipelined)
        ver, method, buf = buf[0], buf[1], buf[2:]
        if ver != VERSION:
            raise ProtocolError(f"socks5 bad version {ver:#04x} in method selection")
        if method == NO_ACCEPTABLE:
            raise UpstreamError(outcome.AUTH_FAILED, "socks5 server accepted none of our auth methods")
        if method not in self._offered:
            raise ProtocolError(f"socks5 server chose method {method:#04x} we did not offer")
        self._chose(method)
        if method in (USERPASS, NAMED_USERPASS):
            _nothing_before(buf, "login")
            buf = yield from at_least(buf, 2, "login status", userpass_request(self.url.username, self.url.password or ""))
            status, buf = buf[1], buf[2:]
            if status != 0:
                raise UpstreamError(outcome.AUTH_FAILED, f"socks5 user/pass rejected for {self.url.username!r} (status {status:#04x})")
        return buf

    def _chose(self, method: int) -> None:
        """What the member's choice of method teaches about it, for the next handshakes."""
        self.names = method in (NAMED, NAMED_USERPASS)
        if self.pipelining == AUTO and method in (PIPELINED, NAMED, NO_AUTH):
            self.pipelines = method != NO_AUTH  # NO_AUTH: not (or no longer) a server that reads ahead


# The reply's length by address type, past its first four bytes (VER REP RSV ATYP).
_ADDRESS_LENGTHS = {ATYP_IPV4: 4 + 2, ATYP_IPV6: 16 + 2}


class Stage(enum.Enum):
    """Where an `InlineConnect` is: which answer it waits for."""

    METHOD = 0  # the method reply to the greeting alone (the request follows it)
    REPLY = 1  # the CONNECT reply, the method reply already taken
    BOTH = 2  # the method reply and the CONNECT reply to a pipelined greeting + request


# Bound once: in CPython 3.11 each `Stage.X` is a descriptor call (~0.2 us, several a handshake).
METHOD, REPLY, BOTH = Stage.METHOD, Stage.REPLY, Stage.BOTH


class InlineConnect:
    """The handshake with a member that needs no login, its replies checked inline as
    they arrive: greeting and request as one message built once when the member
    pipelines, else the greeting, then the request once the method reply allows it.
    It is driven like the generator handshake (`next`, `send`, `close`), so `Dial` has
    one way to run both: the generator costs ~2.6 us a handshake in frames and
    `yield from` chains, this object and its checks ~1.4 us.  Anything but a plain
    success (an error reply, another method, bytes ahead of the request, a short read
    at EOF) is handed, with every byte received so far, to the generator, which says
    what is wrong exactly as before.
    """

    __slots__ = ("buf", "claim", "dest", "dialer", "method", "request", "slow", "stage", "wire")

    def __init__(self, dialer: Socks5Dialer, dest: Endpoint, wire: bytes | None, claim: Claim | None,
                 pipelined: bool) -> None:
        self.dialer = dialer
        self.dest = dest
        self.wire = wire
        self.claim = claim
        if pipelined:
            self.stage = BOTH
            self.request = dialer._greeting + dialer._request(dest, wire, claim)
        else:
            self.stage = METHOD
            self.request = dialer._greeting
        self.buf = b""
        self.method = 0  # the method the member chose, once its reply came alone
        self.slow: Handshake | None = None

    def __iter__(self) -> InlineConnect:
        return self

    def __next__(self) -> bytes:
        return self.request

    def send(self, chunk: bytes) -> bytes:
        if self.slow is not None:
            return self.slow.send(chunk)
        buf = self.buf + chunk if self.buf else chunk
        if not chunk:
            return self._hand_over(buf, eof=True)
        n = len(buf)
        stage = self.stage
        # The usual success is decided here, and at the first byte that differs from it
        # the generator takes over.
        if stage is BOTH:  # VER METHOD, then VER REP RSV ATYP ADDR PORT
            if not (buf[0] == VERSION and (n < 2 or buf[1] in self.dialer._inline) and (n < 3 or buf[2] == VERSION)
                    and (n < 4 or buf[3] == 0) and (n < 6 or buf[5] in _ADDRESS_LENGTHS)):
                return self._hand_over(buf)
            if n < 6 or n < (end := 6 + _ADDRESS_LENGTHS[buf[5]]):
                self.buf = buf
                return b""
            self.dialer._chose(buf[1])
        elif stage is REPLY:  # VER REP RSV ATYP ADDR PORT
            if not (buf[0] == VERSION and (n < 2 or buf[1] == 0) and (n < 4 or buf[3] in _ADDRESS_LENGTHS)):
                return self._hand_over(buf)
            if n < 4 or n < (end := 4 + _ADDRESS_LENGTHS[buf[3]]):
                self.buf = buf
                return b""
        else:  # VER METHOD alone, and nothing behind it before our request
            if buf[0] != VERSION or n > 2 or (n == 2 and buf[1] not in self.dialer._inline):
                return self._hand_over(buf)
            if n < 2:
                self.buf = buf
                return b""
            self.method = buf[1]
            self.dialer._chose(self.method)
            self.buf = b""
            self.stage = REPLY
            self.request = self.dialer._request(self.dest, self.wire, self.claim)
            return self.request
        self.buf = b""
        raise StopIteration(buf[end:])

    def _hand_over(self, buf: bytes, eof: bool = False) -> bytes:
        """Let the generator take it from here, brought to where this object is (the messages
        it sent, the method reply it took) and fed what came since (and EOF)."""
        self.buf = b""
        stage = self.stage
        slow = self.slow = self.dialer._handshake(self.dest, self.wire, self.claim, stage is BOTH)
        next(slow)  # the greeting, already sent
        if stage is REPLY:
            slow.send(bytes([VERSION, self.method]))  # answered by the request, already sent
        out = slow.send(buf) if buf else b""
        if eof:
            out = slow.send(b"")
        return out

    def close(self) -> None:
        if self.slow is not None:
            self.slow.close()


PipelinedConnect = InlineConnect  # its name while only members that pipeline had it (tests import it)


def _nothing_before(buf: bytes, what: str) -> None:
    """A server answers what it was sent: bytes ahead of our next message are a broken server's."""
    if buf:
        raise ProtocolError(f"socks5 server sent {len(buf)} bytes before our {what}")
