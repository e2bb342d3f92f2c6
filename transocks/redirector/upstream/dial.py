"""One try at a tunnel, on event-loop callbacks: connect, then the scheme's handshake.

Why callbacks: a connection's dial waits three times (the connect, the
greeting's answer, the request's answer); as greenlet waits each costs two
switches and a watcher start/stop, as callbacks each is one call from the
loop.  The handshakes themselves are written once, as generators that yield
what to send and are sent what arrives (see `Handshake`), so this driver and
any other share them, and the parsers can be fed bytes without sockets.

A `Dial` goes CONNECTING -> NEGOTIATING -> OPEN, or to FAILED from either;
`on_done(dial)` is called once, in the hub (or within `start` when it fails
at once).  One io watcher serves the whole dial and is handed, stopped, to
the relay; one timer covers connect_timeout, then handshake_timeout.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import socket
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Protocol

from gevent.hub import get_hub

from ...core import nio
from ...core.names import format_hostport

if TYPE_CHECKING:
    from .base import Dialer

Handshake = Generator[bytes, bytes, bytes]
"""A scheme's handshake: it yields bytes to send (b"" for none) and is then sent
the next bytes that arrive (b"" at EOF); it returns the tunnel bytes that came
behind its last reply.  It raises an `outcome.Failure` (or EOFError) to fail."""


class Steps(Protocol):
    """What a `Dial` drives: a `Handshake`, or an object that behaves as one
    (`socks5.InlineConnect`, which checks its replies without a generator)."""

    def __next__(self) -> bytes: ...

    def send(self, chunk: bytes) -> bytes: ...

    def close(self) -> None: ...


log = logging.getLogger("transocks")
_READ = nio.READ
_WRITE = nio.WRITE
RECV_SIZE = 4096  # a reply and any server-first bytes behind it


class Phase(enum.Enum):
    CONNECTING = 0
    NEGOTIATING = 1
    OPEN = 2
    FAILED = 3


# Bound once: in CPython 3.11 each `Phase.X` is a descriptor call (~0.2 us), about ten a dial.
CONNECTING, NEGOTIATING, OPEN, FAILED = Phase.CONNECTING, Phase.NEGOTIATING, Phase.OPEN, Phase.FAILED


class Expired(Exception):
    """The dial's timer ran out (in the phase the dial was in)."""


class Dial:
    """One connect-and-handshake to one address list of one dialer."""

    __slots__ = ("addr", "addrs", "dialer", "error", "extra", "handshake", "on_done", "out", "phase", "sock",
                 "timer", "watcher")

    def __init__(self, dialer: Dialer, addrs: list[tuple[int, tuple]], handshake: Steps | None,
                 on_done: Callable[[Dial], None]) -> None:
        self.dialer = dialer
        self.addrs = list(addrs)  # those not tried yet
        self.handshake = handshake
        self.on_done = on_done
        self.phase = CONNECTING
        self.sock: socket.socket | None = None
        self.watcher: Any = None
        self.timer: Any = None
        self.out = b""  # handshake bytes the socket has not taken yet
        self.extra = b""  # tunnel bytes that came with the last reply, for the relay
        self.error: BaseException | None = None
        self.addr: tuple = ()  # the one being tried

    @classmethod
    def refused(cls, dialer: Dialer, error: BaseException, on_done: Callable[[Dial], None]) -> Dial:
        """A dial that fails before it begins (on_done is called at once)."""
        d = cls(dialer, [], None, on_done)
        d.phase = FAILED
        d.error = error
        on_done(d)
        return d

    def start(self) -> None:
        try:
            if self.handshake is not None:
                try:
                    self.out = next(self.handshake)  # the first message, sent once the connect is done
                except StopIteration as done:
                    self.extra = done.value
                    self.handshake = None
            connect = self.dialer.connect_timeout
            if connect:
                self.timer = get_hub().loop.timer(connect, self.dialer.handshake_timeout or 0.0)
                self.timer.start(self._expired, update=True)
            self._connect()
        except BaseException as exc:  # noqa: BLE001 - every failure ends as on_done, once
            self._fail(exc)

    @property
    def under_way(self) -> bool:
        """Neither open nor failed yet."""
        return self.phase is CONNECTING or self.phase is NEGOTIATING

    def cancel(self) -> None:
        """Stop without calling on_done (the caller gave up on this try)."""
        if self.under_way:
            self.phase = FAILED
            self._close()

    def stream(self) -> nio.Stream:
        """The open tunnel as a Stream holding the (stopped) watcher and the early bytes."""
        assert self.phase is OPEN and self.sock is not None
        s = nio.Stream(self.sock)
        s.watcher, s.extra = self.watcher, self.extra
        self.watcher = None
        return s

    # --- steps ----------------------------------------------------------------

    def _connect(self) -> None:
        """Start a connect to the next address; a refusal there moves on to the one after."""
        while True:
            fam, addr = self.addrs.pop(0)
            self.addr = addr
            if self.sock is not None:  # a refused address before this one
                self._close_socket()
            self.sock = sock = nio.new_socket(fam)
            err = nio.start_connect(sock, addr, self.dialer.fastopen)
            if err in (errno.EINPROGRESS, errno.EAGAIN):
                self._watch(_WRITE)
                return
            if not err:
                self._connected()
                return
            if not self.addrs:
                raise OSError(err, os.strerror(err))

    def _connected(self) -> None:
        """The connect has ended one way or the other.  The handshake's first send says
        which (it fails with the connect's error), so only a dial with nothing to send
        asks for SO_ERROR; a refusal moves on to the next address."""
        out = self.out
        try:
            if out:
                try:
                    out = out[self.sock.send(out):]  # type: ignore[union-attr]
                except BlockingIOError:  # also EINPROGRESS: a fast-open connect still under way
                    pass
            else:
                err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # type: ignore[union-attr]
                if err:
                    raise OSError(err, os.strerror(err))
        except OSError:
            if not self.addrs:
                raise
            self._connect()
            return
        self.phase = NEGOTIATING
        if self.timer is not None:
            if self.dialer.handshake_timeout:
                self.timer.again(self._expired, update=True)
            else:
                self.timer.close()
                self.timer = None
        elif self.dialer.handshake_timeout:
            self.timer = get_hub().loop.timer(self.dialer.handshake_timeout)
            self.timer.start(self._expired, update=True)
        if self.handshake is None:
            self._open(self.extra)
            return
        self.out = out
        self._watch(_WRITE if out else _READ)

    def _send(self, out: bytes) -> None:
        """Send a handshake message, then wait for the answer (or for room to send the rest)."""
        if out:
            try:
                n = self.sock.send(out)  # type: ignore[union-attr]
            except BlockingIOError:  # also EINPROGRESS: a fast-open connect still under way
                n = 0
            out = out[n:]
        self.out = out
        self._watch(_WRITE if out else _READ)

    def _on_io(self) -> None:
        try:
            if self.phase is CONNECTING:
                self._connected()
            elif self.out:
                self._send(self.out)
            else:
                try:
                    chunk = self.sock.recv(RECV_SIZE)  # type: ignore[union-attr]
                except BlockingIOError:
                    return
                try:
                    out = self.handshake.send(chunk)  # type: ignore[union-attr]
                except StopIteration as done:
                    self._open(done.value)
                    return
                self._send(out)
        except BaseException as exc:  # noqa: BLE001 - a callback must not raise into libev
            self._fail(exc)

    def _expired(self) -> None:
        self._fail(Expired())

    def _watch(self, events: int) -> None:
        w = self.watcher
        if w is None:
            w = self.watcher = get_hub().loop.io(self.sock.fileno(), events)  # type: ignore[union-attr]
            w.start(self._on_io)
        elif w.events != events:
            w.stop()
            w.events = events
            w.start(self._on_io)

    # --- ends -------------------------------------------------------------------

    def _open(self, extra: bytes) -> None:
        self.phase = OPEN
        self.extra = extra
        if self.watcher is not None:
            self.watcher.stop()
        self._stop_timer()
        self.on_done(self)

    def _fail(self, exc: BaseException) -> None:
        where = format_hostport(self.addr[0], self.addr[1]) if self.addr else ""  # only a failure needs it
        if not self.under_way:  # raised by on_done, which must not raise
            log.error("handling the end of a dial to %s failed", where, exc_info=exc)
            return
        self.error = self.dialer.failure(exc, self.phase is NEGOTIATING, where)
        self.phase = FAILED
        self._close()
        self.on_done(self)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.close()
            self.timer = None

    def _close(self) -> None:
        self._stop_timer()
        if self.handshake is not None:
            self.handshake.close()
        self._close_socket()

    def _close_socket(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
