"""SOCKS5 dialer (RFC 1928) with username/password authentication (RFC 1929)."""

from __future__ import annotations

import socket

from ...core import nio, outcome
from ...core.netutil import Endpoint
from ...wire import ProtocolError
from ...wire.socks5 import (
    NO_ACCEPTABLE,
    NO_AUTH,
    REPLIES,
    USERPASS,
    connect_request,
    greeting,
    read_method,
    read_reply,
    userpass_request,
)
from .base import Dialer, ProxyURL, UpstreamError, reader

REPLY_OUTCOMES = {
    0x02: outcome.UPSTREAM_REFUSED,
    0x03: outcome.DEST_UNREACHABLE,
    0x04: outcome.DEST_UNREACHABLE,
    0x05: outcome.DEST_REFUSED,
    0x06: outcome.DEST_UNREACHABLE,
}


GENERAL_FAILURE = 0x01  # the server's own trouble: another member may do better


def check_reply(rep: int) -> None:
    if rep != 0:
        text = REPLIES.get(rep, "unassigned reply code")
        raise UpstreamError(REPLY_OUTCOMES.get(rep, outcome.UPSTREAM_REFUSED), f"socks5 reply {rep:02x}: {text}",
                            member_fault=True if rep == GENERAL_FAILURE else None)


class Socks5Dialer(Dialer):
    """CONNECT through a SOCKS5 proxy; greeting and request go in one write when possible."""

    def __init__(self, url: ProxyURL, *args: object, pipelining: bool = False, **kwargs: object) -> None:
        super().__init__(url, *args, **kwargs)  # type: ignore[arg-type]
        self.pipelining = pipelining
        if url.username is not None:
            self._greeting = greeting(bytes([NO_AUTH, USERPASS]))
        else:
            self._greeting = greeting(bytes([NO_AUTH]))

    def handshake(self, sock: socket.socket, dest: Endpoint) -> None:
        request = connect_request(dest)
        pipelined = self.pipelining and self.url.username is None
        self._login(sock, request if pipelined else b"")
        if not pipelined:
            nio.sendall(sock, request)
            nio.wait(sock, nio.READ)
        rep, _bound = read_reply(reader(sock))
        check_reply(rep)

    def greet(self, sock: socket.socket) -> None:
        self._login(sock, b"")

    def _login(self, sock: socket.socket, pipelined: bytes) -> None:
        """Greeting (with a pipelined request behind it) and, when asked, user/pass."""
        read = reader(sock)
        nio.sendall(sock, self._greeting + pipelined)
        nio.wait(sock, nio.READ)  # the answer needs a round trip: wait rather than fail a recv first
        method = read_method(read)
        if method == NO_ACCEPTABLE:
            raise UpstreamError(outcome.AUTH_FAILED, "socks5 server accepted none of our auth methods")
        if method == USERPASS and self.url.username is not None:
            nio.sendall(sock, userpass_request(self.url.username, self.url.password or ""))
            _ver, status = read(2)
            if status != 0:
                raise UpstreamError(outcome.AUTH_FAILED, f"socks5 user/pass rejected for {self.url.username!r} (status {status:#04x})")
        elif method != NO_AUTH:
            raise ProtocolError(f"socks5 server chose method {method:#04x} we did not offer")
