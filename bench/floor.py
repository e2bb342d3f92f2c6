"""The floor: the least a transparent SOCKS5 redirector on CPython + gevent does per connection.

    python -m bench.floor --listen 127.0.0.1:1083 [--listen [::1]:1083] --upstream 192.0.2.1:1080

A bench tool, never shipped in or imported by the transocks package.  It accepts on a
REDIRECT listener, reads the destination with SO_ORIGINAL_DST, sends the SOCKS5 greeting and
CONNECT to the upstream in one send (pipelined; dante and usocksd read requests sent behind
the greeting), checks both replies inline, then relays both ways through one shared buffer,
and closes both sockets on the first EOF or error.  Everything runs in callbacks of gevent's
raw libev watchers on the hub's loop: no greenlet, timer, log line, socket option or
configuration beyond that.  The bench's figures for transocks are read against it.  Not a
general proxy: no timeouts, no half-close (a client that half-closes loses the reply).
"""

from __future__ import annotations

import argparse
import socket
from typing import Any

import gevent
from gevent.hub import get_hub

SO_ORIGINAL_DST = 80  # IPv4's SO_ORIGINAL_DST and IPv6's IP6T_SO_ORIGINAL_DST alike
READ, WRITE = 1, 2
MAX_ACCEPT = 64  # connections accepted per wake-up of a listener
BUF = bytearray(1 << 16)  # every relay reads into this one buffer and sends from it at once
VIEW = memoryview(BUF)
GREETING = b"\x05\x01\x00"  # version 5, one method: no authentication
REPLIES_OK = b"\x05\x00\x05\x00"  # method "no authentication" chosen, then VER 5 REP "succeeded"
loop = get_hub().loop


def connect_request(client: socket.socket, family: int) -> bytes:
    """SOCKS5 CONNECT to the client's original destination, cut from SO_ORIGINAL_DST's bytes."""
    if family == socket.AF_INET6:
        raw = client.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)  # sockaddr_in6
        return b"\x05\x01\x00\x04" + raw[8:24] + raw[2:4]
    raw = client.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # sockaddr_in
    return b"\x05\x01\x00\x01" + raw[4:8] + raw[2:4]


def reply_length(got: bytes) -> int:
    """Bytes of method reply plus CONNECT reply, once the bound address type is known; 0 before."""
    if len(got) < 7:
        return 0
    atyp = got[5]
    return 2 + (10 if atyp == 1 else 22 if atyp == 4 else 7 + got[6])


class Pipe:
    """One direction of a relay: what `src` sends goes to `dst`; pauses `src` while `dst` is full."""

    __slots__ = ("conn", "src", "dst", "reader", "writer", "pending")

    def __init__(self, conn: Conn, src: socket.socket, dst: socket.socket, reader: Any) -> None:
        self.conn, self.src, self.dst = conn, src, dst
        self.reader, self.writer, self.pending = reader, None, b""
        reader.start(self.readable)

    def readable(self) -> None:
        try:
            n = self.src.recv_into(BUF)
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if not n:
            self.conn.close()
            return
        try:
            sent = self.dst.send(VIEW[:n])
        except BlockingIOError:
            sent = 0
        except OSError:
            self.conn.close()
            return
        if sent < n:  # keep the rest (the buffer is the next read's) and wait until dst takes it
            self.pending = VIEW[sent:n].tobytes()
            self.reader.stop()
            if self.writer is None:
                self.writer = loop.io(self.dst.fileno(), WRITE)
            self.writer.start(self.writable)

    def writable(self) -> None:
        try:
            sent = self.dst.send(self.pending)
        except BlockingIOError:
            return
        except OSError:
            self.conn.close()
            return
        self.pending = self.pending[sent:]
        if not self.pending:
            self.writer.stop()
            self.reader.start(self.readable)

    def stop(self) -> None:
        self.reader.stop()
        if self.writer is not None:
            self.writer.stop()


class Conn:
    """One redirected connection: connecting -> negotiating -> relaying -> closed."""

    __slots__ = ("client", "upstream", "request", "watcher", "got", "pipes")

    def __init__(self, client: socket.socket, family: int, upstream: tuple[str, int], up_family: int) -> None:
        self.client, self.got, self.pipes = client, b"", ()
        self.upstream = socket.socket(up_family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self.watcher = loop.io(self.upstream.fileno(), WRITE)
        try:
            self.request = GREETING + connect_request(client, family)
            self.upstream.connect_ex(upstream)
        except OSError:
            self.close()
            return
        self.watcher.start(self.connected)

    def connected(self) -> None:
        """Writable: the connect is done (a failed one fails the send); greeting and CONNECT go in one send."""
        self.watcher.stop()
        try:
            self.upstream.send(self.request)
        except OSError:
            self.close()
            return
        self.watcher.events = READ
        self.watcher.start(self.replied)

    def replied(self) -> None:
        """Readable while negotiating: both replies, checked inline; bytes behind them go to the client."""
        try:
            data = self.upstream.recv(512)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        got = self.got + data
        if not data or got[:4] != REPLIES_OK[:len(got)]:
            self.close()  # refused, failed or closed: the client learns it by a reset (its request is unread)
            return
        need = reply_length(got)
        if not need or len(got) < need:
            self.got = got
            return
        self.watcher.stop()
        try:
            if len(got) > need:
                self.client.sendall(got[need:])
        except OSError:
            self.close()
            return
        self.pipes = (Pipe(self, self.client, self.upstream, loop.io(self.client.fileno(), READ)),
                      Pipe(self, self.upstream, self.client, self.watcher))

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.stop()
        self.watcher.stop()
        self.pipes = ()
        self.client.close()
        self.upstream.close()


def listen(address: tuple[str, int], family: int, upstream: tuple[str, int], up_family: int) -> None:
    """Accept on `address` from the loop, each connection straight into a Conn (the loop keeps
    an active watcher, and the watcher its socket)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(4096)
    sock.setblocking(False)
    accept = sock._accept  # type: ignore[attr-defined]  # fd and peer, without socket.accept's enum work

    def ready(_sock: socket.socket) -> None:
        for _ in range(MAX_ACCEPT):
            try:
                fd, _peer = accept()
            except OSError:
                return
            client = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            client.setblocking(False)
            try:
                Conn(client, family, upstream, up_family)
            except OSError:  # no fd left for the upstream socket
                client.close()

    watcher = loop.io(sock.fileno(), READ)
    watcher.start(ready, sock)


def parse_address(text: str) -> tuple[tuple[str, int], int]:
    host, _, port = text.rpartition(":")
    if host.startswith("["):
        return (host[1:-1], int(port)), socket.AF_INET6
    return (host, int(port)), socket.AF_INET


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", action="append", required=True, help="HOST:PORT or [V6]:PORT (repeatable)")
    p.add_argument("--upstream", required=True, help="the SOCKS5 server, HOST:PORT (no authentication)")
    args = p.parse_args(argv)
    upstream, up_family = parse_address(args.upstream)
    for text in args.listen:
        listen(*parse_address(text), upstream, up_family)
    gevent.wait()  # the listeners' watchers keep the loop running until a signal ends the process


if __name__ == "__main__":
    main()
