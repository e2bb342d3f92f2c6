"""SOCKS5 dialer (RFC 1928) with username/password authentication (RFC 1929)."""

from __future__ import annotations

from ...core import outcome
from ...core.config import AUTO
from ...core.netutil import Endpoint
from ...wire import ProtocolError
from ...wire.socks5 import (
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
from .dial import Handshake

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

    def handshake(self, dest: Endpoint, wire: bytes | None = None, claim: Claim | None = None) -> Handshake:
        pipelined = self.pipelines
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
        self.names = method in (NAMED, NAMED_USERPASS)
        if self.pipelining == AUTO and method in (PIPELINED, NAMED, NO_AUTH):
            self.pipelines = method != NO_AUTH  # NO_AUTH: not (or no longer) a server that reads ahead
        if method in (USERPASS, NAMED_USERPASS):
            _nothing_before(buf, "login")
            buf = yield from at_least(buf, 2, "login status", userpass_request(self.url.username, self.url.password or ""))
            status, buf = buf[1], buf[2:]
            if status != 0:
                raise UpstreamError(outcome.AUTH_FAILED, f"socks5 user/pass rejected for {self.url.username!r} (status {status:#04x})")
        return buf


def _nothing_before(buf: bytes, what: str) -> None:
    """A server answers what it was sent: bytes ahead of our next message are a broken server's."""
    if buf:
        raise ProtocolError(f"socks5 server sent {len(buf)} bytes before our {what}")
