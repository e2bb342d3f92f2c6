"""Copy bytes both ways between two sockets, driven by event-loop callbacks.

Why callbacks: the bytes are moved inside libev watcher callbacks, in the
hub, so a request/response exchange costs two callbacks instead of two
greenlet switches with watcher start/stop around each.  `relay()` keeps its
blocking signature (its greenlet just waits for the end); `Relay.start()`
needs no greenlet at all, which is what lets an idle connection cost a couple
of KiB: a parked greenlet alone is ~7 KiB (its frame-stack page and C stack).
One watcher per socket, re-armed only when a direction stalls or ends.

Why no per-connection buffer: small reads go into one buffer shared by the
worker thread and are written out before the callback returns; only bytes
the receiver cannot take yet are copied and kept.  Bulk transfers (a read
that fills the buffer) switch that direction to splice(2) through a kernel
pipe, so the bytes never enter user space; the pipe is taken from a pool and
given back as soon as it is empty, so only connections with bytes in flight
hold one (an idle connection holds no pipe, only its two sockets).  When no
pipe can be had (EMFILE, ENFILE), a bulk transfer goes on by copying.

Half-close: EOF from one side becomes shutdown(SHUT_WR) on the other while the
other direction keeps flowing.  A reset on either side is passed on as a reset
(SO_LINGER 0), so a truncated transfer never looks like a clean end.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gevent.hub import Waiter, get_hub

from . import outcome
from .netutil import close_with_reset

log = logging.getLogger("transocks")

_READ = 1
_WRITE = 2
BUFFER_SIZE = 64 * 1024  # copy buffer; a read that fills it means a bulk transfer
PIPE_SIZE = 1 << 20  # splice chunk for bulk transfers
_BURST = 16  # full reads per callback before letting other connections run
_PIPE_POOL = 64  # empty pipes kept per worker thread
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_NO_PIPE_RETRY = 1.0  # seconds of copying after pipe2 failed, before trying a pipe again
_SWEEP = 1.0  # seconds: a half-close deadline longer than 2 * this gets its timer at the next sweep


class _Shared:
    """What the relays of one worker thread share (tests run hubs in several threads):
    the copy buffer, the pool of empty pipes, how many relays are running, and the
    half-closed relays whose deadline timer is not made yet (`sweep`).

    A plain object fetched from the thread-local once per relay, not a
    threading.local subclass read on every event: each attribute read of one looks
    up the calling thread's dict first."""

    __slots__ = ("buf", "deferred", "no_pipes_until", "pipes", "running", "sweeper", "sweeper_loop", "sweeping")

    def __init__(self) -> None:
        self.buf = memoryview(bytearray(BUFFER_SIZE))
        self.pipes: list[_Pipe] = []
        self.running = 0
        self.no_pipes_until = 0.0  # loop time: pipe2 failed (out of descriptors), copy until then
        self.deferred: dict[Relay, None] = {}  # half-closed since the last sweep, still running
        self.sweeper: Any = None  # the libev timer that sweeps `deferred`, running while it is not empty
        self.sweeper_loop: Any = None  # the loop it was made on
        self.sweeping = False  # the sweeper runs (it stops at a sweep that finds nothing)

    def start_sweeper(self, loop: Any) -> None:
        """Run the sweep every `_SWEEP` s on `loop` (a timer made anew for a new loop)."""
        if self.sweeper_loop is not loop:  # the first, or a thread's hub made anew (tests)
            self.sweeper = loop.timer(_SWEEP, _SWEEP, ref=False)  # it keeps no loop alive: the relays' watchers do
            self.sweeper_loop = loop
        self.sweeper.start(self.sweep)
        self.sweeping = True

    def sweep(self) -> None:
        """Arm the deadline timers of the relays half-closed since the last sweep and still running.

        Why deferred: the other direction of a short exchange usually ends right after the
        first (an HTTP server's close, then the client's), and then no timer is ever made;
        making, starting and closing one is ~5,800 instructions of such a connection.  A
        deadline is armed within `_SWEEP` s of the EOF, from `last_activity` as ever, so it
        fires exactly when it did (only half-close timeouts over 2 * `_SWEEP` are deferred)."""
        deferred, self.deferred = self.deferred, {}
        if not deferred:
            self.sweeper.stop()
            self.sweeping = False
            return
        for relay in deferred:
            relay.timer = None
            try:
                relay._arm_timer()
            except BaseException:  # noqa: BLE001 - a callback must not raise into libev
                relay._fail()


_local = threading.local()


def _shared() -> _Shared:
    try:
        return _local.shared  # type: ignore[no-any-return]
    except AttributeError:
        shared = _local.shared = _Shared()
        return shared


class _Pipe:
    """A kernel pipe holding `n` bytes on their way between two sockets."""

    __slots__ = ("n", "r", "w")

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # over the user's pipe-buffer limit: the default size works too
        self.n = 0

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def _take_pipe() -> _Pipe:
    pool = _shared().pipes
    return pool.pop() if pool else _Pipe()


def _give_pipe(pipe: _Pipe) -> None:
    """Back to the pool when empty; a pipe holding stale bytes is closed."""
    pool = _shared().pipes
    if pipe.n == 0 and len(pool) < _PIPE_POOL:
        pool.append(pipe)
    else:
        pipe.close()


_DEFERRED: Any = object()  # Relay.timer: the half-close deadline waits for the next sweep


class _Reset(Exception):
    """A peer reset its side (or vanished) mid-stream."""


@dataclass(slots=True)
class RelayResult:
    outcome: str
    sent: int  # client -> upstream
    received: int  # upstream -> client
    detail: str = ""


class Relay:
    """One relayed connection.  Direction i moves bytes from socket i to socket 1 - i
    (0: client -> upstream, 1: upstream -> client).

    `start(on_done)` returns at once and calls `on_done(relay)` when both
    directions have ended (or on a reset, a timeout or `abort()`), with
    `relay.result` set, the watchers closed and the sockets still open unless
    they were reset.  `run()` does the same and blocks until then.  Each socket
    has one watcher: readable while its direction may read, writable while the
    other direction has bytes pending for it.
    """

    __slots__ = (
        "bulk",
        "closes",
        "context",
        "counts",
        "done",
        "events",
        "half_close_timeout",
        "idle_timeout",
        "last_activity",
        "loop",
        "on_done",
        "on_error",
        "pending",
        "result",
        "shared",
        "socks",
        "timer",
        "watchers",
    )

    def __init__(self, client: socket.socket, upstream: socket.socket, idle_timeout: float = 0.0,
                 half_close_timeout: float = 60.0, early: bytes = b"", early_reply: bytes = b"",
                 watchers: tuple[Any, Any] = (None, None)) -> None:
        """`early`: client bytes already read (sent behind a handshake), delivered first;
        `early_reply` the same from the upstream (read with its last handshake reply).
        `watchers`: io watchers the sockets already have (stopped), taken over rather
        than made anew."""
        for s in (client, upstream):
            if s.gettimeout() != 0.0:
                s.setblocking(False)
        self.socks = (client, upstream)
        self.pending: list[bytes | _Pipe | None] = [early or None, early_reply or None]  # per direction: bytes the destination has not taken
        self.done = [False, False]  # per direction: EOF seen
        self.bulk = [False, False]  # per direction: splicing
        self.counts = [0, 0]  # per direction: bytes delivered
        self.events = [0, 0]  # per socket: what its watcher waits for
        self.idle_timeout = idle_timeout
        self.half_close_timeout = half_close_timeout
        self.last_activity = 0.0
        self.loop: Any = None
        self.shared = _shared()  # this thread's, looked up once
        self.watchers: tuple[Any, ...] = watchers
        self.timer: Any = None
        self.on_done: Callable[[Relay], None] | None = None
        self.on_error: Callable[..., None] | None = None
        self.result: RelayResult | None = None
        self.context: Any = None  # the caller's, e.g. what its on_done needs to log
        self.closes = False  # whoever runs it closes both sockets as soon as it ends

    def run(self) -> RelayResult:
        """Relay in the calling greenlet's hub until both directions end."""
        waiter = Waiter()
        self.start(lambda relay: waiter.switch(relay.result), waiter.throw)
        try:
            return waiter.get()
        finally:
            self._close()

    def start(self, on_done: Callable[[Relay], None],
              on_error: Callable[..., None] | None = None) -> None:
        """Start relaying; `on_done(self)` runs when it is over (in the hub, or
        within this call if the relay ends at once).

        An unexpected exception inside a callback goes to `on_error(*exc_info)`
        if given, else it is logged and the connection reset.
        """
        loop = self.loop = get_hub().loop
        self.on_done = on_done
        self.on_error = on_error
        w0, w1 = self.watchers
        self.watchers = (w0 if w0 is not None else loop.io(self.socks[0].fileno(), _READ),
                         w1 if w1 is not None else loop.io(self.socks[1].fileno(), _READ))
        self.last_activity = loop.now()
        self.shared.running += 1
        sniffed = self.pending[0] is not None
        try:
            reset = self._send_early() if sniffed or self.pending[1] is not None else None
            if reset is None:
                for k in (0, 1):
                    self._watch(k)
                if self.idle_timeout:
                    self._arm_timer()
        except BaseException:
            self._close()
            raise
        if reset is not None:
            self._finish(outcome.RESET, reset, reset=True)
        elif not sniffed:
            # Client-first protocols (HTTP, TLS) have bytes waiting already: move
            # them now rather than one loop iteration later.  Early client bytes
            # were those (read to sniff them): more are unlikely yet, and a read
            # that finds none costs a syscall and an exception.
            self._on_event(_READ, 0)

    def _send_early(self) -> str | None:
        """Send the early bytes before the watchers start, so that each starts with what
        it waits for after them (a watcher started for writing and set back to reading
        before the loop turns costs a failing epoll_ctl, EEXIST); a reset's detail."""
        try:
            for i in (0, 1):
                data = self.pending[i]
                if data is not None:
                    self._send_bytes(i, data)  # type: ignore[arg-type]
        except _Reset as exc:
            return str(exc)
        return None

    def abort(self, detail: str, name: str = outcome.RESET) -> None:
        """Reset both sockets and end now, with outcome `name` (e.g. shutdown)."""
        self._finish(name, detail, reset=True)

    # --- callbacks (run in the hub: they must never raise) -----------------

    def _on_event(self, revents: int, k: int) -> None:
        """Socket k is readable (direction k may read) and/or writable (direction 1 - k may flush)."""
        try:
            # _pump inlined: this runs once per event, and a call is a good part of its cost.
            if revents & _WRITE and self.pending[1 - k] is not None and self._flush(1 - k) and self.result is None:
                if self.bulk[1 - k]:
                    self._pump_splice(1 - k)
                else:
                    self._pump_copy(1 - k)
            if revents & _READ and self.result is None and not self.done[k] and self.pending[k] is None:
                if self.bulk[k]:
                    self._pump_splice(k)
                else:
                    self._pump_copy(k)
        except _Reset as exc:
            self._finish(outcome.RESET, str(exc), reset=True)
        except BaseException:  # noqa: BLE001 - a callback must not raise into libev
            self._fail()

    def _on_timer(self) -> None:
        try:
            idle = self.loop.now() - self.last_activity
            timeout = self._timeout()
            if idle >= timeout - 0.001:
                what = "half-closed" if (self.done[0] or self.done[1]) else "idle"
                self._finish(outcome.IDLE_TIMEOUT, f"{what} for {timeout:g}s", reset=True)
                return
            self.timer.close()
            self.timer = self.loop.timer(timeout - idle)
            self.timer.start(self._on_timer)
        except BaseException:  # noqa: BLE001 - a callback must not raise into libev
            self._fail()

    # --- moving bytes --------------------------------------------------------

    def _pump_copy(self, i: int) -> None:
        """Move what socket i has to the other socket through the shared buffer."""
        src = self.socks[i]
        dst = self.socks[1 - i]
        shared = self.shared
        buf = shared.buf
        for _ in range(_BURST):
            try:
                n = src.recv_into(buf)
            except BlockingIOError:
                return
            except OSError as exc:
                raise _Reset(f"{_side(i)} reset: {exc.strerror}") from None
            if self.timer is not None:
                self.last_activity = self.loop.now()
            if n == 0:
                self._eof(i)
                return
            try:
                sent = dst.send(buf[:n])
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise _Reset(f"{_side(1 - i)} send failed: {exc.strerror}") from None
            self.counts[i] += sent
            if sent < n:
                self.pending[i] = bytes(buf[sent:n])
                self._watch(i)
                self._watch(1 - i)
                return
            if n < BUFFER_SIZE or self.loop.now() < shared.no_pipes_until:
                if n < BUFFER_SIZE:
                    return
                continue  # no pipe to be had: keep copying
            self.bulk[i] = True  # a full buffer: the sender has more, splice it
            self._pump_splice(i)
            return

    def _pump_splice(self, i: int) -> None:
        """Move what socket i has to the other socket through a pooled pipe, in the kernel."""
        src = self.socks[i].fileno()
        try:
            pipe: _Pipe | None = _take_pipe()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise
            # Out of descriptors: copying needs none, so the transfer goes on that way.
            self.shared.no_pipes_until = self.loop.now() + _NO_PIPE_RETRY
            self.bulk[i] = False
            self._pump_copy(i)
            return
        try:
            for _ in range(_BURST):
                try:
                    n = os.splice(src, pipe.w, PIPE_SIZE, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    return
                except OSError as exc:
                    raise _Reset(f"{_side(i)} reset: {exc.strerror}") from None
                if self.timer is not None:
                    self.last_activity = self.loop.now()
                if n == 0:
                    self._eof(i)
                    return
                if n < BUFFER_SIZE:
                    self.bulk[i] = False  # back to small messages: the copy path is cheaper
                pipe.n = n
                self._drain(i, pipe)  # type: ignore[arg-type]
                if pipe.n:
                    self.pending[i], pipe = pipe, None
                    self._watch(i)
                    self._watch(1 - i)
                    return
                if n < PIPE_SIZE:
                    return
        finally:
            if pipe is not None:
                _give_pipe(pipe)

    def _drain(self, i: int, pipe: _Pipe) -> None:
        """Move direction i's piped bytes to its destination until done or it is full."""
        dst = self.socks[1 - i].fileno()
        while pipe.n:
            try:
                m = os.splice(pipe.r, dst, pipe.n, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return
            except OSError as exc:
                raise _Reset(f"{_side(1 - i)} send failed: {exc.strerror}") from None
            pipe.n -= m
            self.counts[i] += m

    def _send_bytes(self, i: int, data: bytes) -> int:
        """Send what the destination takes of direction i's pending `data`; how much is left."""
        try:
            sent = self.socks[1 - i].send(data)
        except BlockingIOError:
            return len(data)
        except OSError as exc:
            raise _Reset(f"{_side(1 - i)} send failed: {exc.strerror}") from None
        self.counts[i] += sent
        left = len(data) - sent
        self.pending[i] = data[sent:] if left else None
        return left

    def _flush(self, i: int) -> bool:
        """Send direction i's pending bytes; True once all are out."""
        data = self.pending[i]
        if isinstance(data, _Pipe):
            self._drain(i, data)
            left = data.n
        else:
            assert data is not None
            left = self._send_bytes(i, data)
        if self.timer is not None:
            self.last_activity = self.loop.now()
        if left:
            return False
        if isinstance(data, _Pipe):
            _give_pipe(data)
        self.pending[i] = None
        self._watch(i)
        self._watch(1 - i)
        return True

    def _eof(self, i: int) -> None:
        if not (self.done[1 - i] and self.closes):
            # Pass the half-close on.  When the other way is over already and
            # the sockets close at the end (an InFlight registry's), that close sends the
            # FIN itself: no shutdown call first.
            try:
                self.socks[1 - i].shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self.done[i] = True
        if self.done[1 - i]:
            self._finish(outcome.OK)  # closes the watchers: no stop first
        else:
            self._watch(i)
            self.last_activity = self.loop.now()
            if self.timer is None and self.half_close_timeout > 2 * _SWEEP:
                # The half-close deadline (without an idle timer it is the only one) is armed
                # by the next sweep, if the relay still runs then: see `_Shared.sweep`.
                self.timer = _DEFERRED  # activity still moves `last_activity`, from which it is armed
                shared = self.shared
                if not shared.sweeping or shared.sweeper_loop is not self.loop:
                    shared.start_sweeper(self.loop)  # once, not per relay: one connection at a time empties it each time
                shared.deferred[self] = None
            else:
                self._arm_timer()  # short, or an idle timer there already (replaced if the deadline is sooner now)

    def _watch(self, k: int) -> None:
        """Make socket k's watcher wait for what its two directions need now."""
        events = (_READ if not self.done[k] and self.pending[k] is None else 0) | \
                 (_WRITE if self.pending[1 - k] is not None else 0)
        if events == self.events[k]:
            return
        w = self.watchers[k]
        if self.events[k]:
            w.stop()
        self.events[k] = events
        if events:
            # Setting events re-registers the fd with epoll at the next loop turn
            # even when they are the same (libev's EV__IOFDSET): an EPOLL_CTL_ADD
            # that fails with EEXIST for a watcher taken over from the handshake.
            if w.events != events:
                w.events = events
            w.start(self._on_event, k, pass_events=True)

    # --- deadlines and the end ---------------------------------------------

    def _timeout(self) -> float:
        """The timeout in force: idle, or once a direction has ended the shorter of idle and half-close."""
        idle = self.idle_timeout
        if self.done[0] or self.done[1]:
            half = self.half_close_timeout
            return min(idle, half) if idle and half else half or idle
        return idle

    def _arm_timer(self) -> None:
        """(Re)start the deadline when the applicable timeout changes (at the start with an
        idle timeout, at the first EOF), never per event: activity only moves
        `last_activity`, and the timer, once due, checks it and starts again if the
        connection was not idle that long.

        One libev timer per relay, not a timer wheel in Python (bench/README.md, issue 20
        levers: relay): the timer is ~5,800 instructions of a short connection, mostly the
        Python calls around it; a dict-of-buckets wheel saved ~750-1,100 of them but fires up to a
        tick late.  A long half-close deadline is armed here by `_Shared.sweep` a second after
        the EOF, so a relay that ends within that second makes none (perf-relay2's section)."""
        timeout = self._timeout()
        if self.timer is not None:
            # It is the idle timeout's: the only one before an EOF, and this runs at the start and the first EOF.
            if timeout == self.idle_timeout:
                return
            self.timer.close()
            self.timer = None
        if timeout:
            self.timer = self.loop.timer(max(0.0, self.last_activity + timeout - self.loop.now()))
            self.timer.start(self._on_timer)

    def _close(self) -> None:
        """Release the watchers, the timer and any pipe; idempotent (and nothing before `start`)."""
        if self.loop is None or not self.watchers:
            return
        for w in self.watchers:
            w.close()
        self.watchers = ()
        timer = self.timer
        if timer is not None:
            if timer is _DEFERRED:
                self.shared.deferred.pop(self, None)  # a sweep under way has taken the dict
            else:
                timer.close()
            self.timer = None
        pending = self.pending
        if pending[0] is not None or pending[1] is not None:
            for i in (0, 1):
                if isinstance(pending[i], _Pipe):
                    pending[i].close()  # type: ignore[union-attr]
                    pending[i] = None
        shared = self.shared
        shared.running -= 1
        if not shared.running:
            # Nothing is relaying: hand the pooled pipes' descriptors back too.
            while shared.pipes:
                shared.pipes.pop().close()

    def _finish(self, name: str, detail: str = "", reset: bool = False) -> None:
        if self.result is not None:
            return
        self.result = RelayResult(name, self.counts[0], self.counts[1], detail)
        self._close()
        if reset:
            for s in self.socks:
                close_with_reset(s)
        on_done, self.on_done = self.on_done, None
        on_done(self)  # type: ignore[misc]

    def _fail(self) -> None:
        """An unexpected error in a callback: end the relay and report it."""
        if self.result is not None:
            return
        exc_info = sys.exc_info()
        on_error = self.on_error
        if on_error is None:
            log.error("relay failed", exc_info=exc_info)
            self._finish(outcome.RESET, f"internal error: {exc_info[1]!r}", reset=True)
            return
        self.result = RelayResult(outcome.RESET, self.counts[0], self.counts[1], "internal error")
        self._close()
        on_error(*exc_info)


def _side(i: int) -> str:
    return "client" if i == 0 else "upstream"


def relay(client: socket.socket, upstream: socket.socket, idle_timeout: float = 0.0, half_close_timeout: float = 60.0) -> RelayResult:
    """Relay until both directions end; the caller closes the sockets."""
    return Relay(client, upstream, idle_timeout, half_close_timeout).run()
