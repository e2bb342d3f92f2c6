"""One SOCKS client connection: negotiate, check, connect, reply, relay, log.

The negotiation (greeting, authentication, request) runs under one deadline,
so a client that trickles bytes cannot hold a connection open.  Each
connection ends with one access-log line in transocks' format, with the
egress socket's local address in the `upstream` field (what a destination's
abuse report will name).
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from ..core import logs, nio, outcome
from ..core.inflight import InFlight
from ..core.namecheck import NameCheck, Verification
from ..core.names import Host, IPAddress, canonical_host, literal_ip
from ..core.netutil import Endpoint, set_keepalive, sockaddr_endpoint
from ..core.relay import Relay
from ..runtime.metrics import ConnectionStats
from ..wire import socks4, socks5
from . import protocol as p
from .acl import ClientFilter
from .credentials import Credentials
from .logins import LoginGate
from .outbound import Outbound, bound_endpoint
from .udp import Association, UdpLimits, declare_metrics

log = logging.getLogger("usocksd")


_READ_AHEAD = 1024  # bytes per recv while negotiating: a whole greeting or request


class _NegotiationTimeout(Exception):
    pass


@dataclass
class Limits:
    """The per-connection deadlines and UDP's limits, from the settings."""

    negotiation_timeout: float
    idle_timeout: float
    half_close_timeout: float
    udp: UdpLimits | None = None  # None: UDP ASSOCIATE is answered 07 (udp = false)


@dataclass
class _Line:
    """What one connection's access-log line will say, filled in as the connection goes."""

    conn_id: str
    client: str
    user: str | None = None
    dest: str = "-"
    host: str | None = None  # the name a CMD_CONNECT_NAMED claimed for dest
    name_match: str | None = None  # "yes" when that name resolves to dest, else "no"
    upstream: str = "-"

    proto: str | None = None  # "udp" for an association; a CONNECT's line has no proto field
    udp: dict[str, Any] | None = None  # an association's counts (`Association.fields`)

    def fields(self, started: float, name: str, reason: str, sent: int, received: int) -> dict[str, Any]:
        """transocks' fields in transocks' order; `user` only after authentication."""
        out: dict[str, Any] = {"id": self.conn_id}
        if self.proto is not None:
            out["proto"] = self.proto
        out["client"] = self.client
        if self.user is not None:
            out["user"] = self.user
        out["dest"] = self.dest
        if self.host is not None:
            out.update(host=self.host, name_match=self.name_match)
        out["upstream"] = self.upstream
        if self.udp is not None:
            out.update(self.udp)
        else:
            out.update(sent=sent, received=received)
        out.update(duration=f"{time.monotonic() - started:.3f}", outcome=name)
        if reason:
            out["reason"] = reason
        return out


class Conversation:
    """The client side of one connection: reads its messages, sends our replies."""

    def __init__(self, sock: socket.socket, credentials: Credentials | None, socks4: bool, logins: LoginGate,
                 client: IPAddress) -> None:
        self.stream = nio.Stream(sock)  # one watcher for the negotiation, then the relay's
        self.credentials = credentials
        self.logins = logins
        self.client = client
        self.socks4 = socks4
        self.version = 0
        self.user: str | None = None
        self.replied = False
        self.no_method = False  # refused at method selection (for the metrics' reason)
        self.named = False  # the client chose NAMED or NAMED_USERPASS: its requests may carry a name
        self._buf = b""  # received, parsed up to _pos
        self._pos = 0

    def read(self, n: int) -> bytes:
        """Exactly n bytes; zero-length fields (an empty user name or domain) read nothing.

        Reads what the client has sent in one recv and parses from that: a
        greeting or request is one recv instead of three.  Bytes a client sends
        after its request without waiting for the reply are `unparsed()`, and
        go to the destination first.
        """
        while len(self._buf) - self._pos < n:
            chunk = self.stream.recv_some(_READ_AHEAD)
            if not chunk:
                raise EOFError(f"connection closed after {len(self._buf) - self._pos} of {n} bytes")
            self._buf = self._buf[self._pos:] + chunk
            self._pos = 0
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def ended(self) -> bool:
        """Whether the client closed where its next message would begin, having sent none of it."""
        if self._pos < len(self._buf):
            return False
        self._buf, self._pos = self.stream.recv_some(_READ_AHEAD), 0
        return not self._buf

    def unparsed(self) -> bytes:
        """What the client sent behind its request."""
        return self._buf[self._pos:]

    def negotiate(self) -> p.Request:
        """Greeting, authentication and request; raises Malformed or Refused."""
        first = self.read(1)[0]
        if first == socks5.VERSION:
            self.version = first
            self._authenticate(p.read_methods(self.read))
            if self.ended():
                raise p.NoRequest("client closed after the method negotiation, before a request")
            return p.read_socks5_request(self.read, self.named)
        if first == p.SOCKS4_VERSION:
            if not self.socks4:
                raise p.Malformed("socks4 request, but socks4 is off")
            self.version = first
            request, userid = p.read_socks4_request(self.read)
            if self.credentials is not None:
                raise p.Refused(p.NOT_ALLOWED, outcome.AUTH_FAILED,
                                f"socks4 request (user id {userid!r}) while auth_file requires a password")
            return request
        raise p.Malformed(f"not a SOCKS request (first byte {first:#04x})")

    def _authenticate(self, methods: bytes) -> None:
        wanted = socks5.USERPASS if self.credentials is not None else socks5.NO_AUTH
        if wanted not in methods:
            self.stream.sendall(p.method_selection(socks5.NO_ACCEPTABLE))
            self.replied = True
            offered = ",".join(f"{m:02x}" for m in methods)
            need = "user/password (02)" if wanted == socks5.USERPASS else "no authentication (00)"
            self.no_method = True
            raise p.Refused(p.NOT_ALLOWED, outcome.AUTH_FAILED, f"client offered methods {offered}, we need {need}")
        if self.credentials is None:
            # A client offering NAMED or PIPELINED learns that this server reads its requests ahead
            # (and, with NAMED, takes a name with the address).
            if socks5.NAMED in methods:
                self.named = True
                self.stream.sendall(p.method_selection(socks5.NAMED))
            else:
                self.stream.sendall(p.method_selection(socks5.PIPELINED if socks5.PIPELINED in methods else wanted))
            return
        self.named = socks5.NAMED_USERPASS in methods
        self.stream.sendall(p.method_selection(socks5.NAMED_USERPASS if self.named else wanted))
        if self.ended():
            raise p.NoRequest("client closed after the method negotiation, before logging in")
        user, password = p.read_userpass(self.read)
        try:
            self.logins.check(self.credentials, user, password, self.client)
        except p.Refused:
            self.replied = True
            self.stream.sendall(p.auth_status(False))
            raise
        self.stream.sendall(p.auth_status(True))
        self.user = user.decode("utf-8", "backslashreplace")

    def succeed(self, bound: Endpoint) -> None:
        self.replied = True
        if self.version == socks5.VERSION:
            self.stream.sendall(p.socks5_reply(p.SUCCEEDED, bound))
        else:
            self.stream.sendall(p.socks4_reply(True, bound))

    def fail(self, code: int) -> str:
        """Send the failure reply once, when the protocol allows one; says which, for the log."""
        if self.replied or not self.version:
            return ""
        self.replied = True
        if self.version == socks5.VERSION:
            message, text = p.socks5_reply(code), f"reply {p.reply_text(code)}"
        else:
            message, text = p.socks4_reply(False), f"reply {p.SOCKS4_REJECTED:02x} {socks4.REPLIES[p.SOCKS4_REJECTED]}"
        try:
            self.stream.sendall(message)
        except OSError:
            return ""
        return text


class SocksHandler:
    """Serves one accepted connection (the runtime's handler); once the tunnel
    is open its relay runs on callbacks (see `InFlight`)."""

    def __init__(self, clients: ClientFilter, outbound: Outbound, credentials: Credentials | None, socks4: bool,
                 limits: Limits, counters: ConnectionStats | None = None, logins: LoginGate | None = None,
                 names: NameCheck | None = None, refuse_mismatch: bool = False) -> None:
        self.clients = clients
        self.names = names or NameCheck(resolver=outbound.addresses)
        self.refuse_mismatch = refuse_mismatch  # dest_name_mismatch = refuse
        self.logins = logins or LoginGate(0, 0.0)
        self.outbound = outbound
        self.credentials = credentials
        self.socks4 = socks4
        self.limits = limits
        self.counters = counters or ConnectionStats()
        self.counters.declare("counter", "acl_refusals", ("reason",),
                              "requests refused by allow_from (client) or the destination policy (destination)")
        self.counters.declare("counter", "auth_failures", ("reason",),
                              "failed logins: wrong credentials, no acceptable method, socks4 without password, "
                              "source limited")
        declare_metrics(self.counters)
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}."
        self._in_flight = InFlight(self._relay_done, self.counters)
        self._access = logging.getLogger(logs.ACCESS_LOGGER)

    def __call__(self, client: socket.socket, peer: tuple) -> None:
        counters = self.counters
        counters.active += 1
        counters.total += 1
        started = time.monotonic()
        src = sockaddr_endpoint(peer)
        line = _Line(self._prefix + str(next(self._ids)), str(src))
        client_ip = literal_ip(src.host) or ipaddress.ip_address(src.host)
        conv = Conversation(client, self.credentials, self.socks4, self.logins, client_ip)
        upstream = None
        relaying = False
        try:
            if not self.clients.allows(client_ip):
                self.counters.count("acl_refusals", ("client",))
                self._finish(line, started, outcome.NOT_ALLOWED, f"client {src.host} is not in allow_from")
                return
            try:
                with nio.Deadline(self.limits.negotiation_timeout or None, _NegotiationTimeout):
                    request = conv.negotiate()
            except _NegotiationTimeout:
                raise p.Malformed(f"negotiation not finished within {self.limits.negotiation_timeout:g}s") from None
            except EOFError as exc:
                raise p.Malformed(f"client closed during negotiation ({exc})") from None
            line.user = conv.user
            line.dest = _show_dest(request)
            if request.command == p.CMD_UDP_ASSOCIATE and request.version == socks5.VERSION and self.limits.udp is not None:
                self._associate(conv, client, client_ip, request, line, started)
                return
            host = self._check_request(request)
            line.dest = str(Endpoint(str(host), request.port))
            name = None if request.name is None else self._judge_name(request.name, host, line)
            upstream = self.outbound.open(host, request.port, client_ip, name)
            bound = bound_endpoint(upstream)
            line.upstream = str(bound)
            conv.succeed(bound)
            set_keepalive(upstream)  # the client's socket has it from the listener
            r = Relay(client, upstream, self.limits.idle_timeout, self.limits.half_close_timeout, conv.unparsed(),
                      watchers=(conv.stream.detach(), None))
            r.context = (line, started)
            self.counters.opened(time.monotonic() - started)
            self._in_flight.start(r)
            relaying = True  # the relay set closes and counts from here on
            self._in_flight.stand_in()
        except outcome.Failure as exc:  # a Refused, or one raised below the outbound (out of descriptors)
            self._count_refusal(exc, conv)
            replied = conv.fail(exc.code if isinstance(exc, p.Refused) else p.GENERAL_FAILURE)
            self._finish(line, started, exc.outcome, f"{exc} ({replied})" if replied else str(exc))
        except p.NoRequest as exc:
            self._finish(line, started, outcome.NO_REQUEST, str(exc))
        except p.Malformed as exc:
            self._finish(line, started, outcome.PROTOCOL_ERROR, str(exc))
        except OSError as exc:
            self._finish(line, started, outcome.RESET, exc.strerror or str(exc))
        finally:
            if not relaying:
                conv.stream.release()
                self._in_flight.let_go(client, upstream)

    def _associate(self, conv: Conversation, client: socket.socket, client_ip: IPAddress, request: p.Request,
                   line: _Line, started: float) -> None:
        """Serve a UDP ASSOCIATE in this greenlet until it ends (its line is written as it ends).

        The request's DST.ADDR is not used (a client behind NAT does not know the
        address it sends from); a non-zero DST.PORT fixes the client's port."""
        limits = self.limits.udp
        assert limits is not None
        line.proto = "udp"
        line.dest = "-"
        try:
            assoc = Association(client, client_ip, request.port, self.outbound, limits.idle_timeout,
                                limits.max_rate, self.outbound.connect_timeout)
        except OSError as exc:
            raise p.Refused(p.GENERAL_FAILURE, outcome.DEST_UNREACHABLE,
                            f"udp relay socket: {exc.strerror or exc}") from None
        try:
            conv.succeed(assoc.bound)
        except BaseException:
            assoc.abort("client gone before the reply")  # closes its sockets; the caller logs the end
            raise
        conv.stream.release()
        self.counters.opened(time.monotonic() - started)
        assoc.on_end = lambda a: self._association_done(a, line, started)
        self._in_flight.hold(assoc)  # a TERM resets it with the relays, and its line is written then
        try:
            assoc.run()
        finally:
            self._in_flight.settle(assoc)

    def _association_done(self, assoc: Association, line: _Line, started: float) -> None:
        """The end of an association (in the hub, or in a stopping worker's abort): its line and counts."""
        assert assoc.result is not None
        name, reason = assoc.result
        assoc.count(self.counters)
        line.dest = assoc.first_destination
        line.upstream = assoc.upstream()
        line.udp = assoc.fields()
        self._finish(line, started, name, reason)

    def _relay_done(self, r: Relay) -> None:
        """The end of a relay (in the hub): its access-log line."""
        result = r.result
        assert result is not None
        line, started = r.context
        self._finish(line, started, result.outcome, result.detail, result.sent, result.received)

    def _count_refusal(self, exc: outcome.Failure, conv: Conversation) -> None:
        """ACL refusals and authentication failures by reason, for the metrics."""
        if exc.outcome == outcome.NOT_ALLOWED:
            self.counters.count("acl_refusals", ("destination",))
        elif exc.outcome == outcome.AUTH_LIMITED:
            self.counters.count("auth_failures", ("limited",))
        elif exc.outcome == outcome.AUTH_FAILED:
            if conv.version == p.SOCKS4_VERSION:
                why = "socks4"
            elif conv.no_method:
                why = "method"
            else:
                why = "credentials"
            self.counters.count("auth_failures", (why,))

    def _check_request(self, request: p.Request) -> Host:
        """The canonical destination of a CONNECT, or Refused."""
        if request.command != socks5.CMD_CONNECT:
            name = p.COMMANDS.get(request.command, f"{request.command:#04x}")
            raise p.Refused(p.COMMAND_NOT_SUPPORTED, outcome.PROTOCOL_ERROR, f"command {name} not supported")
        try:
            host = canonical_host(request.host)
        except ValueError as exc:
            raise p.Refused(p.GENERAL_FAILURE, outcome.PROTOCOL_ERROR, str(exc)) from None
        if request.port == 0:
            raise p.Refused(p.GENERAL_FAILURE, outcome.PROTOCOL_ERROR, "destination port 0")
        return host

    def _judge_name(self, claimed: str, host: Host, line: _Line) -> str | None:
        """The name of a named CONNECT when the address asked for is among its addresses
        (the rules then see both); otherwise None (judged by the address alone), or
        Refused under dest_name_mismatch = refuse.  The connection goes to the address."""
        try:
            name = canonical_host(claimed)
        except ValueError:
            name = None
        if not isinstance(name, str):
            raise p.Refused(p.GENERAL_FAILURE, outcome.PROTOCOL_ERROR, f"named connect with a bad name {claimed[:255]!r}")
        line.host = name
        matched = self.names.check(name, str(host)) is Verification.VERIFIED
        line.name_match = "yes" if matched else "no"
        if matched:
            return name
        if self.refuse_mismatch:
            raise p.Refused(p.NOT_ALLOWED, outcome.NOT_ALLOWED,
                            f"{name} does not resolve to {host} (dest_name_mismatch = refuse)")
        return None

    def _finish(self, line: _Line, started: float, name: str, reason: str, sent: int = 0, received: int = 0) -> None:
        """The access-log line; refusals also go to the error log at info level (a limited
        client's only once, by the limit).  A connection without a request (a health check,
        every few seconds from every transocks worker) is counted, and has its access-log
        line only at log_level debug."""
        self.counters.finished(name, sent, received)
        if name == outcome.NO_REQUEST and not log.isEnabledFor(logging.DEBUG):
            return
        if not self._access.disabled:  # building the line is a large share of a short connection's cost
            logs.access(line.fields(started, name, reason, sent, received))
        if name not in (outcome.OK, outcome.RESET, outcome.IDLE_TIMEOUT, outcome.AUTH_LIMITED, outcome.NO_REQUEST):
            log.info("%s client=%s dest=%s: %s", name, line.client, line.dest, reason)


def _show_dest(request: p.Request) -> str:
    """The destination as requested, for the log when it cannot be canonicalised: control
    characters escaped, so a client cannot forge lines in the error log."""
    host = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in request.host[:255])
    return str(Endpoint(host, request.port))
