"""A forked gevent worker: accepts on the inherited sockets and serves connections.

The worker talks to its master over a datagram socketpair (see `heartbeat`):
"ready" once it accepts, then a heartbeat each second carrying its live
counters and what changed in its view of the upstream members.  On QUIT
(graceful) it accepts what is already queued, closes its listening sockets
and finishes its connections (and, with an app's UDP sockets, its flows: the
DatagramService stops reading and says when the last has ended); on TERM/INT
it resets every relayed connection (each with its access-log line,
outcome=shutdown) and exits at once.  It
also leaves when its master is gone.  ABRT (the master's verdict on a hung
worker) dumps every thread's Python stack to the error log first.
"""

from __future__ import annotations

import errno
import faulthandler
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event
from gevent.hub import get_hub

from ..core import inflight, logs, nio, outcome
from ..core.counters import Counters
from ..core.netutil import Endpoint, close_with_reset, configure_user_timeout
from . import capabilities, heartbeat
from . import metrics as metrics_mod
from .app import App, DatagramService
from .listeners import activate
from .proctitle import set_title

log = logging.getLogger("transocks")

_ACCEPT_ERRORS_BACKOFF = nio.EXHAUSTION_ERRNOS
_MASTER_GONE = frozenset({errno.ECONNREFUSED, errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET})
_BURST = 16
_POOL = 128  # greenlets kept parked for reuse, per worker
_CAP_POLL = 0.05
_ACCEPT_PRIORITY = -2  # libev's lowest (EV_MINPRI)
FD_CAP_HOLD = 1.0  # seconds a dial out of descriptors caps the connections at those open (see _dial_exhausted)


GC_GEN0 = 20_000  # allocations between young collections (CPython's default: 700)


def tune_gc() -> None:
    """Once a worker is set up: what start-up made (modules, configuration, the handler)
    lives as long as the worker, so it is frozen out of every collection, and young
    objects are collected after GC_GEN0 allocations instead of 700.  A connection
    allocates a few dozen container objects, nearly all freed by reference counting;
    a collection every ~20 connections walked them for nothing."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0, *gc.get_threshold()[1:])


class AcceptedSocket(socket.socket):
    """An accepted connection that knows the port of the listener it arrived on
    (`listen_port`): a TPROXY socket's own address is the original destination.
    Its `family` is the listener's, kept as it is: socket.socket's property makes
    an enum member anew at every read (4 calls; the handler reads it twice)."""

    __slots__ = ("family", "listen_port")


class Acceptor:
    """Accept loop on one listening socket, with a connection cap and EMFILE back-off."""

    def __init__(self, worker: Worker, sock: socket.socket, max_accept: int) -> None:
        self.worker = worker
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.max_accept = max_accept
        # socket.accept() converts family and type to enums on every call.
        self.family = sock.family
        self.kind = (int(sock.family), int(sock.type), sock.proto)
        loop = get_hub().loop
        # Lowest priority: the events of the same loop turn (relays ending, freeing descriptors
        # and connection slots) are handled before new connections are taken on.
        self.watcher = loop.io(sock.fileno(), 1, priority=_ACCEPT_PRIORITY)
        self.timer: Any = None
        self.cap_timer: Any = None
        self.backoff = 0.05

    def start(self) -> None:
        if not self.watcher.active and self.timer is None:
            self.watcher.start(self._on_readable)

    def stop(self) -> None:
        self.watcher.stop()
        if self.timer is not None:
            self.timer.close()
            self.timer = None

    def drain_and_close(self, limit: int) -> int:
        """Accept what is queued (at most `limit`), then close this worker's copy of the socket.

        A retiring worker does this so that a socket a reload removed is
        closed everywhere once its queue is served: while it is open its
        exact address would keep winning over a new wildcard socket.  What
        arrives between the last accept and the last close is reset by the
        kernel, never left hanging.
        """
        self.stop()
        if self.cap_timer is not None:
            self.cap_timer.close()
            self.cap_timer = None
        n = 0
        while n < limit:
            try:
                fd, peer = self.sock._accept()  # type: ignore[attr-defined]
            except OSError:
                break
            self._take(fd, peer)
            n += 1
        self.watcher.close()
        self.sock.close()
        return n

    def _on_readable(self) -> None:
        w = self.worker
        for _ in range(self.max_accept):
            if w.counters.active >= w.cap:
                w.pause_accepting()
                self._watch_cap()
                return
            try:
                fd, peer = self.sock._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_ERRORS_BACKOFF:
                    self._back_off(exc)
                elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    log.error("accept failed: %s", exc)
                return
            self._take(fd, peer)
            if not self.watcher.active:  # paused by that connection (its dial found no descriptor)
                return
            self.backoff = 0.05

    def _take(self, fd: int, peer: tuple) -> None:
        conn = AcceptedSocket(*self.kind, fileno=fd)
        conn.family = self.family
        conn.listen_port = self.port
        conn.setblocking(False)
        self.worker.spawn(conn, peer)

    def _watch_cap(self) -> None:
        """At the cap (max_connections, or what descriptors allow), look again every _CAP_POLL seconds.

        The worker resumes accepting when a connection's greenlet ends, but a
        handler may end connections from event-loop callbacks, with no
        greenlet (transocks' relays do).
        """
        if self.cap_timer is None:
            self.cap_timer = get_hub().loop.timer(_CAP_POLL, _CAP_POLL)
            self.cap_timer.start(self._check_cap)

    def _check_cap(self) -> None:
        w = self.worker
        if w.accepting or w.stopping or w.counters.active < w.cap:
            self.cap_timer.close()
            self.cap_timer = None
            if not w.accepting and not w.stopping:
                w.resume_accepting()

    def _back_off(self, exc: OSError) -> None:
        """Out of fds: stop accepting for a while instead of spinning on a readable socket."""
        self.worker.warn_exhausted(f"accept: {exc.strerror}; pausing accepts for {self.backoff:.2f}s")
        self.pause_for_backoff()

    def pause_for_backoff(self) -> None:
        if self.timer is not None or not self.worker.accepting:
            return
        self.watcher.stop()
        self.timer = get_hub().loop.timer(self.backoff)
        self.timer.start(self._resume)
        self.backoff = min(self.backoff * 2, 1.0)

    def _resume(self) -> None:
        self.timer.close()
        self.timer = None
        if self.worker.accepting:
            self.start()


class Worker:
    """Runs in the forked child; never returns (exits the process)."""

    def __init__(self, app: App, cfg: Any, slot: int, nworkers: int, gen: int, listeners: list[tuple[Endpoint, socket.socket]],
                 ctrl: socket.socket, master_pid: int, unblock: set[int] | None = None, burst: bool = False,
                 datagrams: list[tuple[Endpoint, socket.socket]] | None = None) -> None:
        self.app = app
        self.datagrams = datagrams or []  # this slot's UDP sockets, served by the app's DatagramService
        self.udp: DatagramService | None = None
        self.udp_busy = False  # stopping, with UDP flows still to end
        self.burst = burst  # no other slot accepts on these sockets
        self.unblock = unblock or set()
        self.cfg = cfg
        self.slot = slot
        self.nworkers = nworkers
        self.gen = gen
        self.listeners = listeners
        self.ctrl = ctrl
        self.master_pid = master_pid
        self.max_connections = cfg.max_connections
        self.cap = self.max_connections  # connections taken on at once now (see _dial_exhausted)
        self._fd_cap_timer: Any = None  # lifts a cap that descriptors set
        self.accepting = False
        self.stopping = False
        self.greenlets: set = set()
        self.spare: list = []  # parked greenlets for the next connections (see spawn)
        self.acceptors: list[Acceptor] = []
        self.handler: Callable[[socket.socket, tuple], None] | None = None
        self.inline: Callable[[socket.socket, tuple], Callable[[], None] | None] | None = None  # see spawn
        self.counters = Counters()  # the handler's own, once it is made
        self.exporter: metrics_mod.Exporter | None = None  # with metrics_listen: flushed at each heartbeat
        self._exhausted_warned = 0.0  # loop time of the last resource-exhaustion warning
        self._exhausted_quiet = 0  # warnings held back since then
        self.deltas = heartbeat.MemberDeltas()  # the members as the master knows them
        self._send_failed: int | None = None  # errno of the last failed send to the master, warned once

    def run(self) -> None:
        try:
            self._run()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log.exception("worker %d crashed", self.slot)
            code = 1
        else:
            code = 0
        self._flush_metrics()
        logging.shutdown()
        logs.flush()
        os._exit(code)

    def _run(self) -> None:
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        gevent.reinit()
        self._done = Event()
        gevent.signal_handler(signal.SIGTERM, self.quick_exit)
        gevent.signal_handler(signal.SIGINT, self.quick_exit)
        gevent.signal_handler(signal.SIGQUIT, self.graceful_stop)
        gevent.signal_handler(signal.SIGUSR1, self.reopen_logs)
        faulthandler.enable(error_stream(), all_threads=True)
        # The master blocked signals across fork; they run once the loop does.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.unblock)
        configure_user_timeout(getattr(self.cfg, "tcp_user_timeout", 0.0))
        nio.on_exhausted = self._dial_exhausted
        for name in {"transocks", self.app.name}:
            logging.getLogger(name).addFilter(_ExhaustionFilter(self))
        self.handler, self.counters = self.app.make_handler(self.cfg)
        self.inline = getattr(self.handler, "inline", None)
        if os.environ.get(metrics_mod.ENV) and isinstance(self.counters, metrics_mod.ConnectionStats):
            self.exporter = metrics_mod.Exporter(self.app.name, self.counters)
        if self.datagrams:
            self.udp = self.app.serve_datagrams(self.cfg, [s for _, s in self.datagrams], self.counters)  # type: ignore[attr-defined]
        keep = getattr(self.app, "worker_capabilities", None)
        kept = set(keep(self.cfg)) if keep is not None else set()
        tune_gc()
        try:
            capabilities.drop(tuple(c for c in capabilities.WORKER_DROPS if c not in kept))
        except OSError as exc:
            log.warning("worker %d: cannot drop capabilities: %s", self.slot, exc)
        # A socket shared with other slots: one accept per wake-up, or the first worker awake takes them all.
        max_accept = _BURST if self.burst else 1
        self.acceptors = [Acceptor(self, s, max_accept) for _, s in self.listeners]
        self.resume_accepting()
        for _, s in self.listeners:
            activate(s, self.cfg.backlog)
        self._send(heartbeat.READY)
        self._title()
        self._beat_timer = get_hub().loop.timer(1.0, 1.0)
        self._beat_timer.start(self._beat)
        self._done.wait()

    def spawn(self, conn: socket.socket, peer: tuple) -> None:
        """Serve an accepted connection.  A handler with an `inline` part runs it here,
        in the accept callback, and gets a greenlet only for what it leaves (what waits);
        any other handler is called in a greenlet."""
        inline = self.inline
        if inline is None:
            self._run_in_greenlet(self.handler, (conn, peer))  # type: ignore[arg-type]
            return
        try:
            rest = inline(conn, peer)
        except Exception:
            log.exception("connection handler failed")
            close_with_reset(conn)
            return
        if rest is not None:
            self._run_in_greenlet(rest, ())

    def _run_in_greenlet(self, func: Callable[..., None], args: tuple) -> None:
        """In a parked greenlet if there is one, else in a new one.

        Why a pool: on Python 3.11+ every new greenlet maps and unmaps its own
        frame stack, ~25 us, a tenth of what a short connection costs.
        """
        while self.spare:
            g = self.spare.pop()
            if not g.dead:
                self.greenlets.add(g)
                get_hub().loop.run_callback(g.switch, func, args)
                return
        g = gevent.spawn_raw(self._serve_pooled, func, args)
        self.greenlets.add(g)

    def _serve_pooled(self, func: Callable[..., None], args: tuple) -> None:
        """Serve connections until the pool is full or the worker stops."""
        hub = get_hub()
        while True:
            self._serve(func, args)
            if self.stopping or len(self.spare) >= _POOL:
                return
            self.spare.append(gevent.getcurrent())
            work = hub.switch()
            if not (isinstance(work, tuple) and len(work) == 2):  # woken by anything but spawn()
                return
            func, args = work

    def _serve(self, func: Callable[..., None], args: tuple) -> None:
        conn = args[0] if args else None  # a connection's socket, or none (a handler's stand-in)
        try:
            func(*args)
        except gevent.GreenletExit:
            if conn is not None:
                close_with_reset(conn)
        except Exception:
            log.exception("connection handler failed")
            if conn is not None:
                close_with_reset(conn)
        finally:
            self.greenlets.discard(gevent.getcurrent())
            if not self.accepting and not self.stopping and self.counters.active < self.cap:
                self.resume_accepting()
            if self.stopping:
                self._leave_if_idle()

    def _leave_if_idle(self) -> None:
        """Stopping gracefully: done once no greenlet, dial, relay or UDP flow is left."""
        if not self.greenlets and not self.udp_busy and not inflight.busy():
            inflight.on_idle = None
            self._done.set()

    def _udp_idle(self) -> None:
        """The DatagramService's last flow ended after a graceful stop."""
        self.udp_busy = False
        self._leave_if_idle()

    def _dial_exhausted(self, exc: OSError) -> None:
        """A handler found no descriptor to dial with: accept no more for a while, and
        for FD_CAP_HOLD seconds no more connections than are open without this one.

        Without that cap, each resume took the next queued client with the last
        descriptor and reset it for want of a second one, including, after many
        connections ended at once, one that came behind clients long gone whose
        relays had taken the freed descriptors a moment before theirs ended.
        With it, those wait in the queue until open connections end; once the
        cap lifts, the next dial that fails sets it again."""
        self.warn_exhausted(f"out of descriptors while dialing ({exc.strerror}); pausing accepts")
        self.cap = min(self.max_connections, max(self.counters.active - 1, 0))
        if self._fd_cap_timer is None:
            self._fd_cap_timer = get_hub().loop.timer(FD_CAP_HOLD)
        else:
            self._fd_cap_timer.stop()
        self._fd_cap_timer.start(self._lift_cap)
        for a in self.acceptors:
            a.pause_for_backoff()

    def _lift_cap(self) -> None:
        self.cap = self.max_connections

    def warn_exhausted(self, message: str) -> bool:
        """At most one resource-exhaustion warning a second; True when this one is written."""
        now = get_hub().loop.now()
        if now - self._exhausted_warned < 1.0:
            self._exhausted_quiet += 1
            return False
        more = f" ({self._exhausted_quiet} more in the last second)" if self._exhausted_quiet else ""
        self._exhausted_warned = now
        self._exhausted_quiet = 0
        log.warning("worker %d: %s%s", self.slot, message, more)
        return True

    def pause_accepting(self) -> None:
        self.accepting = False
        for a in self.acceptors:
            a.stop()

    def resume_accepting(self) -> None:
        self.accepting = True
        for a in self.acceptors:
            a.start()

    def _send(self, msg: bytes) -> bool:
        """One datagram to the master; False when it did not go.

        A full queue (the master is busy) or a transient error is no reason to
        stop: the master is gone only when it is no longer our parent or our
        socket's other end is closed."""
        try:
            self.ctrl.send(msg)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in _MASTER_GONE or os.getppid() != self.master_pid:
                self._master_gone()
            elif exc.errno != self._send_failed:
                log.warning("worker %d: cannot send %d bytes to the master: %s", self.slot, len(msg),
                            exc.strerror or exc)
            self._send_failed = exc.errno
            return False
        self._send_failed = None
        return True

    def _beat(self) -> None:
        if os.getppid() != self.master_pid:
            self._master_gone()
            return
        c = self.counters
        self._flush_metrics()
        self._send(heartbeat.beat(c.active, c.total))
        report = getattr(c, "report", None)
        if report is not None:
            for datagram, changes in self.deltas.pending(report()):
                if not self._send(datagram):
                    break  # what did not go is still a change at the next beat
                self.deltas.sent(changes)
        self._title()

    def _flush_metrics(self) -> None:
        """Each heartbeat, and before exiting: what ended since the last one still counts."""
        if self.exporter is not None:
            try:
                self.exporter.flush()
            except Exception:
                log.exception("worker %d: metrics flush failed", self.slot)

    def _title(self) -> None:
        state = " stopping" if self.stopping else ""
        set_title(f"{self.app.name}: worker {self.slot}/{self.nworkers} gen={self.gen}{state} "
                  f"conns={self.counters.active} total={self.counters.total}")

    def _master_gone(self) -> None:
        if not self.stopping:
            log.warning("worker %d: master %d is gone; stopping", self.slot, self.master_pid)
            self.graceful_stop()

    def reopen_logs(self) -> None:
        try:
            logs.reopen()
        except OSError as exc:
            log.error("worker %d: cannot reopen logs: %s", self.slot, exc)
        faulthandler.enable(error_stream(), all_threads=True)

    def graceful_stop(self) -> None:
        """Accept what is queued, close the listeners; finish open connections for up to graceful_timeout."""
        if self.stopping:
            return
        self.stopping = True
        self.pause_accepting()
        accepted = sum(a.drain_and_close(self.cfg.backlog) for a in self.acceptors)
        if accepted:
            log.debug("worker %d: accepted %d queued connections while stopping", self.slot, accepted)
        if self.udp is not None:
            self.udp_busy = True
            self.udp.stop(self._udp_idle)
        self._title()
        inflight.on_idle = self._leave_if_idle
        self._leave_if_idle()
        if self._done.is_set():
            return
        timeout = self.cfg.graceful_timeout
        if timeout:
            t = get_hub().loop.timer(timeout)
            t.start(self._kill_remaining)

    def _kill_remaining(self) -> None:
        if self.greenlets or inflight.busy():
            # Dials and relays run without a greenlet each: count connections.
            log.warning("worker %d: graceful timeout, resetting %d connections", self.slot, self.counters.active)
        inflight.abort_all(f"graceful timeout ({self.cfg.graceful_timeout:g}s)")
        if self.udp is not None:
            self.udp.abort(f"graceful timeout ({self.cfg.graceful_timeout:g}s)")
        for g in list(self.greenlets):
            get_hub().loop.run_callback(g.throw, gevent.GreenletExit)
        self._done.set()

    def quick_exit(self) -> None:
        """TERM/INT: reset every relayed connection (a FIN would make a cut
        transfer look complete), each with its access-log line; then leave."""
        try:
            n = inflight.abort_all("stopped by the daemon (TERM)")
            if self.udp is not None:
                self.udp.abort("stopped by the daemon (TERM)")
            if n:
                log.info("worker %d: reset %d relayed connections", self.slot, n)
        finally:
            self._flush_metrics()
            for h in logging.getLogger().handlers:
                h.flush()
            logs.flush()
            os._exit(0)


class _ExhaustionFilter(logging.Filter):
    """Drops the handlers' per-connection warnings for outcome resource_exhausted
    (their access-log lines stay): the worker's own warning, at most one a
    second, stands for them.  Under descriptor exhaustion every connection
    fails the same way, and a warning each would flood the error log."""

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and args and args[0] == outcome.RESOURCE_EXHAUSTED:
            return False
        return True


def error_stream() -> Any:
    """The error log's stream, where faulthandler writes a hung worker's stacks."""
    for h in logging.getLogger().handlers:
        stream = getattr(h, "stream", None)
        if stream is not None and hasattr(stream, "fileno"):
            return stream
    return sys.stderr


def boot(app: App, cfg: Any, slot: int, nworkers: int, gen: int, listeners: list[tuple[Endpoint, socket.socket]],
         ctrl: socket.socket, master_pid: int, unblock: set[int] | None = None, burst: bool = False,
         datagrams: list[tuple[Endpoint, socket.socket]] | None = None) -> None:
    """Entry point in the child right after fork (signals in `unblock` still blocked)."""
    try:
        Worker(app, cfg, slot, nworkers, gen, listeners, ctrl, master_pid, unblock, burst, datagrams).run()
    finally:
        logs.flush()
        sys.stderr.flush()
        os._exit(1)
