"""SOCKS5 UDP ASSOCIATE client (RFC 1928 section 7): the control connection and the relay's address.

Why a separate client and not a Dialer scheme: an association is not a
tunnel.  Its TCP connection carries nothing after the reply; it only lives
as long as the association does (its EOF ends it), and the datagrams go to
the relay address the reply names.  The greeting and login are the SOCKS5
dialer's own (`Socks5Dialer._login`), so a member's credentials and methods
are handled in one place; the request is never pipelined (a server that
reads ahead is rare, and an association is opened once per UDP session).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING

from ...core import nio, outcome
from ...core.netutil import Endpoint, close_quietly, sockaddr_endpoint
from ...wire import ProtocolError
from ...wire.socks5 import ATYP_DOMAIN, parse_reply, udp_associate_request
from .base import UpstreamError, receive
from .dial import Handshake
from .socks5 import Socks5Dialer, _nothing_before, check_reply

if TYPE_CHECKING:
    from ..exits.member import Member

ANY = Endpoint("0.0.0.0", 0)
"""`source` when the sending address is not known yet: the server takes the control peer's."""


class AssociateTimeout(Exception):
    """The whole association (connect, login, request) took longer than its timeout."""


class Association:
    """One open UDP association on a member.

    `control` is the TCP socket (non-blocking; readable at EOF, which ends the
    association), `relay` the endpoint to send datagrams to, `member` the
    member it was opened on.
    """

    __slots__ = ("control", "member", "relay")

    def __init__(self, control: socket.socket, relay: Endpoint, member: Member) -> None:
        self.control = control
        self.relay = relay
        self.member = member

    def close(self) -> None:
        """End the association: closing the control connection tells the server."""
        close_quietly(self.control)

    def __repr__(self) -> str:
        return f"<Association {self.member} relay={self.relay}>"


def associate(member: Member, timeout: float, source: Endpoint = ANY) -> Association:
    """Open a UDP association on `member` (a SOCKS5 member), waiting in this greenlet.

    `source` is the address the datagrams will come from (RFC 1928: 0.0.0.0:0
    when unknown).  `timeout` bounds the connect, greeting, login and request
    together.  Raises an `UpstreamError` (or ProtocolError) with an outcome:
    a member that is not SOCKS5 is UPSTREAM_REFUSED; a refusal, reply code
    07 (UDP not served) included, says why in its message.
    """
    dialer = member.dialer
    if not isinstance(dialer, Socks5Dialer):
        raise UpstreamError(outcome.UPSTREAM_REFUSED, f"{member} is not a SOCKS5 member: no UDP ASSOCIATE",
                            member_fault=True)
    bound: list[Endpoint] = []
    shake = _handshake(dialer, source, bound)
    addrs = dialer.target_addrs(None)
    deadline = nio.Deadline(timeout or None, AssociateTimeout)
    try:
        stream = dialer._wait(addrs, shake)
    except AssociateTimeout:
        raise UpstreamError(outcome.UPSTREAM_TIMEOUT,
                            f"udp associate on {member} timed out after {timeout:g}s") from None
    finally:
        deadline.close()
    control = stream.sock
    if stream.watcher is not None:
        stream.watcher.close()
    try:
        relay = relay_endpoint(bound[0], control)
    except BaseException:
        control.close()
        raise
    return Association(control, relay, member)


def relay_endpoint(bound: Endpoint, control: socket.socket) -> Endpoint:
    """Where datagrams go: BND.ADDR, or the proxy's address we reached when it is 0.0.0.0 or ::."""
    if ipaddress.ip_address(bound.host).is_unspecified:
        return Endpoint(sockaddr_endpoint(control.getpeername()).host, bound.port)
    return bound


def _handshake(dialer: Socks5Dialer, source: Endpoint, bound: list[Endpoint]) -> Handshake:
    """Greeting and login (the dialer's), the ASSOCIATE request, its reply, whose
    BND.ADDR/PORT is appended to `bound` (a handshake returns bytes by contract)."""
    buf = yield from dialer._login(b"")
    _nothing_before(buf, "request")
    buf = yield from receive(buf, "udp associate reply", udp_associate_request(source))
    while (parsed := parse_reply(buf)) is None:
        chunk = yield b""
        if not chunk:
            if len(buf) >= 2:
                check_reply(buf[1])
            raise EOFError(f"connection closed after {len(buf)} bytes of the udp associate reply")
        buf += chunk
    rep, relay, end = parsed
    check_reply(rep)
    if buf[end:]:
        raise ProtocolError(f"socks5 server sent {len(buf) - end} bytes after its udp associate reply")
    if buf[3] == ATYP_DOMAIN or relay.port == 0:
        raise ProtocolError(f"socks5 udp associate reply names no usable relay ({relay})")
    bound.append(relay)
    return b""
