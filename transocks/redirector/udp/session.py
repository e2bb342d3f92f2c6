"""One UDP flow (client address and port, original destination) and the bounded table of them.

A session is written as states:

    OPENING --association (or direct socket) open--> OPEN --idle, control EOF--> CLOSED
       |  \\--route says reject--> REJECTED --idle--> CLOSED
       \\--every member failed--> FAILED --FAILED_HOLD--> CLOSED

REJECTED and FAILED sessions stay in the table, so the flow's later datagrams
are dropped (and counted) without routing or dialing again: one log line per
session, not per datagram.  A REJECTED one ends when the flow is idle; a FAILED
one a few seconds after it began, so a flow that never goes quiet tries again.
Any of them may be EVICTED for a new flow at the table's limit.
"""

from __future__ import annotations

import enum
import socket
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ...core.netutil import Endpoint

if TYPE_CHECKING:
    from ..exits.balance import Pool
    from ..exits.member import Member
    from ..flow import Flow
    from ..upstream.associate import Association

Key = tuple[Endpoint, Endpoint]  # (client, original destination)

OPENING_QUEUE = 16
"""Datagrams kept while the association opens; more are dropped (DNS retries, a burst)."""


class State(enum.Enum):
    OPENING = "opening"
    OPEN = "open"
    REJECTED = "rejected"
    FAILED = "failed"
    CLOSED = "closed"


class Session:
    """A flow's upstream (an association's relay socket, or a direct socket), its counts and state."""

    __slots__ = ("association", "client", "client_addr", "dest", "dgrams_in", "dgrams_out", "dropped", "failure",
                 "flow", "greenlet", "header", "id", "last", "member", "pool", "queue", "reply", "started", "state",
                 "timeout", "bytes_in", "bytes_out", "upstream", "watchers")

    def __init__(self, sid: int, client: Endpoint, dest: Endpoint, flow: Flow, now: float, timeout: float) -> None:
        self.id = sid
        self.client = client
        self.client_addr: tuple = (client.host, client.port) if ":" not in client.host else (client.host, client.port,
                                                                                             0, 0)
        self.dest = dest
        self.flow = flow
        self.state = State.OPENING
        self.started = now
        self.last = now  # loop time of the last datagram either way
        self.timeout = timeout
        self.member: Member | None = None
        self.pool: Pool | None = None
        self.association: Association | None = None
        self.upstream: socket.socket | None = None
        self.reply: socket.socket | None = None
        self.header = b""  # the SOCKS5 UDP header of dest, when through an association
        self.watchers: list[Any] = []
        self.greenlet: Any = None  # opening the upstream
        self.queue: list[bytes] = []
        self.failure: tuple[str, str] | None = None  # (outcome, reason) once it is known
        self.dgrams_out = self.bytes_out = 0  # client -> destination, sent upstream
        self.dgrams_in = self.bytes_in = 0  # destination -> client
        self.dropped = 0

    @property
    def key(self) -> Key:
        return (self.client, self.dest)

    def __repr__(self) -> str:
        return f"<Session {self.client} -> {self.dest} {self.state.value}>"


class Table:
    """A worker's sessions by key, least recently active first (each datagram either way moves
    its session to the end), so the one to evict and the ones to expire are at the front."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sessions: OrderedDict[Key, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self.sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self.sessions.values()))

    def get(self, key: Key) -> Session | None:
        return self.sessions.get(key)

    def add(self, s: Session) -> None:
        self.sessions[s.key] = s

    def touch(self, s: Session, now: float) -> None:
        s.last = now
        try:
            self.sessions.move_to_end(s.key)
        except KeyError:
            pass  # already ended

    def remove(self, s: Session) -> None:
        if self.sessions.get(s.key) is s:
            del self.sessions[s.key]

    def full(self) -> bool:
        return len(self.sessions) >= self.limit

    def oldest(self) -> Session | None:
        """The session idle longest."""
        for s in self.sessions.values():
            return s
        return None

    def expired(self, now: float, shortest: float) -> list[Session]:
        """Sessions idle past their own timeout; the walk stops at the first one that has not
        been idle even `shortest` (the smallest timeout any session has)."""
        out = []
        for s in self.sessions.values():
            idle = now - s.last
            if idle < shortest:
                break
            if idle >= s.timeout:
                out.append(s)
        return out
