"""One redirected connection: recover its destination, refuse loops, route, dial, relay, log."""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from functools import partial
from types import ModuleType
from typing import Any

from ..core import logs, outcome
from ..core.inflight import InFlight
from ..core.namecheck import NameCheck, Verification
from ..core.names import format_hostport, literal_ip
from ..core.netutil import (
    Endpoint,
    close_with_reset,
    keepalive_soon,
    local_addresses,
    sockaddr_endpoint,
)
from ..core.nio import Stream
from ..core.relay import Relay
from ..runtime.metrics import ConnectionStats
from . import methods
from .exits.balance import Pool
from .exits.config import REJECT
from .exits.failover import Opening
from .flow import Flow
from .limits import SourceLimits
from .methods import NotRedirected
from .route import Router
from .sniff import NameParser, Read, Sniffer

log = logging.getLogger("transocks")
_VERDICT_LABELS = {v: (v.value,) for v in Verification}  # the name_checks label of each verdict, made once
_NO_NAME = _VERDICT_LABELS[Verification.NONE]
LOCAL_ADDRESSES_TTL = 1.0  # seconds between re-reads of this host's addresses for the loop guard


class LoopGuard:
    """Says whether a destination would bring the connection back to us.

    A destination equal to one of our listen addresses (a wildcard listener
    covers every local address on its port) or to an upstream proxy, a member
    of any pool (its connection was redirected back here), is a loop.
    """

    def __init__(self, listens: Iterable[Endpoint], upstreams: Iterable[Endpoint] = ()) -> None:
        self.listening: set[tuple[str, int]] = set()
        self.any_port: set[int] = set()
        for ep in listens:
            if ipaddress.ip_address(ep.host).is_unspecified:
                self.any_port.add(ep.port)
            else:
                self.listening.add((_norm(ep.host), ep.port))
        self.local = local_addresses() if self.any_port else set()
        self.local_read = time.monotonic()
        self.set_upstreams(upstreams)

    def set_upstreams(self, upstreams: Iterable[Endpoint]) -> None:
        """The members' addresses, again whenever discovery changes them."""
        self.exact = self.listening | {(_norm(ep.host), ep.port) for ep in upstreams}
        self.ports = {port for _, port in self.exact} | self.any_port

    def is_loop(self, dest: Endpoint) -> bool:
        if dest.port not in self.ports:  # the usual case, decided without parsing the address
            return False
        host = _norm(dest.host)
        if (host, dest.port) in self.exact:
            return True
        if dest.port not in self.any_port:
            return False
        if host not in self.local and time.monotonic() - self.local_read > LOCAL_ADDRESSES_TTL:
            # Addresses come and go (DHCP, PPPoE on a router): look again, at most once a second.
            self.local = local_addresses()
            self.local_read = time.monotonic()
        return host in self.local


def _norm(host: str) -> str:
    """One spelling per endpoint host: an address unmapped, a name lower case without the trailing dot."""
    ip = literal_ip(host)
    return host.lower().removesuffix(".") if ip is None else str(ip)


class Pending:
    """A connection until its relay starts: what the handler and `_opened` need to go on
    or to let it go (its sniffed bytes and their watcher, whether a source limit admitted it)."""

    __slots__ = ("admitted", "client", "client_watch", "conn", "conn_id", "early", "started")

    def __init__(self, client: socket.socket, conn_id: int, conn: Flow, started: float) -> None:
        self.client = client
        self.conn_id = conn_id
        self.conn = conn
        self.started = started
        self.early = b""
        self.client_watch: Any = None
        self.admitted = False


class TransparentHandler:
    """Serves one accepted connection from a REDIRECT rule; once the tunnel is
    open its relay runs on callbacks (see `InFlight`)."""

    def __init__(self, router: Router, guard: LoopGuard, idle_timeout: float, half_close_timeout: float,
                 counters: ConnectionStats | None = None, method: ModuleType = methods.redirect,
                 sniffer: Sniffer | None = None, limits: SourceLimits | None = None,
                 names: NameCheck | None = None) -> None:
        self.router = router
        self.names = names  # None: verify_names = false, sniffed names are trusted as sent
        self.limits = limits  # None: no per-source limits, nothing to do per connection
        self.sniffer = sniffer or Sniffer(frozenset(), 0.0)  # no ports: sniffing off
        self.sniff_ports = self.sniffer.ports
        self.destination = method.destination
        self.guard = guard
        self.idle_timeout = idle_timeout
        self.half_close_timeout = half_close_timeout
        self.counters = counters or ConnectionStats()
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}."
        self._access = logging.getLogger(logs.ACCESS_LOGGER)
        self._texts: dict[object, str] = {}  # see _text
        self._in_flight = InFlight(self._relay_done, self.counters)
        if names is not None:
            self.counters.declare("counter", "name_checks", ("outcome",),
                                  "connections on sniff ports by what their name was: verified against the "
                                  "destination address, unverified (used as if absent), or none recovered")

    def __call__(self, client: socket.socket, peer: tuple) -> None:
        """Serve one connection in the calling greenlet: `inline`, then what it leaves; then
        stand in for the dials and relays while they run (the worker needs no such greenlet:
        it asks `inflight.busy`)."""
        rest = self.inline(client, peer)
        if rest is not None:
            rest()
        self._in_flight.stand_in()

    def inline(self, client: socket.socket, peer: tuple) -> Callable[[], None] | None:
        """What never waits, in the caller (the worker's accept callback, so that a
        connection that waits for nothing needs no greenlet): see `_open`.  Returns what
        is left for a greenlet, or None."""
        # The worker's AcceptedSocket knows its listener's port (for listen= rules); a plain socket does not.
        conn = Flow(None, sockaddr_endpoint(peer), getattr(client, "listen_port", None))
        counters = self.counters  # counted once nothing can raise before _open owns the connection
        counters.active += 1
        counters.total += 1
        return self._open(Pending(client, next(self._ids), conn, time.monotonic()), peer)

    def _open(self, p: Pending, peer: tuple) -> Callable[[], None] | None:
        """The one way a connection opens: its destination, the loop guard and source
        limits; on a sniffed port the client's first bytes and the name's check; then
        routing and the start of the dial, which goes on in callbacks (the worker sees it
        through `inflight.busy`).  The sniff and the check usually need no wait (the request
        is there at accept, the name's verdict cached); when one must wait, this returns
        `_open_sniffed` for a greenlet to go on with."""
        client, conn, conn_id, started = p.client, p.conn, p.conn_id, p.started
        handed_off = False
        try:
            try:
                conn.dest, conn.wire = self.destination(client, peer)
            except NotRedirected as exc:
                self._refuse(client, conn_id, conn, outcome.LOOP, f"not redirected: {exc.strerror}", started)
                return None
            if self.guard.is_loop(conn.dest):
                self._refuse(client, conn_id, conn, outcome.LOOP,
                             f"destination {conn.dest} is this proxy (redirect loop)", started)
                return None
            if self.limits is not None:
                refusal = self.limits.admit(conn.peer.host)  # it warns, at most once a second per source
                if refusal is not None:
                    close_with_reset(client)
                    self._finished(conn, outcome.SOURCE_LIMITED)
                    self._log(conn_id, conn, started, outcome.SOURCE_LIMITED, refusal)
                    return None
                p.admitted = True  # released when the connection ends
            if conn.dest.port in self.sniff_ports:  # other ports: no read, no delay
                first = self.sniffer.start(client, conn.dest)
                if first.__class__ is not Read or not self._judge_name(conn, first.name, wait=False):  # type: ignore[union-attr]
                    handed_off = True
                    return partial(self._open_sniffed, p, first)
                p.early = first.data  # type: ignore[union-attr]
            handed_off = self._route(p)
        except OSError as exc:
            self._reset(p, exc)  # e.g. the client reset before the tunnel was up
        finally:
            if not handed_off:
                self._drop(p)
        return None

    def _open_sniffed(self, p: Pending, first: Read | NameParser) -> None:
        """In a greenlet: the rest of `_open` on a sniffed port that waits, for more of the
        client's first bytes or for the name's lookup, then routing."""
        handed_off = False
        try:
            if first.__class__ is not Read:
                reading = Stream(p.client)
                first = self.sniffer.finish(reading, p.conn.dest, first)  # type: ignore[arg-type]
                p.client_watch = reading.detach()
            p.early = first.data  # type: ignore[union-attr]
            self._judge_name(p.conn, first.name)  # type: ignore[union-attr]
            handed_off = self._route(p)
        except OSError as exc:
            self._reset(p, exc)
        finally:
            if not handed_off:
                self._drop(p)

    def _route(self, p: Pending) -> bool:
        """Route the connection and start its dial; False when a route rejected it (the
        client is reset, the caller lets it go).  Once the dial begins, `_opened` owns it."""
        conn = p.conn
        target = self.router.route(conn)
        if target is REJECT:
            self._refuse(p.client, p.conn_id, conn, outcome.NOT_ALLOWED, f"rejected by route {conn.rule}", p.started)
            return False
        assert isinstance(target, Pool)
        conn.pool = target
        opening = target.begin(conn, self._opened, p)
        if not opening.done:
            self._in_flight.hold(opening)
        return True

    def _judge_name(self, conn: Flow, name: str | None, wait: bool = True) -> bool:
        """Keep a sniffed name as `conn.name` only when the destination address is among its
        addresses; `conn.claimed` keeps it either way, for the log and for an edge that judges
        it itself.  A verdict not cached waits for a lookup (up to name_check_timeout, this
        greenlet only); without `wait` that returns False instead, having changed nothing."""
        names = self.names
        if names is None:
            conn.name = conn.claimed = name
            return True
        if name is None:
            self.counters.count("name_checks", _NO_NAME)
            return True
        assert conn.dest is not None
        verdict = names.cached(name, conn.dest.host)
        if verdict is None:
            if self._edge_judges(conn, name):
                conn.claimed = name
                names.lookup(name)  # for this connection's log line and the next connection
                conn.name_pending = True
                return True
            if not wait:
                return False
            verdict = names.wait(name, conn.dest.host)
        conn.claimed = name
        self._verdict(conn, verdict)
        return True

    def _edge_judges(self, conn: Flow, name: str) -> bool:
        """No need to wait for the lookup: the route is the same with the name or without it,
        and it leads to a send_domain pool whose every member checks names itself (usocksd)."""
        plain = self.router.route(conn)
        conn.name = name
        named = self.router.route(conn)
        conn.name = None
        return (plain is named and isinstance(plain, Pool) and plain.send_domain and bool(plain.members)
                and all(m.dialer.names for m in plain.members))

    def _verdict(self, conn: Flow, verdict: Verification) -> None:
        self.counters.count("name_checks", _VERDICT_LABELS[verdict])
        if verdict is Verification.VERIFIED:
            conn.name = conn.claimed

    def _opened(self, opening: Opening, p: Pending) -> None:
        """The dial's end (in the hub, or within begin): relay, or refuse the client."""
        self._in_flight.settle(opening)
        conn, client = p.conn, p.client
        stream = None
        relaying = False
        try:
            if opening.error is not None:
                exc = opening.error
                if isinstance(exc, outcome.Failure):
                    self._refuse(client, p.conn_id, conn, exc.outcome, str(exc), p.started)
                else:
                    log.error("dialing for client=%s dest=%s failed", conn.peer, conn.dest, exc_info=exc)
                    self._refuse(client, p.conn_id, conn, outcome.PROTOCOL_ERROR, f"internal error: {exc!r}", p.started)
                return
            stream = opening.stream()
            keepalive_soon(stream.sock)  # the client's socket has it from the listener
            # Early bytes of either side go first; the upstream's watcher carries over.
            r = Relay(client, stream.sock, self.idle_timeout, self.half_close_timeout, p.early, stream.extra,
                      (p.client_watch, stream.detach()))
            p.client_watch = None
            r.context = (p.conn_id, conn, p.started)
            conn.member.active += 1  # type: ignore[union-attr]
            self.counters.opened(time.monotonic() - p.started)
            self._in_flight.start(r)
            relaying = True  # the relay set closes and counts from here on
        except OSError as exc:
            self._reset(p, exc)
        except Exception:
            log.exception("connection handler failed")
            self._finished(conn, outcome.RESET)
            close_with_reset(client)
        finally:
            if not relaying:
                if stream is not None:
                    stream.close()
                self._drop(p)

    def _reset(self, p: Pending, exc: OSError) -> None:
        """A socket error before the relay: the client is reset and the line says why."""
        self._finished(p.conn, outcome.RESET)
        if not self._access.disabled:
            self._log(p.conn_id, p.conn, p.started, outcome.RESET, exc.strerror or str(exc))
        close_with_reset(p.client)

    def _drop(self, p: Pending) -> None:
        """Let go of a connection that never relayed: its sockets, watcher and admission."""
        if p.client_watch is not None:
            p.client_watch.close()
        self._in_flight.let_go(p.client, None)
        if p.admitted:
            self.limits.release(p.conn.peer.host)  # type: ignore[union-attr]

    def _relay_done(self, r: Relay) -> None:
        """The end of a relay (in the hub): its member's count and its access-log line."""
        conn_id, conn, started = r.context
        conn.member.active -= 1
        if self.limits is not None:
            self.limits.release(conn.peer.host)
        result = r.result
        assert result is not None
        self._finished(conn, result.outcome, result.sent, result.received)
        if not self._access.disabled:
            self._log(conn_id, conn, started, result.outcome, result.detail, result.sent, result.received)

    def _refuse(self, client: socket.socket, conn_id: int, conn: Flow, name: str, reason: str,
                started: float) -> None:
        """Reset the client so it learns the connection failed, and say why."""
        close_with_reset(client)
        self._finished(conn, name)
        self._log(conn_id, conn, started, name, reason)
        shown = f" host={conn.name}" if conn.name else f" host_unverified={conn.claimed}" if conn.claimed else ""
        log.warning("%s client=%s dest=%s%s: %s", name, conn.peer, conn.dest or "-", shown, reason)

    def _finished(self, conn: Flow, name: str, sent: int = 0, received: int = 0) -> None:
        """Every end of a connection: its outcome counted, and a name the edge was left to check
        given this worker's verdict (its own lookup has likely ended since), for the metric and the
        access log alike."""
        if conn.name_pending:
            conn.name_pending = False
            self._verdict(conn, self.names.cached(conn.claimed, conn.dest.host) or Verification.UNVERIFIED)  # type: ignore[union-attr, arg-type]
        self.counters.finished(name, sent, received)

    def _log(self, conn_id: int, conn: Flow, started: float, name: str, reason: str = "",
             sent: int = 0, received: int = 0) -> None:
        """One access-log line; built only when the access log is on (formatting is a large
        share of a short connection's cost).  As logfmt text it is one format string with
        the member's and the pool's values rendered once (`_text`); the same fields in the
        same order go as a dict to JSON or a test's sink."""
        duration = _elapsed(started)
        if logs.rendered():
            value = logs.logfmt_value
            host = (f" host={value(conn.name)}" if conn.name
                    else f" host_unverified={value(conn.claimed)}" if conn.claimed else "")
            dest = conn.dest
            # client and dest are addresses as the kernel gave them: nothing in them needs quoting
            logs.access_logfmt(
                f"id={self._prefix}{conn_id} client={format_hostport(*conn.peer)} "
                f"dest={format_hostport(*dest) if dest else '-'}{host} "
                f"upstream={self._text(conn.member)} pool={self._text(conn.pool)}"
                f"{f' tries={conn.tries}' if conn.tries > 1 else ''} sent={sent} received={received} "
                f"duration={duration} outcome={name}{f' reason={value(reason)}' if reason else ''}")
            return
        fields = {"id": f"{self._prefix}{conn_id}", "client": str(conn.peer), "dest": str(conn.dest or "-")}
        if conn.name:
            fields["host"] = conn.name
        elif conn.claimed:
            fields["host_unverified"] = conn.claimed
        fields.update(upstream=str(conn.member or "-"), pool=str(conn.pool or "-"))
        if conn.tries > 1:
            fields["tries"] = conn.tries
        fields.update(sent=sent, received=received, duration=duration, outcome=name)
        if reason:
            fields["reason"] = reason
        logs.access(fields)

    def _text(self, obj: object) -> str:
        """A member's or pool's value in the line, rendered at its first connection
        (None: "-"); forgotten wholesale when discovery has made many."""
        text = self._texts.get(obj)
        if text is None:
            if len(self._texts) >= 4096:
                self._texts.clear()
            text = self._texts[obj] = logs.logfmt_value(obj or "-")
        return text


def _elapsed(started: float) -> str:
    return f"{time.monotonic() - started:.3f}"
