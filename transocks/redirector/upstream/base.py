"""What every upstream dialer shares: the proxy URL, errors with outcomes, deadlines."""

from __future__ import annotations

import errno
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from gevent.hub import Waiter

from ...core import nio, outcome
from ...core.names import canonical_host, format_hostport
from ...core.netutil import Endpoint
from ...core.nio import Stream
from ...wire import ProtocolError
from .dial import Dial, Expired, Handshake, Steps


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
    host = parts.hostname
    if "%" not in host:  # a scoped IPv6 address is the kernel's to check
        try:
            host = str(canonical_host(host))
        except ValueError as exc:
            raise ValueError(f"bad host in proxy URL: {exc}") from None
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise ValueError(f"bad port in proxy URL: {exc}") from None
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    for label, value in (("user name", user), ("password", password)):
        if value is not None and not 0 < len(value.encode()) <= 255:
            raise ValueError(f"proxy {label} must be 1-255 bytes")
    return ProxyURL("socks5" if scheme == "socks5h" else scheme, host, port, user, password)


class Claim(NamedTuple):
    """The name a client sent for its destination (SNI, Host), and whether it was verified here."""

    name: str
    verified: bool


class Dialer:
    """Opens a tunnel to a destination: TCP connect, then the scheme's handshake.

    The proxy's socket addresses are worked out once (a member's host is an
    IP literal, discovery resolved it), and one timer covers the connect and
    then the handshake.  `begin` runs the dial on callbacks (the handler's
    way); `dial` and `probe` wait for it in the calling greenlet.
    """

    names = False  # whether the member checks a claimed name against the address itself (usocksd's NAMED)

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

    def begin(self, dest: Endpoint, wire: bytes | None, on_done: Callable[[Dial], None],
              claim: Claim | None = None) -> Dial:
        """Start a tunnel to `dest` (an IP literal, or a name the proxy resolves); `wire`,
        when given, is dest as SOCKS5 encodes it; `claim`, the client's name for it, for a
        scheme that can carry both.  `on_done(dial)` gets the result, possibly before this
        returns."""
        addrs = self.addrs_for(dest)
        if not addrs:  # the handler's path never has a name to resolve: discovery did that
            return Dial.refused(self, UpstreamError(outcome.UPSTREAM_UNREACHABLE,
                                                    f"{self.connect_to(dest)} is not an address"), on_done)
        d = Dial(self, addrs, self.handshake(dest, wire, claim), on_done)
        d.start()
        return d

    def dial(self, dest: Endpoint, wire: bytes | None = None) -> Stream:
        """`begin`, waited for: the stream's `extra` holds tunnel bytes that came with the last reply."""
        return self._wait(self.target_addrs(dest), self.handshake(dest, wire))

    def probe(self, target: Endpoint | None) -> None:
        """Health check: a whole tunnel to `target`, or without one, the TCP connect and
        what the scheme can check without a destination (SOCKS5: greeting and login)."""
        if target is not None:
            self.dial(target).close()
        else:
            self._wait(self.target_addrs(None), self.greet()).close()

    def connect_to(self, dest: Endpoint | None) -> Endpoint:
        """Where the TCP connect goes: the proxy."""
        return self.url.endpoint

    def addrs_for(self, dest: Endpoint | None) -> list[tuple[int, tuple]] | None:
        """connect_to's socket addresses when it is an IP literal, else None."""
        return self.addrs

    def target_addrs(self, dest: Endpoint | None) -> list[tuple[int, tuple]]:
        """connect_to's socket addresses, resolved in this greenlet if it is a name."""
        addrs = self.addrs_for(dest)
        if addrs is None:
            ep = self.connect_to(dest)
            addrs = nio.resolve(ep.host, ep.port)
        return addrs

    def handshake(self, dest: Endpoint, wire: bytes | None = None, claim: Claim | None = None) -> Steps | None:
        """The scheme's request for a tunnel to dest (only SOCKS5 to usocksd uses a claim)."""
        raise NotImplementedError

    def greet(self) -> Handshake | None:
        """The part of the handshake that needs no destination; none for most schemes."""
        return None

    def _wait(self, addrs: list[tuple[int, tuple]], handshake: Steps | None) -> Stream:
        waiter = Waiter()
        d = Dial(self, addrs, handshake, waiter.switch)
        d.start()
        try:
            waiter.get()
        except BaseException:
            d.cancel()
            raise
        if d.error is not None:
            raise d.error
        return d.stream()

    def failure(self, exc: BaseException, negotiating: bool, where: str) -> BaseException:
        """What a failed dial is, named for the log and the pool's failover (exc itself when it
        already says: an outcome, or something that is not a dial's failure); `negotiating`
        says the connect to `where` had succeeded."""
        if isinstance(exc, Expired):
            if not negotiating:
                return UpstreamError(outcome.UPSTREAM_TIMEOUT,
                                     f"connect to upstream {where} timed out after {self.connect_timeout:g}s")
            return UpstreamError(outcome.UPSTREAM_TIMEOUT,
                                 f"{self.url.scheme} handshake timed out after {self.handshake_timeout:g}s")
        if isinstance(exc, EOFError):
            return ProtocolError(f"{self.url.scheme} upstream closed during handshake: {exc}")
        if isinstance(exc, OSError):
            # With fast open a refused connect shows at the first send or receive.
            if not negotiating or (self.fastopen and exc.errno in CONNECT_ERRNOS):
                return UpstreamError(outcome.UPSTREAM_UNREACHABLE, f"connect to upstream {where}: {exc.strerror or exc}")
            return ProtocolError(f"{self.url.scheme} handshake failed: {exc.strerror or exc}")
        return exc


def receive(buf: bytes, what: str, out: bytes = b"") -> Generator[bytes, bytes, bytes]:
    """In a handshake: send `out`, then `buf` with the next bytes that arrive after it."""
    chunk = yield out
    if not chunk:
        raise EOFError(f"connection closed after {len(buf)} bytes of the {what}")
    return buf + chunk


def at_least(buf: bytes, n: int, what: str, out: bytes = b"") -> Generator[bytes, bytes, bytes]:
    """In a handshake: send `out` (if any), then receive until `buf` holds n bytes."""
    if out or len(buf) < n:
        buf = yield from receive(buf, what, out)
    while len(buf) < n:
        buf = yield from receive(buf, what)
    return buf
