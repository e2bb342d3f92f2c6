"""The outbound connection: resolve, apply the destination rules, connect from the egress address.

The rules see exactly the addresses that will be dialled (the literal, or
every address the name resolved to), so there is no gap between what was
checked and what is connected.  Every failure becomes a `Refused` carrying the
truthful SOCKS5 reply code.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable

from gevent.socket import getaddrinfo

from ..core import nio, outcome
from ..core.names import Host, IPAddress, format_hostport, unmapped
from ..core.netutil import Endpoint
from . import protocol as p
from .acl import DestPolicy
from .egress import EgressPool
from .loopguard import OwnAddresses

Resolver = Callable[[str, int], list[IPAddress]]


_ERRNO_REPLIES = {
    errno.ECONNREFUSED: (p.CONNECTION_REFUSED, outcome.DEST_REFUSED),
    errno.ENETUNREACH: (p.NETWORK_UNREACHABLE, outcome.DEST_UNREACHABLE),
    errno.EHOSTUNREACH: (p.HOST_UNREACHABLE, outcome.DEST_UNREACHABLE),
    errno.EHOSTDOWN: (p.HOST_UNREACHABLE, outcome.DEST_UNREACHABLE),
    errno.ETIMEDOUT: (p.TTL_EXPIRED, outcome.DEST_UNREACHABLE),
    errno.EACCES: (p.NOT_ALLOWED, outcome.DEST_UNREACHABLE),
    errno.EPERM: (p.NOT_ALLOWED, outcome.DEST_UNREACHABLE),
}


class _Deadline(Exception):
    pass


def gevent_resolver(name: str, port: int) -> list[IPAddress]:
    """Addresses for name in resolver order, from gevent's resolver (libc's by default)."""
    out: list[IPAddress] = []
    for info in getaddrinfo(name, port, 0, socket.SOCK_STREAM):
        ip = unmapped(ipaddress.ip_address(info[4][0].split("%")[0]))
        if ip not in out:
            out.append(ip)
    return out


def errno_refusal(exc: OSError, what: str) -> p.Refused:
    code, name = _ERRNO_REPLIES.get(exc.errno or 0, (p.GENERAL_FAILURE, outcome.DEST_UNREACHABLE))
    return p.Refused(code, name, f"{what}: {exc.strerror or exc}")


class Outbound:
    """Opens the connection for one accepted request, or says why not."""

    def __init__(self, policy: DestPolicy, egress: EgressPool, connect_timeout: float,
                 resolver: Resolver = gevent_resolver, own: OwnAddresses | None = None) -> None:
        self.policy = policy
        self.own = own if own is not None else OwnAddresses(())
        self.egress = egress
        self.connect_timeout = connect_timeout or None
        self.resolver = resolver

    def open(self, host: Host, port: int, client: IPAddress, claimed: str | None = None) -> socket.socket:
        """Resolve, check and connect within connect_timeout; raises protocol.Refused.
        `claimed` is a name checked to resolve to the address `host`: the rules see both,
        the connection goes to the address."""
        name = host if isinstance(host, str) else claimed
        self.refuse_name(name, port)
        phase = "resolving"
        try:
            with nio.Deadline(self.connect_timeout, _Deadline):
                addrs = self.resolve(host, port) if isinstance(host, str) else [host]
                self.judge(name, addrs, port)
                phase = "connecting"
                return self._connect_any(addrs, port, client)
        except _Deadline:
            if phase == "resolving":
                raise p.Refused(p.GENERAL_FAILURE, outcome.DEST_UNREACHABLE,
                                f"resolving {name} timed out after {self.connect_timeout:g}s") from None
            raise p.Refused(p.TTL_EXPIRED, outcome.DEST_UNREACHABLE,
                            f"connect to {format_hostport(str(host), port)} timed out after {self.connect_timeout:g}s") from None

    def refuse_name(self, name: str | None, port: int) -> None:
        """Before resolving: Refused when a deny rule matches the name, so it is never looked up."""
        if name is not None:
            denied = self.policy.name_denied(name, port)
            if denied:
                raise p.Refused(p.NOT_ALLOWED, outcome.NOT_ALLOWED, denied)

    def judge(self, name: str | None, addrs: list[IPAddress], port: int) -> None:
        """The loop guard and the destination rules over the addresses about to be used
        (a CONNECT's, or a UDP datagram's); Refused says why not."""
        for ip in addrs:
            if (ip, port) in self.own:
                via = f" ({name} resolves to it)" if name is not None else ""
                raise p.Refused(p.NOT_ALLOWED, outcome.LOOP,
                                f"{format_hostport(str(ip), port)} is this server's listen address{via} (loop)")
        verdict = self.policy.decide(name, addrs, port)
        if not verdict.allowed:
            raise p.Refused(p.NOT_ALLOWED, outcome.NOT_ALLOWED, verdict.reason)

    def addresses(self, name: str) -> list[str]:
        """The name check's resolver: the addresses a connection by that name would go to."""
        return [str(ip) for ip in self.resolver(name, 0)]

    def resolve(self, name: str, port: int) -> list[IPAddress]:
        """The name's addresses in resolver order; Refused when it has none."""
        try:
            addrs = self.resolver(name, port)
        except OSError as exc:
            raise p.Refused(p.GENERAL_FAILURE, outcome.DEST_UNREACHABLE, f"cannot resolve {name}: {exc.strerror or exc}") from None
        if not addrs:
            raise p.Refused(p.GENERAL_FAILURE, outcome.DEST_UNREACHABLE, f"cannot resolve {name}: no address")
        return addrs

    def _connect_any(self, addrs: list[IPAddress], port: int, client: IPAddress) -> socket.socket:
        """Try each address in order; the last failure is the answer.  Out of descriptors,
        the next address would fail the same way: that failure is the answer at once."""
        last: p.Refused | None = None
        for ip in addrs:
            try:
                return self._connect(ip, port, client)
            except p.Refused as exc:
                if exc.outcome == outcome.RESOURCE_EXHAUSTED:
                    raise
                last = exc
        assert last is not None
        raise last

    def _connect(self, ip: IPAddress, port: int, client: IPAddress) -> socket.socket:
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        source = self.egress.source_for(client, ip.version)
        addr = (str(ip), port) if ip.version == 4 else (str(ip), port, 0, 0)
        try:
            return nio.dial(family, addr, None if source is None else str(source), self.egress.interface)
        except nio.ResourceExhausted as exc:
            raise p.Refused(p.GENERAL_FAILURE, outcome.RESOURCE_EXHAUSTED, str(exc)) from None
        except nio.LocalSetupError as exc:
            raise p.Refused(p.GENERAL_FAILURE, outcome.DEST_UNREACHABLE, f"egress {exc.strerror}") from None
        except OSError as exc:
            via = f" from {source}" if source is not None else ""
            raise errno_refusal(exc, f"connect to {format_hostport(str(ip), port)}{via}") from None


def bound_endpoint(sock: socket.socket) -> Endpoint:
    """The outbound socket's local address, told to the client in the reply."""
    host, port = sock.getsockname()[:2]
    return Endpoint(host, port)
