"""Copy bytes both ways between two sockets in one greenlet.

Why one greenlet and no per-connection buffer: an idle relayed connection is
parked on two cached read watchers and owns no buffer, which keeps 10 000 idle
connections per worker cheap.  Data is read into one buffer shared by the whole
worker and written out before the greenlet yields again; only bytes the
receiver cannot take yet are copied and kept.

Half-close: EOF from one side becomes shutdown(SHUT_WR) on the other while the
other direction keeps flowing.  A reset on either side is passed on as a reset
(SO_LINGER 0), so a truncated transfer never looks like a clean end.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from gevent.hub import Waiter, get_hub

from . import outcome
from .netutil import close_with_reset

_READ = 1
_WRITE = 2
BUFFER_SIZE = 64 * 1024
_BURST = 16  # reads per wake-up before yielding to other connections
_TIMEOUT = -1

_shared_view = memoryview(bytearray(BUFFER_SIZE))


class _Reset(Exception):
    """A peer reset its side (or vanished) mid-stream."""


@dataclass
class RelayResult:
    outcome: str
    sent: int  # client -> upstream
    received: int  # upstream -> client
    detail: str = ""


class Relay:
    """State of one relayed connection; `run()` returns when both directions end."""

    __slots__ = ("socks", "pending", "done", "counts", "idle_timeout", "half_close_timeout", "last_activity")

    def __init__(self, client: socket.socket, upstream: socket.socket, idle_timeout: float = 0.0, half_close_timeout: float = 60.0) -> None:
        client.setblocking(False)
        upstream.setblocking(False)
        self.socks = (client, upstream)
        self.pending: list[bytes | None] = [None, None]
        self.done = [False, False]
        self.counts = [0, 0]
        self.idle_timeout = idle_timeout
        self.half_close_timeout = half_close_timeout
        self.last_activity = 0.0

    def _pump(self, i: int) -> bool:
        """Move what is ready from side i to the other; True if bytes moved."""
        src = self.socks[i]
        dst = self.socks[1 - i]
        moved = False
        data = self.pending[i]
        if data is not None:
            try:
                sent = dst.send(data)
            except BlockingIOError:
                return False
            except OSError as exc:
                raise _Reset(f"{_side(1 - i)} send failed: {exc.strerror}") from None
            self.counts[i] += sent
            if sent < len(data):
                self.pending[i] = data[sent:]
                return True
            self.pending[i] = None
            moved = True
        view = _shared_view
        for _ in range(_BURST):
            try:
                n = src.recv_into(view)
            except BlockingIOError:
                return moved
            except OSError as exc:
                raise _Reset(f"{_side(i)} reset: {exc.strerror}") from None
            if n == 0:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                self.done[i] = True
                return True
            moved = True
            try:
                sent = dst.send(view[:n])
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise _Reset(f"{_side(1 - i)} send failed: {exc.strerror}") from None
            self.counts[i] += sent
            if sent < n:
                self.pending[i] = bytes(view[sent:n])
                return True
            if n < BUFFER_SIZE:
                return True
        return moved

    def _timeout(self) -> float:
        if self.done[0] or self.done[1]:
            if self.idle_timeout and self.half_close_timeout:
                return min(self.idle_timeout, self.half_close_timeout)
            return self.half_close_timeout or self.idle_timeout
        return self.idle_timeout

    def run(self) -> RelayResult:
        loop = get_hub().loop
        a, b = self.socks
        readers = (loop.io(a.fileno(), _READ), loop.io(b.fileno(), _READ))
        writers = (loop.io(b.fileno(), _WRITE), loop.io(a.fileno(), _WRITE))
        timer = None
        timer_for = 0.0
        waiter = Waiter()
        self.last_activity = loop.now()
        try:
            while True:
                progressed = False
                for i in (0, 1):
                    if not self.done[i] and self._pump(i):
                        progressed = True
                if self.done[0] and self.done[1]:
                    return self._result(outcome.OK)
                if progressed:
                    self.last_activity = loop.now()
                for i in (0, 1):
                    if not self.done[i]:
                        (writers[i] if self.pending[i] is not None else readers[i]).start(waiter.switch, i)
                timeout = self._timeout()
                if timer is not None and timer_for != timeout:
                    timer.close()
                    timer = None
                if timeout and timer is None:
                    timer = loop.timer(max(0.0, self.last_activity + timeout - loop.now()))
                    timer.start(waiter.switch, _TIMEOUT)
                    timer_for = timeout
                try:
                    woke = waiter.get()
                finally:
                    waiter.clear()
                    for w in readers + writers:
                        w.stop()
                if woke == _TIMEOUT:
                    timer.close()
                    timer = None
                    if loop.now() - self.last_activity >= timeout - 0.001:
                        for s in self.socks:
                            close_with_reset(s)
                        what = "half-closed" if (self.done[0] or self.done[1]) else "idle"
                        return self._result(outcome.IDLE_TIMEOUT, f"{what} for {timeout:g}s")
        except _Reset as exc:
            for s in self.socks:
                close_with_reset(s)
            return self._result(outcome.RESET, str(exc))
        finally:
            for w in readers + writers:
                w.close()
            if timer is not None:
                timer.close()

    def _result(self, name: str, detail: str = "") -> RelayResult:
        return RelayResult(name, self.counts[0], self.counts[1], detail)


def _side(i: int) -> str:
    return "client" if i == 0 else "upstream"


def relay(client: socket.socket, upstream: socket.socket, idle_timeout: float = 0.0, half_close_timeout: float = 60.0) -> RelayResult:
    """Relay until both directions end; the caller closes the sockets."""
    return Relay(client, upstream, idle_timeout, half_close_timeout).run()
