"""The failover of one opening: members tried in balance order within one budget, on callbacks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from gevent.hub import get_hub

from ...core import outcome
from ...core.netutil import Endpoint
from ...core.nio import ResourceExhausted, Stream
from ..upstream import UpstreamError
from ..upstream.base import Claim, at_member
from ..upstream.dial import Dial
from .config import CLAIMING_SCHEME, NAMED_SCHEMES
from .member import Member

if TYPE_CHECKING:
    from ..flow import Flow
    from .balance import Pool


class Opening:
    """One connection's way through its pool, on callbacks.

    Members are tried in balance order within connect_timeout +
    handshake_timeout in all (a single try is bounded by its dial's own
    timer); a failure at a member moves on, the destination's own answer
    (refused, unreachable) from a member that works ends it.  `conn.member`
    and `conn.tries` say who was tried; at the end `error` is None and
    `stream()` is the tunnel, or `error` says why there is none.
    """

    __slots__ = (
        "conn",
        "context",
        "current",
        "dest",
        "error",
        "last",
        "left",
        "claim",
        "named",
        "on_done",
        "pool",
        "timer",
        "tunnel",
    )

    def __init__(self, pool: Pool, conn: Flow, on_done: Callable[..., None], context: Any = None) -> None:
        assert conn.dest is not None
        self.context = context
        self.pool = pool
        self.conn = conn
        self.on_done = on_done
        self.dest = conn.dest
        self.named = Endpoint(conn.name, conn.dest.port) if pool.send_domain and conn.name else conn.dest
        # The client's name and whether it was checked here, for members that judge names themselves.
        self.claim = Claim(conn.claimed, conn.name is not None) if pool.send_domain and conn.claimed else None
        self.left: Iterator[Member] = iter(())
        self.current: Dial | None = None
        self.tunnel: Dial | None = None
        self.timer: Any = None
        self.last: BaseException | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        pool = self.pool
        proto = self.conn.proto
        candidates = pool.candidates(self.dest, proto)
        if not candidates:
            self._end(UpstreamError(outcome.UPSTREAM_UNREACHABLE, pool.lacks(proto)))
            return
        if pool.budget and len(candidates) > 1:
            self.timer = get_hub().loop.timer(pool.budget)
            self.timer.start(self._out_of_time, update=True)
        self.left = iter(candidates)
        self._next()

    @property
    def done(self) -> bool:
        return self.error is not None or self.tunnel is not None

    def stream(self) -> Stream:
        """The tunnel (after a success), or the failure raised."""
        if self.error is not None:
            raise self.error
        assert self.tunnel is not None
        return self.tunnel.stream()

    def abort(self, detail: str, name: str = outcome.SHUTDOWN) -> None:
        """Give up now (a worker stopping): on_done sees outcome `name`."""
        if not self.done:
            self._end(outcome.Failure(name, detail))

    def _next(self) -> None:
        m = next(self.left, None)
        if m is None:
            assert self.last is not None
            self._end(self.last)
            return
        conn = self.conn
        conn.member = m
        conn.tries += 1
        m.dials += 1
        scheme = m.dialer.url.scheme
        if self.claim is not None and scheme == CLAIMING_SCHEME:
            d = m.dialer.begin(self.dest, conn.wire, self._tried, self.claim)
        elif self.named is not self.dest and scheme in NAMED_SCHEMES:
            d = m.dialer.begin(self.named, None, self._tried)
        else:
            d = m.dialer.begin(self.dest, conn.wire, self._tried)
        if d.under_way:  # not already ended within begin
            self.current = d

    def _tried(self, d: Dial) -> None:
        self.current = None
        m = self.conn.member
        assert m is not None
        policy = self.pool.exits.policy
        exc = d.error
        if exc is None:
            m.record(True, policy, "", "dials")
            self.tunnel = d
            self._end(None)
            return
        if not isinstance(exc, outcome.Failure):
            self._end(exc)  # not a dial's failure (a bug): the handler logs it
            return
        if isinstance(exc, ResourceExhausted):
            # This host is out of descriptors: nothing is known of the member, and the next
            # member would fail the same way.
            self._end(exc)
            return
        if not at_member(exc):
            m.record(True, policy, "", "dials")  # the member works; the destination said no
            self._end(exc)
            return
        m.record(False, policy, str(exc), "dials")
        m.failures += 1
        self.last = exc
        self._next()

    def _out_of_time(self) -> None:
        pool = self.pool
        self._end(UpstreamError(outcome.UPSTREAM_TIMEOUT,
                                f"pool {pool.name}: no tunnel within {pool.budget:g}s ({self.conn.tries} tried)"))

    def _end(self, error: BaseException | None) -> None:
        self.error = error
        if self.current is not None:
            self.current.cancel()
            self.current = None
        if self.timer is not None:
            self.timer.close()
            self.timer = None
        self.on_done(self, self.context)
