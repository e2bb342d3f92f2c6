"""One redirected connection: recover its destination, refuse loops, dial, relay, log."""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import socket
import time
from typing import Iterable

import psutil

from . import logs, outcome
from .netutil import Endpoint, close_quietly, close_with_reset, set_keepalive, sockaddr_endpoint
from .origdst import NotRedirected, original_destination
from .relay import relay
from .upstream import Dialer, UpstreamError

log = logging.getLogger("transocks")


class Counters:
    """Live numbers for the process title and the master."""

    __slots__ = ("active", "total")

    def __init__(self) -> None:
        self.active = 0
        self.total = 0


def local_addresses() -> set[str]:
    """Every address of this network namespace (for wildcard listeners)."""
    out = {"127.0.0.1", "::1"}
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                out.add(a.address.split("%")[0])
    return out


class LoopGuard:
    """Says whether a destination would bring the connection back to us.

    A destination equal to one of our listen addresses (a wildcard listener
    covers every local address on its port) or to the upstream proxy itself
    (its connection was redirected back here) is a loop.
    """

    def __init__(self, listens: Iterable[Endpoint], upstream: Endpoint | None) -> None:
        self.exact: set[tuple[str, int]] = set()
        self.any_port: set[int] = set()
        for ep in listens:
            if ipaddress.ip_address(ep.host).is_unspecified:
                self.any_port.add(ep.port)
            else:
                self.exact.add((_norm(ep.host), ep.port))
        if upstream is not None:
            self.exact.add((_norm(upstream.host), upstream.port))
        self.local = local_addresses() if self.any_port else set()

    def is_loop(self, dest: Endpoint) -> bool:
        host = _norm(dest.host)
        if (host, dest.port) in self.exact:
            return True
        return dest.port in self.any_port and host in self.local


def _norm(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower()
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


class TransparentHandler:
    """Serves one accepted connection from a REDIRECT rule."""

    def __init__(self, dialer: Dialer, listens: Iterable[Endpoint], idle_timeout: float, half_close_timeout: float, counters: Counters | None = None) -> None:
        self.dialer = dialer
        self.guard = LoopGuard(listens, dialer.upstream)
        self.idle_timeout = idle_timeout
        self.half_close_timeout = half_close_timeout
        self.counters = counters or Counters()
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}."

    def __call__(self, client: socket.socket, peer: tuple) -> None:
        counters = self.counters
        counters.active += 1
        counters.total += 1
        conn_id = self._prefix + str(next(self._ids))
        started = time.monotonic()
        src = sockaddr_endpoint(peer)
        fields = {"id": conn_id, "client": str(src), "dest": "-", "upstream": str(self.dialer)}
        upstream = None
        try:
            try:
                dest = original_destination(client, peer)
            except NotRedirected as exc:
                self._refuse(client, fields, outcome.LOOP, f"not redirected: {exc.strerror}", started)
                return
            fields["dest"] = str(dest)
            if self.guard.is_loop(dest):
                self._refuse(client, fields, outcome.LOOP, f"destination {dest} is this proxy (redirect loop)", started)
                return
            try:
                upstream = self.dialer.dial(dest)
            except UpstreamError as exc:
                self._refuse(client, fields, exc.outcome, str(exc), started)
                return
            set_keepalive(client)
            set_keepalive(upstream)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            result = relay(client, upstream, self.idle_timeout, self.half_close_timeout)
            fields.update(sent=result.sent, received=result.received, duration=_elapsed(started), outcome=result.outcome)
            if result.detail:
                fields["reason"] = result.detail
            logs.access(fields)
        except OSError as exc:
            # e.g. the client reset before we could set options on its socket.
            fields.update(sent=0, received=0, duration=_elapsed(started), outcome=outcome.RESET, reason=exc.strerror or str(exc))
            logs.access(fields)
            close_with_reset(client)
        finally:
            close_quietly(upstream)
            close_quietly(client)
            counters.active -= 1

    def _refuse(self, client: socket.socket, fields: dict, name: str, reason: str, started: float) -> None:
        """Reset the client so it learns the connection failed, and say why."""
        close_with_reset(client)
        log.warning("%s client=%s dest=%s: %s", name, fields["client"], fields["dest"], reason)
        fields.update(sent=0, received=0, duration=_elapsed(started), outcome=name, reason=reason)
        logs.access(fields)


def _elapsed(started: float) -> str:
    return f"{time.monotonic() - started:.3f}"
