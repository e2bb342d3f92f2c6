"""A pool's members in balance order: sticky (rendezvous hashing), round-robin, least-conn.

All of it is per worker: health, passive ejection and least-conn counts are
what this worker has seen.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...core.netutil import Endpoint
from .config import ALL, UDP_SCHEMES
from .failover import Opening
from .member import Member

if TYPE_CHECKING:
    from ..flow import Flow
    from .registry import Exits, Source


class Pool:
    """Members in balance order; `begin` fails over to the next member before the client sees anything."""

    def __init__(self, name: str, sources: list[Source], exits: Exits, balance: str = "sticky",
                 send_domain: bool = False, retries: int | str = ALL, checked: bool = True) -> None:
        self.name = name
        self.sources = sources
        self.exits = exits
        self.balance = balance
        self.send_domain = send_domain
        self.retries = retries
        self.checked = checked
        self.members: list[Member] = []
        self._turn = itertools.count()
        dial = exits.dial
        # One deadline for every try: what a single member may take, spread over the failover.
        self.budget = dial.connect_timeout + dial.handshake_timeout if dial.connect_timeout and dial.handshake_timeout else None
        self.rebuild()

    def rebuild(self) -> None:
        self.members = [m for src in self.sources for m in src.members]

    def __str__(self) -> str:
        return self.name

    def order(self, dest: Endpoint, proto: str = "tcp") -> list[Member]:
        """Every member that carries `proto`, best first for this destination."""
        members = self.members if proto == "tcp" else [m for m in self.members if m.carries(proto)]
        if len(members) < 2:
            return list(members)
        if self.balance == "sticky":
            return sorted(members, key=lambda m: _score(m.key, dest.host), reverse=True)
        start = next(self._turn) % len(members)
        rotated = members[start:] + members[:start]
        if self.balance == "least-conn":
            rotated.sort(key=lambda m: m.active)  # stable: ties keep the round-robin turn
        return rotated

    def candidates(self, dest: Endpoint, proto: str = "tcp") -> list[Member]:
        """Members to try in order: the healthy ones for `proto`; when none is, the best one
        anyway (its checks may lag behind a recovery), so a pool never refuses without trying.
        Empty when no member carries `proto` (see `lacks`)."""
        if proto == "tcp" and len(self.members) == 1:  # the usual pool: its member, up or not, as below
            return self.members[:]
        ordered = self.order(dest, proto)
        up = [m for m in ordered if m.up] if proto == "tcp" else [m for m in ordered if m.usable(proto)]
        chosen = up or ordered[:1]
        if self.retries != ALL:
            chosen = chosen[: 1 + int(self.retries)]
        return chosen

    def lacks(self, proto: str) -> str:
        """Why flows of `proto` find no member here, for their failure ("" when some member carries it)."""
        if not self.members:
            return f"pool {self.name} has no members (name not resolved?)"
        if not any(m.carries(proto) for m in self.members):
            return f"pool {self.name} has no member that carries {proto.upper()} ({_UDP_EXITS})"
        return ""

    def begin(self, conn: Flow, on_done: Callable[..., None], context: Any = None) -> Opening:
        """Start opening a tunnel for `conn` on callbacks; `on_done(opening, context)` gets
        the result (possibly before this returns)."""
        opening = Opening(self, conn, on_done, context)
        opening.start()
        return opening


_UDP_EXITS = ", ".join(f"{s}://" for s in sorted(UDP_SCHEMES))


def _score(key: bytes, host: str) -> bytes:
    """Rendezvous (highest random weight) hashing: each member's score for a destination
    depends on that pair only, so removing a member moves only the destinations it held."""
    return hashlib.blake2b(key + b"|" + host.encode(), digest_size=8).digest()
