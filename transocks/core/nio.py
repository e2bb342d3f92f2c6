"""Cooperative blocking-style I/O on plain non-blocking sockets (gevent hub).

Handshakes read and write a few small messages; these helpers make that code
read top-down.  Deadlines come from one timer around the whole negotiation
(`Deadline`), so a peer that trickles bytes cannot stretch it.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any

from gevent import getcurrent
from gevent.hub import get_hub

from . import outcome
from .names import ip_literal

READ = 1
WRITE = 2
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
TCP_FASTOPEN_CONNECT = getattr(socket, "TCP_FASTOPEN_CONNECT", 30)


class Deadline:
    """Raise `exc` in the current greenlet after `seconds` (None: never), for the `with` block.

    Why not gevent.Timeout: it is pure Python and costs twice a bare libev
    timer (5.8 vs 2.9 us).  The timer counts from now, not from the loop's
    last wake-up (`update=True`, 0.06 us): code that ran long without the hub
    would otherwise see it expire at once.
    """

    __slots__ = ("timer",)

    def __init__(self, seconds: float | None, exc: type[BaseException]) -> None:
        self.timer: Any = None
        if seconds:
            self.timer = get_hub().loop.timer(seconds)
            self.timer.start(getcurrent().throw, exc, update=True)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.close()
            self.timer = None


class Stream:
    """A non-blocking socket and the one io watcher it keeps from its first wait
    through the relay (`detach` hands the watcher over).

    Why one: a watcher made for each wait and closed after it costs an
    allocation and epoll_ctl calls every time, and a connection waits three to
    five times (connect, replies, the client's first bytes) before relaying.
    """

    __slots__ = ("extra", "sock", "watcher")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.watcher: Any = None
        self.extra = b""  # bytes read past a handshake: the tunnel's first, for the relay

    def wait(self, events: int) -> None:
        w = self.watcher
        hub = get_hub()
        if w is None:
            w = self.watcher = hub.loop.io(self.sock.fileno(), events)
        elif w.events != events:
            w.events = events
        hub.wait(w)

    def recv_some(self, bufsize: int = 4096) -> bytes:
        """Read what is available (at least one byte, or b"" at EOF)."""
        while True:
            try:
                return self.sock.recv(bufsize)
            except BlockingIOError:
                self.wait(READ)

    def recv_reply(self, bufsize: int = 4096) -> bytes:
        """Wait, then read what is there: for an answer that needs a round trip,
        which a recv made at once would only find missing."""
        self.wait(READ)
        return self.recv_some(bufsize)

    def recv_exact(self, n: int) -> bytes:
        """Read exactly n bytes; EOFError if the peer closes first.

        A handshake reply usually arrives whole: then it is one recv, no buffer.
        """
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except BlockingIOError:
                self.wait(READ)
                continue
            if not chunk:
                raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
            if len(chunk) == n:
                return chunk
            buf += chunk
        return bytes(buf)

    def sendall(self, data: bytes) -> None:
        try:
            sent = self.sock.send(data)  # a handshake message fits the send buffer
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                self.wait(WRITE)
                continue
            view = view[sent:]

    def detach(self) -> Any:
        """The watcher (or None), now the caller's to close."""
        w, self.watcher = self.watcher, None
        return w

    def release(self) -> None:
        """Close the watcher; the socket stays open."""
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None

    def close(self) -> None:
        self.release()
        self.sock.close()


def wait(sock: socket.socket, events: int) -> None:
    hub = get_hub()
    watcher = hub.loop.io(sock.fileno(), events)
    try:
        hub.wait(watcher)
    finally:
        watcher.close()


def _once(sock: socket.socket, call: Callable[[Stream], Any]) -> Any:
    """A Stream for one call on a plain socket (code that waits once or twice)."""
    stream = Stream(sock)
    try:
        return call(stream)
    finally:
        stream.release()


def recv_some(sock: socket.socket, bufsize: int = 4096) -> bytes:
    """Read what is available (at least one byte, or b"" at EOF)."""
    return _once(sock, lambda s: s.recv_some(bufsize))


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes; EOFError if the peer closes first."""
    return _once(sock, lambda s: s.recv_exact(n))


def sendall(sock: socket.socket, data: bytes) -> None:
    _once(sock, lambda s: s.sendall(data))


def literal_addresses(host: str, port: int, family: int) -> list[tuple[int, tuple]] | None:
    """(family, sockaddr) for an IP literal, or None when `host` needs resolving.

    gevent's default resolver runs getaddrinfo in a thread pool even for a
    literal; the hand-off to the pool and back was the largest cost of a
    connection to an upstream proxy given by address.
    """
    literal = ip_literal(host)
    if literal is None or family not in (0, literal[0]):
        return None
    fam = literal[0]
    return [(fam, (host, port) if fam == socket.AF_INET else (host, port, 0, 0))]


EXHAUSTION_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

on_exhausted: Callable[[OSError], None] | None = None
"""Called when a socket cannot be made for lack of descriptors: the worker backs off accepting."""


class ResourceExhausted(outcome.Failure):
    """No descriptor (or buffer) for a new socket: this host, not the peer, is the problem.

    Not an OSError, so that a dialer's `except OSError` (upstream unreachable)
    lets it through to the handler's `except outcome.Failure` unchanged.
    """

    def __init__(self, exc: OSError) -> None:
        super().__init__(outcome.RESOURCE_EXHAUSTED, f"no descriptor for a new connection: {exc.strerror or exc}")
        self.errno = exc.errno


def new_socket(family: int) -> socket.socket:
    """A non-blocking TCP socket, or ResourceExhausted when the process or host is out of descriptors."""
    try:
        return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    except OSError as exc:
        if exc.errno not in EXHAUSTION_ERRNOS:
            raise
        if on_exhausted is not None:
            on_exhausted(exc)
        raise ResourceExhausted(exc) from None


class LocalSetupError(OSError):
    """The local end of an outbound socket (source address, device) could not be set up."""


def dial_stream(family: int, addr: tuple, source: str | None = None, device: str | None = None) -> Stream:
    """Connect one TCP socket to `addr`, optionally from `source` and through `device`.

    The source port is chosen at connect time (IP_BIND_ADDRESS_NO_PORT): a
    plain bind would take a port out of the whole ephemeral range for every
    connection, and a busy egress address would run out at ~28k connections
    instead of ~28k per destination.
    """
    sock = new_socket(family)
    stream = Stream(sock)
    try:
        if device:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
            except OSError as exc:
                raise LocalSetupError(exc.errno, f"interface {device}: {exc.strerror}") from None
        if source:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            try:
                sock.bind((source, 0))
            except OSError as exc:
                raise LocalSetupError(exc.errno, f"address {source}: {exc.strerror}") from None
        err = start_connect(sock, addr)
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            stream.wait(WRITE)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        return stream
    except BaseException:
        stream.close()
        raise


def start_connect(sock: socket.socket, addr: tuple, fastopen: bool = False) -> int:
    """Begin a non-blocking connect (no Nagle); the errno of connect_ex.

    With `fastopen` (TCP_FASTOPEN_CONNECT) connect returns at once and the
    first send goes out with the SYN once the server has given this host a
    cookie; a refusal then shows at that send or the first receive.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if fastopen:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
    return sock.connect_ex(addr)


def dial(family: int, addr: tuple, source: str | None = None, device: str | None = None) -> socket.socket:
    """`dial_stream` for a caller that waits on the socket in its own way."""
    stream = dial_stream(family, addr, source, device)
    stream.release()
    return stream.sock


def resolve(host: str, port: int, family: int = 0) -> list[tuple[int, tuple]]:
    """(family, sockaddr) of every address of `host`; names through gevent's resolver."""
    addrs = literal_addresses(host, port, family)
    if addrs is None:
        from gevent.socket import getaddrinfo

        addrs = [(fam, addr) for fam, _, _, _, addr in getaddrinfo(host, port, family, socket.SOCK_STREAM)]
    return addrs
