"""Cooperative blocking-style I/O on plain non-blocking sockets (gevent hub).

Handshakes read and write a few small messages; these helpers make that code
read top-down.  Deadlines come from a `gevent.Timeout` around the whole
negotiation, so a peer that trickles bytes cannot stretch it.
"""

from __future__ import annotations

import errno
import os
import socket

from gevent.hub import get_hub

_READ = 1
_WRITE = 2


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
            wait(sock, _READ)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes; EOFError if the peer closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = recv_some(sock, n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def peek_some(sock: socket.socket, bufsize: int) -> bytes:
    """Look at buffered bytes without consuming them (HTTP header scan)."""
    while True:
        try:
            return sock.recv(bufsize, socket.MSG_PEEK)
        except BlockingIOError:
            wait(sock, _READ)


def sendall(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            wait(sock, _WRITE)
            continue
        view = view[sent:]


def connect(
    host: str, port: int, source: str | None = None, family: int = 0
) -> socket.socket:
    """Open a TCP connection; names are resolved with gevent's resolver."""
    from gevent.socket import getaddrinfo

    last: OSError | None = None
    for fam, _, _, _, addr in getaddrinfo(host, port, family, socket.SOCK_STREAM):
        sock = socket.socket(fam, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if source:
                sock.bind((source, 0))
            err = sock.connect_ex(addr)
            if err in (errno.EINPROGRESS, errno.EAGAIN):
                wait(sock, _WRITE)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError):
                raise
            last = exc
    raise last or OSError(errno.EHOSTUNREACH, f"no address for {host}")
