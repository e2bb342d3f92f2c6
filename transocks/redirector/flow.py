"""The connection record every stage sees: transport, destination, name, rule, pool, member."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.names import ip_literal
from ..core.netutil import Endpoint

if TYPE_CHECKING:
    from .exits.balance import Pool
    from .exits.member import Member


class Flow:
    """One connection as routing and the dial see it, filled in as it goes: the handler
    sets the destination (and the name, when one was recovered and checked), the router
    the rule, the pool the member it went through and how many it tried.  `proto` is
    "tcp" for a connection, "udp" for a UDP flow (a client address and port to one
    destination): routes and pools choose by it."""

    __slots__ = ("claimed", "dest", "listen_port", "member", "name", "name_pending", "peer", "pool", "proto", "rule",
                 "tries", "wire")

    def __init__(self, dest: Endpoint | None, peer: Endpoint, listen_port: int | None = None,
                 name: str | None = None, proto: str = "tcp") -> None:
        self.proto = proto
        self.dest = dest
        self.peer = peer
        self.listen_port = listen_port  # the port of the listener it arrived on, when the worker says
        self.name = name  # the destination's name when one was recovered and verified (or trusted), else None
        self.claimed = name  # the name the client sent, verified or not (usocksd judges it with the address)
        self.name_pending = False  # sent unchecked to an edge that checks it; the log line looks again
        self.wire: bytes | None = None  # dest as SOCKS5 puts it (ATYP, address, port), from the kernel's bytes
        self.pool: Pool | None = None
        self.member: Member | None = None
        self.tries = 0
        self.rule: object | None = None

    @property
    def dest_addr(self) -> tuple[int, int]:
        """The destination address as (length in bytes, integer), for dst= rules."""
        assert self.dest is not None
        return _as_int(self.dest.host)

    @property
    def peer_addr(self) -> tuple[int, int]:
        return _as_int(self.peer.host)


def _as_int(host: str) -> tuple[int, int]:
    literal = ip_literal(host)
    if literal is None:
        raise ValueError(f"not an IP address: {host!r}")
    packed = literal[1]
    return len(packed), int.from_bytes(packed, "big")
