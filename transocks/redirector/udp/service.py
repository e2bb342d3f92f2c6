"""UDP through TPROXY: a worker's datagram relay (the runtime's DatagramService).

Each datagram read from this slot's socket belongs to a flow (client
address and port, original destination).  A new flow is routed like a TCP
connection (a Flow with proto "udp"), gets the member its pool's balance
chooses (sticky by destination) and an association of its own there
(`upstream.associate`), or a plain socket for `direct`, or nothing for
`reject`.  Each datagram goes up with the SOCKS5 header of its original
destination; each answer goes back to the client from that destination's
address and port through a transparent reply socket (`replies`).

Everything after the opening runs on event-loop callbacks: a watcher on the
slot's socket, one on each session's relay socket and one on its
association's control connection (its EOF ends the session).  Opening an
association waits for a TCP handshake, so it runs in a greenlet of its own;
datagrams that come meanwhile wait in a short queue.  A sweep once a second
(or sooner for short timeouts) ends the sessions idle past their timeout.

Reloads and upgrades: the master keeps each slot's socket, so the kernel's
SO_REUSEPORT hash keeps sending a flow to the same slot; the new generation's
worker in that slot reads it from then on.  A retiring worker stops reading
and closes its copy at once (`stop`), keeps its sessions, and exits when the
last is idle (or at graceful_timeout): answers to what it sent still reach
the clients, from the same source address, while a live flow's next datagram
opens a new session in the new worker.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.hub import get_hub

from ...core import logs, nio, outcome
from ...core.netutil import Endpoint, close_quietly, sockaddr_endpoint
from ...core.outcome import Failure
from ...runtime.metrics import ConnectionStats
from ...wire import ProtocolError
from ...wire.socks5 import encode_address, parse_udp_datagram, udp_datagram
from ..exits.config import REJECT
from ..flow import Flow
from ..handler import LoopGuard
from ..route import Router
from ..upstream.associate import ANY, associate
from ..upstream.base import at_member
from ..upstream.direct import DirectDialer, RejectDialer
from .kernel import CMSG_SPACE, MAX_DATAGRAM, original_destination, peer_socket
from .replies import ReplySockets
from .session import OPENING_QUEUE, Session, State, Table

log = logging.getLogger("transocks")

BURST = 64  # datagrams read per wake-up from one socket, so one busy flow cannot starve the loop
DNS_PORT = 53
FAILED_HOLD = 5.0
"""Seconds a flow whose opening failed drops its datagrams before the next one tries again: long
enough not to dial a member that is down for every datagram, short enough that a flow that never
goes quiet (a VPN's keepalives) is not cut off for good."""


@dataclass(frozen=True)
class UdpSettings:
    idle_timeout: float = 60.0  # port 53: half of it
    max_sessions: int = 4096
    associate_timeout: float = 10.0


class UdpService:
    """The UDP sessions of one worker, on its slot's sockets."""

    def __init__(self, sockets: list[socket.socket], router: Router, settings: UdpSettings,
                 counters: ConnectionStats, guard: LoopGuard | None = None) -> None:
        self.sockets = list(sockets)
        self.router = router
        self.settings = settings
        self.counters = counters
        self.guard = guard
        self.table = Table(settings.max_sessions)
        self.replies = ReplySockets()
        self.loop = get_hub().loop
        self.buf = bytearray(MAX_DATAGRAM)
        self.view = memoryview(self.buf)
        self.next_id = 0
        self.prefix = f"{os.getpid():x}.u"
        self.on_idle: Callable[[], None] | None = None
        self.stopping = False
        self._access = logging.getLogger(logs.ACCESS_LOGGER)
        self._warned: set[str] = set()
        counters.declare("counter", "udp_sessions", ("outcome",), "UDP sessions that ended, by outcome")
        counters.declare("counter", "udp_datagrams", ("direction",),
                         "UDP datagrams (counted when a session ends): sent is client to destination, received the "
                         "other way, dropped neither (rejected, failed, queue full, not from the destination)")
        counters.declare("counter", "udp_bytes", ("direction",), "UDP payload bytes (counted when a session ends)")
        self.readers = []
        for sock in self.sockets:
            port = sock.getsockname()[1]
            w = self.loop.io(sock.fileno(), nio.READ)
            w.start(self._on_readable, sock, port)
            self.readers.append(w)
        interval = max(0.05, min(1.0, self.shortest / 4))
        self.sweeper = self.loop.timer(interval, interval)
        self.sweeper.start(self._sweep)

    @property
    def shortest(self) -> float:
        """The shortest time any session may stay idle: the sweep looks no further."""
        return min(self.settings.idle_timeout / 2, FAILED_HOLD)

    # --- the runtime's DatagramService ------------------------------------------------

    def stop(self, on_idle: Callable[[], None]) -> None:
        """Graceful stop: read no more (the slot's next worker does), keep the sessions until idle."""
        self.stopping = True
        for w in self.readers:
            w.close()
        self.readers = []
        for sock in self.sockets:
            sock.close()
        self.sockets = []
        if len(self.table):
            self.on_idle = on_idle
            log.info("udp: %d sessions left to end (idle or graceful timeout)", len(self.table))
        else:
            on_idle()

    def abort(self, detail: str) -> int:
        sessions = list(self.table)
        for s in sessions:
            self._end(s, outcome.SHUTDOWN, detail)
        return len(sessions)

    # --- from clients ---------------------------------------------------------------------

    def _on_readable(self, sock: socket.socket, port: int) -> None:
        for _ in range(BURST):
            try:
                n, anc, _flags, addr = sock.recvmsg_into([self.buf], CMSG_SPACE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno not in (errno.EINTR, errno.ECONNREFUSED):
                    self._warn_once("recv", f"udp: receive failed: {exc.strerror or exc}")
                return
            try:
                self._datagram(bytes(self.view[:n]), anc, addr, port)
            except Exception:  # a callback must not raise into libev
                log.exception("udp: handling a datagram failed")

    def _datagram(self, payload: bytes, anc: list, addr: tuple, port: int) -> None:
        dest = original_destination(anc)
        if dest is None:
            return
        client = sockaddr_endpoint(addr)
        s = self.table.get((client, dest))
        now = self.loop.now()
        if s is None:
            if self.guard is not None and self.guard.is_loop(dest):
                self._warn_once("loop", f"udp: datagrams from {client} to {dest}, this daemon's own address, dropped")
                return
            s = self._open(client, dest, port, now)
        elif s.state is not State.FAILED:  # a failed one ends FAILED_HOLD after it began, busy or not
            self.table.touch(s, now)
        if s.state is State.OPEN:
            self._send_up(s, payload)
        elif s.state is State.OPENING and len(s.queue) < OPENING_QUEUE:
            s.queue.append(payload)
        else:
            s.dropped += 1

    def _open(self, client: Endpoint, dest: Endpoint, port: int, now: float) -> Session:
        if self.table.full():
            oldest = self.table.oldest()
            if oldest is not None:
                self._end(oldest, outcome.EVICTED, f"udp_max_sessions ({self.settings.max_sessions}) reached")
        flow = Flow(dest, client, port, proto="udp")
        self.next_id += 1
        timeout = self.settings.idle_timeout / 2 if dest.port == DNS_PORT else self.settings.idle_timeout
        s = Session(self.next_id, client, dest, flow, now, timeout)
        self.table.add(s)
        try:
            target = self.router.route(flow)
            members = [] if target == REJECT else target.candidates(dest, "udp")  # healthy for UDP first
        except Exception as exc:  # a bug, not the client's doing: the session must not stay OPENING
            log.exception("udp: routing %s failed", flow.dest)
            self._fail(s, State.FAILED, outcome.PROTOCOL_ERROR, f"routing failed: {exc}")
            return s
        if target == REJECT:
            self._fail(s, State.REJECTED, outcome.NOT_ALLOWED, f"route {flow.rule} rejects it")
            return s
        pool: Any = target
        s.pool = flow.pool = pool
        usable = [m for m in members if not isinstance(m.dialer, RejectDialer)]
        if members and isinstance(members[0].dialer, RejectDialer):
            self._fail(s, State.REJECTED, outcome.NOT_ALLOWED, f"pool {pool} rejects it")
        elif not usable:
            self._fail(s, State.FAILED, outcome.UPSTREAM_REFUSED, pool.lacks("udp") or f"pool {pool} rejects it")
        elif isinstance(usable[0].dialer, DirectDialer):
            self._connect(s, usable)  # a socket and a connect(2) that cannot block: no greenlet needed
        else:
            s.greenlet = gevent.spawn(self._connect, s, usable)
        return s

    # --- opening the upstream -------------------------------------------------------------

    def _connect(self, s: Session, members: list) -> None:
        """An association on the first member that gives one (failing over like a TCP dial when
        the member itself failed), or a direct socket; then OPEN.  In a greenlet of its own
        unless the first member is direct (which never waits: it fails over to nothing)."""
        error: tuple[str, str] = (outcome.UPSTREAM_UNREACHABLE, "no member tried")
        for i, m in enumerate(members):
            s.member = s.flow.member = m
            s.flow.tries += 1
            assoc = None
            try:
                if isinstance(m.dialer, DirectDialer):
                    up = peer_socket(s.dest)
                else:
                    assoc = associate(m, self.settings.associate_timeout, ANY)
                    try:
                        up = peer_socket(assoc.relay)
                    except BaseException:
                        assoc.close()
                        raise
            except Failure as exc:
                error = (exc.outcome, str(exc))
                if at_member(exc):
                    m.record_udp(False, s.pool.exits.policy, str(exc), "associations")  # type: ignore[union-attr]
                if at_member(exc) and i + 1 < len(members) and not isinstance(m.dialer, DirectDialer):
                    continue
                break
            except OSError as exc:
                name = outcome.RESOURCE_EXHAUSTED if exc.errno in nio.EXHAUSTION_ERRNOS else (
                    outcome.DEST_UNREACHABLE if isinstance(m.dialer, DirectDialer) else outcome.UPSTREAM_UNREACHABLE)
                error = (name, f"udp socket: {exc.strerror or exc}")
                break
            except EOFError as exc:
                error = (outcome.PROTOCOL_ERROR, str(exc))
                break
            if assoc is not None:
                m.record_udp(True, s.pool.exits.policy, "", "associations")  # type: ignore[union-attr]
            if s.state is not State.OPENING:  # ended while it opened (evicted, stopped)
                close_quietly(up)
                if assoc is not None:
                    assoc.close()
                return
            s.greenlet = None
            self._established(s, up, assoc)
            return
        s.greenlet = None
        if s.state is State.OPENING:
            self._fail(s, State.FAILED, *error)

    def _established(self, s: Session, up: socket.socket, assoc: Any) -> None:
        try:
            s.reply = self.replies.acquire(s.dest)
        except OSError as exc:
            close_quietly(up)
            if assoc is not None:
                assoc.close()
            hint = {errno.EPERM: " (the workers need CAP_NET_RAW or CAP_NET_ADMIN for IP_TRANSPARENT)",
                    errno.EACCES: " (the workers need CAP_NET_BIND_SERVICE to answer from a port below 1024)",
                    errno.EADDRINUSE: " (a local socket holds that port without SO_REUSEADDR)"}.get(exc.errno, "")
            self._warn_once(f"reply {exc.errno}", f"udp: cannot send replies from {s.dest}: {exc.strerror or exc}{hint}")
            self._fail(s, State.FAILED, outcome.RESOURCE_EXHAUSTED if exc.errno in nio.EXHAUSTION_ERRNOS
                       else outcome.PROTOCOL_ERROR, f"reply socket: {exc.strerror or exc}")
            return
        s.upstream = up
        s.association = assoc
        s.state = State.OPEN
        if assoc is not None:
            s.header = encode_address(s.dest)
            cw = self.loop.io(assoc.control.fileno(), nio.READ)
            cw.start(self._on_control, s)
            s.watchers.append(cw)
        uw = self.loop.io(up.fileno(), nio.READ)
        uw.start(self._on_upstream, s)
        s.watchers.append(uw)
        queued, s.queue = s.queue, []
        for payload in queued:
            self._send_up(s, payload)

    def _fail(self, s: Session, state: State, name: str, reason: str) -> None:
        """The session drops its datagrams until idle; said once, here."""
        s.state = state
        s.failure = (name, reason)
        if state is State.FAILED:
            s.timeout = min(s.timeout, FAILED_HOLD)
        s.dropped += len(s.queue)
        s.queue = []
        log.warning("%s udp client=%s dest=%s: %s", name, s.client, s.dest, reason)

    # --- relaying -----------------------------------------------------------------------------

    def _send_up(self, s: Session, payload: bytes) -> None:
        data = udp_datagram(s.header, payload) if s.header else payload
        try:
            s.upstream.send(data)  # type: ignore[union-attr]
        except OSError:  # a full buffer, or an ICMP error the kernel reports on the next send
            s.dropped += 1
            return
        s.dgrams_out += 1
        s.bytes_out += len(payload)

    def _on_upstream(self, s: Session) -> None:
        try:
            for _ in range(BURST):
                try:
                    n = s.upstream.recv_into(self.buf)  # type: ignore[union-attr]
                except BlockingIOError:
                    return
                except OSError:  # ICMP unreachable from the relay or the destination
                    s.dropped += 1
                    continue
                payload = self._answer(s, n)
                if payload is None:
                    s.dropped += 1
                    continue
                try:
                    s.reply.sendto(payload, s.client_addr)  # type: ignore[union-attr]
                except OSError:
                    s.dropped += 1
                    continue
                s.dgrams_in += 1
                s.bytes_in += len(payload)
                self.table.touch(s, self.loop.now())
        except Exception:
            log.exception("udp: relaying to %s failed", s.client)
            self._end(s, outcome.PROTOCOL_ERROR, "internal error")

    def _answer(self, s: Session, n: int) -> bytes | None:
        """The payload of what came back, or None to drop it: through an association only
        whole, unfragmented datagrams from the session's destination (NAT would not pass
        an answer from elsewhere either)."""
        if not s.header:
            return bytes(self.view[:n])
        try:
            frag, source, offset = parse_udp_datagram(bytes(self.view[:n]))
        except ProtocolError:
            return None
        if frag or sockaddr_endpoint(source) != s.dest:
            return None
        return bytes(self.view[offset:n])

    def _on_control(self, s: Session) -> None:
        """The association's TCP connection readable: its end ends the session (in the hub: must not raise)."""
        try:
            try:
                data = s.association.control.recv(512)  # type: ignore[union-attr]
            except BlockingIOError:
                return
            except OSError as exc:
                self._end(s, outcome.UPSTREAM_CLOSED, f"association's control connection: {exc.strerror or exc}")
                return
            if not data:
                self._end(s, outcome.UPSTREAM_CLOSED, "the member closed the association's control connection")
        except Exception:
            log.exception("udp: ending the session of %s failed", s.client)

    # --- ends ------------------------------------------------------------------------------------

    def _sweep(self) -> None:
        try:
            now = self.loop.now()
            for s in self.table.expired(now, self.shortest):
                self._end(s, *(s.failure or (outcome.OK, f"idle {s.timeout:g}s")))
        except Exception:
            log.exception("udp: sweeping idle sessions failed")

    def _end(self, s: Session, name: str, reason: str) -> None:
        """Every end of a session: sockets closed, counted, one access-log line."""
        if s.state is State.CLOSED:
            return
        s.state = State.CLOSED
        self.table.remove(s)
        if s.greenlet is not None:
            s.greenlet.kill(block=False)
            s.greenlet = None
        for w in s.watchers:
            w.close()
        s.watchers = []
        close_quietly(s.upstream)
        if s.association is not None:
            s.association.close()
        if s.reply is not None:
            self.replies.release(s.dest)
            s.reply = None
        s.dropped += len(s.queue)
        s.queue = []
        c = self.counters
        c.count("udp_sessions", (name,))
        for direction, dgrams, size in (("sent", s.dgrams_out, s.bytes_out), ("received", s.dgrams_in, s.bytes_in)):
            if dgrams:
                c.count("udp_datagrams", (direction,), dgrams)
                c.count("udp_bytes", (direction,), size)
        if s.dropped:
            c.count("udp_datagrams", ("dropped",), s.dropped)
        if not self._access.disabled:
            self._log(s, name, reason)
        if self.stopping and not len(self.table) and self.on_idle is not None:
            on_idle, self.on_idle = self.on_idle, None
            on_idle()

    def _log(self, s: Session, name: str, reason: str) -> None:
        fields: dict[str, Any] = {"id": f"{self.prefix}{s.id}", "proto": "udp", "client": str(s.client),
                                  "dest": str(s.dest), "upstream": str(s.member or "-"), "pool": str(s.pool or "-")}
        if s.flow.tries > 1:
            fields["tries"] = s.flow.tries
        fields.update(datagrams_sent=s.dgrams_out, sent=s.bytes_out, datagrams_received=s.dgrams_in,
                      received=s.bytes_in)
        if s.dropped:
            fields["datagrams_dropped"] = s.dropped
        fields.update(duration=f"{self.loop.now() - s.started:.3f}", outcome=name)
        if reason:
            fields["reason"] = reason
        logs.access(fields)

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("%s", message)
