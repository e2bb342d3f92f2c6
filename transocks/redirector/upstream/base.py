"""What every upstream dialer shares: the proxy URL, errors with outcomes, deadlines."""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from ...core import nio, outcome
from ...core.netutil import Endpoint, format_hostport
from ...core.nio import Deadline, Stream
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


class _Expired(Exception):
    """Thrown into the dialing greenlet by its deadline."""


# A refusal that a fast-open connect reports at the first send or receive.
CONNECT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT})


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
    """Opens a tunnel to a destination: TCP connect, then the scheme's handshake.

    The proxy's socket addresses are worked out once (a member's host is an
    IP literal, discovery resolved it), and one timer covers the connect and
    then the handshake.
    """

    def __init__(self, url: ProxyURL, connect_timeout: float = 5.0, handshake_timeout: float = 10.0,
                 fastopen: bool = False) -> None:
        self.url = url
        self.connect_timeout = connect_timeout or None
        self.handshake_timeout = handshake_timeout or None
        self.fastopen = fastopen
        self.addrs = nio.literal_addresses(url.host, url.port, 0) if url.host else None

    @property
    def upstream(self) -> Endpoint | None:
        """The proxy's address, or None when dialing destinations directly."""
        return self.url.endpoint

    def __str__(self) -> str:
        return str(self.url)

    def dial(self, dest: Endpoint, wire: bytes | None = None) -> Stream:
        """A tunnel to `dest` (an IP literal, or a name the proxy resolves); `wire`,
        when given, is dest as SOCKS5 encodes it.  The stream's `extra` holds tunnel
        bytes that came with the last reply."""
        return self._negotiate(lambda stream: self.handshake(stream, dest, wire))

    def probe(self, target: Endpoint | None) -> None:
        """Health check: a whole tunnel to `target`, or without one, the TCP connect and
        what the scheme can check without a destination (SOCKS5: greeting and login)."""
        if target is not None:
            self.dial(target).close()
        else:
            self._negotiate(self.greet).close()

    def greet(self, stream: Stream) -> None:
        """The part of the handshake that needs no destination; none for most schemes."""

    def _negotiate(self, handshake: Callable[[Stream], None]) -> Stream:
        deadline = nio.PhasedDeadline(self.connect_timeout, self.handshake_timeout, _Expired)
        stream = None
        try:
            stream = nio.connect_stream(self.addrs or nio.resolve(self.url.host, self.url.port), self.fastopen)
            deadline.advance()
            handshake(stream)
            return stream
        except BaseException as exc:
            if stream is not None:
                stream.close()
            failure = self._failure(exc, deadline.phase)
            if failure is exc:
                raise
            raise failure from None
        finally:
            deadline.close()

    def _failure(self, exc: BaseException, phase: int) -> BaseException:
        """What a failed dial is, named for the log and the pool's failover (exc itself when it
        already says: an outcome, or something that is not a dial's failure); `phase` 0 is
        the connect, 1 the handshake."""
        where = format_hostport(self.url.host, self.url.port)
        if isinstance(exc, _Expired):
            if phase == 0:
                return UpstreamError(outcome.UPSTREAM_TIMEOUT,
                                     f"connect to upstream {where} timed out after {self.connect_timeout:g}s")
            return UpstreamError(outcome.UPSTREAM_TIMEOUT,
                                 f"{self.url.scheme} handshake timed out after {self.handshake_timeout:g}s")
        if isinstance(exc, EOFError):
            return ProtocolError(f"{self.url.scheme} upstream closed during handshake: {exc}")
        if isinstance(exc, OSError):
            # With fast open a refused connect shows at the first send or receive.
            if phase == 0 or (self.fastopen and exc.errno in CONNECT_ERRNOS):
                return UpstreamError(outcome.UPSTREAM_UNREACHABLE, f"connect to upstream {where}: {exc.strerror or exc}")
            return ProtocolError(f"{self.url.scheme} handshake failed: {exc.strerror or exc}")
        return exc

    def connect(self, host: str, port: int) -> Stream:
        """TCP connect to a destination within connect_timeout, with errors named for the log."""
        try:
            with Deadline(self.connect_timeout, _Expired):
                return nio.connect_stream(nio.resolve(host, port))
        except _Expired:
            raise UpstreamError(outcome.DEST_UNREACHABLE, f"connect to destination {format_hostport(host, port)} "
                                f"timed out after {self.connect_timeout:g}s") from None
        except OSError as exc:
            kind = outcome.DEST_REFUSED if exc.errno == errno.ECONNREFUSED else outcome.DEST_UNREACHABLE
            reason = exc.strerror or str(exc)
            raise UpstreamError(kind, f"connect to destination {format_hostport(host, port)}: {reason}") from None

    def handshake(self, stream: Stream, dest: Endpoint, wire: bytes | None = None) -> None:
        raise NotImplementedError


def reader(stream: Stream) -> Reader:
    return stream.recv_exact
