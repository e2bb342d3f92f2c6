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

from gevent import getcurrent
from gevent.hub import get_hub

from . import outcome
from .netutil import ip_literal

READ = 1
WRITE = 2
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class Deadline:
    """Raise `exc` in the current greenlet after `seconds` (None: never).

    Why not gevent.Timeout: it is pure Python and costs twice this bare
    libev timer (5.8 vs 2.9 us), and every connection needs two.
    """

    __slots__ = ("timer",)

    def __init__(self, seconds: float | None, exc: type[BaseException]) -> None:
        self.timer = None
        if seconds:
            self.timer = get_hub().loop.timer(seconds)
            self.timer.start(getcurrent().throw, exc)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        if self.timer is not None:
            self.timer.close()
            self.timer = None


def wait(sock: socket.socket, events: int) -> None:
    hub = get_hub()
    watcher = hub.loop.io(sock.fileno(), events)
    try:
        hub.wait(watcher)
    finally:
        watcher.close()


def recv_some(sock: socket.socket, bufsize: int = 4096) -> bytes:
    """Read what is available (at least one byte, or b"" at EOF)."""
    while True:
        try:
            return sock.recv(bufsize)
        except BlockingIOError:
            wait(sock, READ)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes; EOFError if the peer closes first.

    A handshake reply usually arrives whole: then it is one recv, no buffer.
    """
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except BlockingIOError:
            wait(sock, READ)
            continue
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        if len(chunk) == n:
            return chunk
        buf += chunk
    return bytes(buf)


def peek_some(sock: socket.socket, bufsize: int) -> bytes:
    """Look at buffered bytes without consuming them (HTTP header scan)."""
    while True:
        try:
            return sock.recv(bufsize, socket.MSG_PEEK)
        except BlockingIOError:
            wait(sock, READ)


def sendall(sock: socket.socket, data: bytes) -> None:
    try:
        sent = sock.send(data)  # a handshake message fits the send buffer
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            wait(sock, WRITE)
            continue
        view = view[sent:]


def _literal_address(host: str, port: int, family: int) -> list[tuple[int, tuple]] | None:
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


def dial(family: int, addr: tuple, source: str | None = None, device: str | None = None) -> socket.socket:
    """Connect one TCP socket to `addr`, optionally from `source` and through `device`.

    The source port is chosen at connect time (IP_BIND_ADDRESS_NO_PORT): a
    plain bind would take a port out of the whole ephemeral range for every
    connection, and a busy egress address would run out at ~28k connections
    instead of ~28k per destination.
    """
    sock = new_socket(family)
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
        err = sock.connect_ex(addr)
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            wait(sock, WRITE)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except BaseException:
        sock.close()
        raise


def connect(host: str, port: int, family: int = 0) -> socket.socket:
    """Open a TCP connection to the first address of `host` that answers;
    names are resolved with gevent's resolver."""
    addrs = _literal_address(host, port, family)
    if addrs is None:
        from gevent.socket import getaddrinfo

        addrs = [(fam, addr) for fam, _, _, _, addr in getaddrinfo(host, port, family, socket.SOCK_STREAM)]
    last: OSError | None = None
    for fam, addr in addrs:
        try:
            return dial(fam, addr)
        except OSError as exc:
            last = exc
    raise last or OSError(errno.EHOSTUNREACH, f"no address for {host}")
