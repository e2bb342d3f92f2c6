"""What every upstream dialer shares: the proxy URL, errors with outcomes, deadlines."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from ...core import nio, outcome
from ...core.netutil import Endpoint, close_quietly, format_hostport
from ...core.nio import Deadline
from ...wire import ProtocolError, Reader


class UpstreamError(outcome.Failure):
    """A tunnel could not be opened.

    `member_fault` says whether the proxy itself failed (try another member of
    its pool) rather than passing on the destination's own answer; by default
    it follows from the outcome (see `at_member`).
    """

    def __init__(self, outcome_name: str, message: str, member_fault: bool | None = None) -> None:
        super().__init__(outcome_name, message)
        self.member_fault = outcome_name in MEMBER_OUTCOMES if member_fault is None else member_fault


MEMBER_OUTCOMES = frozenset({outcome.UPSTREAM_UNREACHABLE, outcome.UPSTREAM_TIMEOUT, outcome.AUTH_FAILED,
                             outcome.PROTOCOL_ERROR})


def at_member(exc: outcome.Failure) -> bool:
    """True when the failure is the proxy's (refused or silent connect, broken handshake,
    authentication, general failure), False when it passes on the destination's answer
    (refused, unreachable) or a policy (not allowed)."""
    fault = getattr(exc, "member_fault", None)
    return exc.outcome in MEMBER_OUTCOMES if fault is None else fault


class _HandshakeTimeout(Exception):
    pass


@dataclass(frozen=True)
class ProxyURL:
    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.host, self.port)

    def __str__(self) -> str:
        """The URL without the password, safe for logs (`redact` in core.config for raw text)."""
        user = f"{self.username}@" if self.username else ""
        if self.scheme in ("direct", "reject"):
            return f"{self.scheme}://"
        return f"{self.scheme}://{user}{format_hostport(self.host, self.port)}"


DEFAULT_PORTS = {"socks5": 1080, "socks5h": 1080, "socks4": 1080, "socks4a": 1080, "http": 8080}


def parse_proxy_url(text: str) -> ProxyURL:
    """Parse `scheme://[user[:pass]@]host:port`; `direct://` and `reject://` need no host."""
    parts = urlsplit(text.strip())
    scheme = parts.scheme.lower()
    if scheme in ("direct", "reject"):
        return ProxyURL(scheme, "", 0)
    if scheme not in DEFAULT_PORTS:
        raise ValueError(
            f"unsupported proxy scheme {parts.scheme!r} "
            "(use socks5, socks4a, socks4, http, direct or reject)"
        )
    if not parts.hostname:
        raise ValueError(f"missing host in proxy URL {text!r}")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise ValueError(f"bad port in proxy URL: {exc}") from None
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    for label, value in (("user name", user), ("password", password)):
        if value is not None and not 0 < len(value.encode()) <= 255:
            raise ValueError(f"proxy {label} must be 1-255 bytes")
    return ProxyURL("socks5" if scheme == "socks5h" else scheme, parts.hostname, port, user, password)


class Dialer:
    """Opens a tunnel to a destination: TCP connect, then the scheme's handshake."""

    def __init__(self, url: ProxyURL, connect_timeout: float = 5.0, handshake_timeout: float = 10.0) -> None:
        self.url = url
        self.connect_timeout = connect_timeout or None
        self.handshake_timeout = handshake_timeout or None

    @property
    def upstream(self) -> Endpoint | None:
        """The proxy's address, or None when dialing destinations directly."""
        return self.url.endpoint

    def __str__(self) -> str:
        return str(self.url)

    def dial(self, dest: Endpoint) -> socket.socket:
        """A tunnel to `dest` (an IP literal, or a name the proxy resolves)."""
        return self._negotiate(lambda sock: self.handshake(sock, dest))

    def probe(self, target: Endpoint | None) -> None:
        """Health check: a whole tunnel to `target`, or without one, the TCP connect and
        what the scheme can check without a destination (SOCKS5: greeting and login)."""
        if target is not None:
            self.dial(target).close()
        else:
            self._negotiate(self.greet).close()

    def greet(self, sock: socket.socket) -> None:
        """The part of the handshake that needs no destination; none for most schemes."""

    def _negotiate(self, handshake: Callable[[socket.socket], None]) -> socket.socket:
        sock = self.connect(self.url.host, self.url.port, "upstream")
        try:
            with Deadline(self.handshake_timeout, _HandshakeTimeout):
                handshake(sock)
        except _HandshakeTimeout:
            close_quietly(sock)
            raise UpstreamError(
                outcome.UPSTREAM_TIMEOUT, f"{self.url.scheme} handshake timed out after {self.handshake_timeout:g}s"
            ) from None
        except outcome.Failure:  # UpstreamError, or the wire's ProtocolError
            close_quietly(sock)
            raise
        except EOFError as exc:
            close_quietly(sock)
            raise ProtocolError(f"{self.url.scheme} upstream closed during handshake: {exc}") from None
        except OSError as exc:
            close_quietly(sock)
            raise ProtocolError(f"{self.url.scheme} handshake failed: {exc.strerror or exc}") from None
        except BaseException:
            close_quietly(sock)
            raise
        return sock

    def connect(self, host: str, port: int, what: str) -> socket.socket:
        """TCP connect within connect_timeout, with errors named for the log."""
        unreachable = outcome.UPSTREAM_UNREACHABLE if what == "upstream" else outcome.DEST_UNREACHABLE
        try:
            with Deadline(self.connect_timeout, _HandshakeTimeout):
                return nio.connect(host, port)
        except _HandshakeTimeout:
            kind = outcome.UPSTREAM_TIMEOUT if what == "upstream" else outcome.DEST_UNREACHABLE
            raise UpstreamError(kind, f"connect to {what} {format_hostport(host, port)} timed out after {self.connect_timeout:g}s") from None
        except OSError as exc:
            if what != "upstream" and exc.errno == errno.ECONNREFUSED:
                unreachable = outcome.DEST_REFUSED
            reason = exc.strerror or str(exc)
            raise UpstreamError(unreachable, f"connect to {what} {format_hostport(host, port)}: {reason}") from None

    def handshake(self, sock: socket.socket, dest: Endpoint) -> None:
        raise NotImplementedError


def reader(sock: socket.socket) -> Reader:
    return lambda n: nio.recv_exact(sock, n)
