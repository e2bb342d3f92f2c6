"""UDP ASSOCIATE (RFC 1928 section 7): one association, from the request's reply to its access-log line.

Two kinds of socket, because the address a client reaches usocksd on is
usually not the address its traffic should leave from:

  the relay socket    bound on the address the client's TCP connection reached
                      (port chosen by the kernel): the reply's BND.ADDR/PORT,
                      where the client sends its datagrams and gets the answers;
  the egress sockets  one per destination family, made on first use, bound on
                      the address the client's consistent hash chooses
                      (`EgressPool.source_for`, the one its CONNECTs leave
                      from), so a protocol pairing TCP and UDP sees one source.

Datagrams are taken only from the client's IP address (and port: the one the
request named, else the first datagram's); each destination is judged by
`Outbound`'s rules, the same as a CONNECT's, and the verdict is kept for the
association (a name is resolved once, by the association's greenlet, while
datagrams for it wait in a short queue).  Replies are taken only from an
address and port the client has sent to (address and port-dependent
filtering, as a strict NAT does) and go back with the header of their source.
FRAG != 0 is dropped (no reassembly, which RFC 1928 allows).  Each direction
has a token bucket of `udp_max_rate` datagrams a second, so the edge cannot
be used to amplify.

The I/O runs in watcher callbacks in the hub; the handler's greenlet waits
for the end, resolving names when asked, so a graceful stop sees the
association as a connection in flight.  The association ends when its TCP
control connection does (EOF or reset), after `udp_idle_timeout` without a
datagram forwarded either way, or when the worker stops.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gevent import GreenletExit
from gevent.hub import Waiter, get_hub

from ..core import nio, outcome
from ..core.names import Host, IPAddress, canonical_host, format_hostport, literal_ip
from ..core.netutil import Endpoint, close_with_reset, sockaddr_endpoint
from ..runtime.metrics import ConnectionStats
from ..wire import ProtocolError, socks5
from . import protocol as p
from .outbound import Outbound

log = logging.getLogger("usocksd")

_READ = 1
_BURST = 64  # datagrams read per callback before letting other associations run
_DATAGRAM_MAX = 65536  # a UDP payload is at most 65,507 (IPv4) or 65,527 (IPv6) bytes
_PENDING_MAX = 32  # datagrams waiting for their destination's name to resolve
_VERDICTS_MAX = 4096  # destinations judged and kept per association; more start the cache over
_PEERS_MAX = 4096  # destinations a reply is taken from; the oldest goes first
_DESTINATIONS_COUNTED = 65536  # distinct destinations counted for the access log (dests= says "at least" beyond)

# Why a datagram was dropped: the label of usocksd_udp_dropped and the access log's drops= field.
FOREIGN = "foreign"  # not from the associating client's address (and port)
MALFORMED = "malformed"  # not one whole SOCKS5 UDP header, or destination port 0
FRAGMENT = "fragment"  # FRAG != 0
NOT_ALLOWED = "not_allowed"  # the destination rules refused the destination
UNRESOLVED = "unresolved"  # the name has no address, or its lookup failed
RATE = "rate"  # over udp_max_rate
UNSOLICITED = "unsolicited"  # a reply from an address and port the client never sent to
QUEUE = "queue"  # too many datagrams waiting for names to resolve, or still waiting at the end
SEND_FAILED = "send_failed"  # the kernel would not take it (a full buffer, no route)
DROP_REASONS = (FOREIGN, MALFORMED, FRAGMENT, NOT_ALLOWED, UNRESOLVED, RATE, UNSOLICITED, QUEUE, SEND_FAILED)

# The association's states.
OPEN = "open"
ENDED = "ended"


class _Buffer(threading.local):
    """One receive buffer per worker thread (tests run hubs in several threads)."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(_DATAGRAM_MAX))


_buf = _Buffer()


def declare_metrics(counters: ConnectionStats) -> None:
    """usocksd_udp_* families, counted when an association ends."""
    counters.declare("counter", "udp_associations", ("outcome",), "UDP associations that ended, by outcome")
    counters.declare("counter", "udp_datagrams", ("direction",),
                     "UDP datagrams relayed: sent is client to destination, received the other way")
    counters.declare("counter", "udp_bytes", ("direction",), "UDP payload bytes relayed, by direction")
    counters.declare("counter", "udp_dropped", ("reason",), "UDP datagrams dropped, by reason")


@dataclass(frozen=True)
class UdpLimits:
    """`udp_idle_timeout` and `udp_max_rate`, from the settings."""

    idle_timeout: float
    max_rate: int


class TokenBucket:
    """`rate` datagrams a second with a burst of one second's worth; rate 0 takes everything."""

    __slots__ = ("rate", "stamp", "tokens")

    def __init__(self, rate: int, now: float) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.stamp = now

    def take(self, now: float) -> bool:
        if not self.rate:
            return True
        self.tokens = min(float(self.rate), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class Association:
    """One UDP association; `run()` serves it in the calling greenlet and returns when it ends.

    `result` is (outcome, reason) once it has ended, and `on_end(self)` is
    called right then (also from a stopping worker's `abort`, which does not
    wait for the greenlet); the relay and egress sockets are closed then, the
    control socket is left to its owner (reset when the association was aborted).
    """

    def __init__(self, control: socket.socket, client: IPAddress, client_port: int, outbound: Outbound,
                 idle_timeout: float, max_rate: int, resolve_timeout: float | None) -> None:
        self.control = control
        self.client = client
        self.client_host = str(client)
        self.client_port = client_port  # 0 until the request or the first datagram fixes it
        self.outbound = outbound
        self.idle_timeout = idle_timeout
        self.resolve_timeout = resolve_timeout
        self.state = OPEN
        self.result: tuple[str, str] | None = None
        self.relay = self._relay_socket()
        host, port = self.relay.getsockname()[:2]
        self.bound = Endpoint(host, port)
        self.egress: dict[int, socket.socket] = {}  # by IP version
        self.egress_failed: dict[int, str] = {}
        self.egress_shown: dict[int, str] = {}  # their local ip:port, for the log line after they close
        self.loop: Any = get_hub().loop
        now = self.loop.now()
        self.buckets = (TokenBucket(max_rate, now), TokenBucket(max_rate, now))  # out, back
        self.last_activity = now
        self.datagrams = [0, 0]  # sent (client -> destinations), received
        self.bytes = [0, 0]
        self.dropped: dict[str, int] = {}
        self.destinations: set[tuple[bytes, int]] = set()
        self.first_destination = "-"  # the access log's dest=: where the first datagram went
        self.peers: dict[tuple[bytes, int], None] = {}  # (packed ip, port) the client sent to, oldest first
        self.verdicts: dict[tuple[str, int], IPAddress | tuple[str, str]] = {}  # by the host as sent: an address, or (drop reason, why)
        self.names: dict[str, list[IPAddress] | str] = {}  # resolved once: the addresses, or why none
        self.pending: list[tuple[str, int, bytes]] = []  # (name, port, payload) waiting for the name
        self.watchers: dict[socket.socket, Any] = {}
        self.timer: Any = None
        self.waiter: Waiter | None = None
        self.on_end: Callable[[Association], None] | None = None  # called once as it ends, wherever that happens

    # --- set-up --------------------------------------------------------------

    def _relay_socket(self) -> socket.socket:
        """A UDP socket on the address the client's TCP connection reached, any port."""
        local = self.control.getsockname()
        ip = literal_ip(local[0].split("%")[0])
        family = socket.AF_INET if ip is not None and ip.version == 4 else socket.AF_INET6
        addr: tuple = (str(ip), 0) if family == socket.AF_INET else (local[0], 0, 0, local[3])
        sock = _udp_socket(family)
        try:
            sock.bind(addr)
        except OSError:
            sock.close()
            raise
        return sock

    def _egress_socket(self, version: int) -> socket.socket | None:
        """The family's egress socket, bound on the client's egress address (made on first use)."""
        sock = self.egress.get(version)
        if sock is not None or version in self.egress_failed:
            return sock
        pool = self.outbound.egress
        source = pool.source_for(self.client, version)
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        try:
            sock = _udp_socket(family)
        except p.Refused as exc:
            self.egress_failed[version] = str(exc)
            return None
        try:
            if pool.interface:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, pool.interface.encode())
            sock.bind(("" if source is None else str(source), 0))
        except OSError as exc:
            sock.close()
            self.egress_failed[version] = f"egress {source or 'socket'}: {exc.strerror or exc}"
            log.warning("udp association of %s: cannot bind its IPv%d egress socket: %s",
                        self.client_host, version, self.egress_failed[version])
            return None
        self.egress[version] = sock
        host, port = sock.getsockname()[:2]
        self.egress_shown[version] = format_hostport(host.split("%")[0], port)
        self._watch(sock, self._on_egress)
        return sock

    def _watch(self, sock: socket.socket, callback: Callable[[socket.socket], None]) -> None:
        w = self.loop.io(sock.fileno(), _READ)
        self.watchers[sock] = w
        w.start(callback, sock)

    # --- the association's greenlet -----------------------------------------

    def run(self) -> tuple[str, str]:
        """Serve until the end; resolves names for the callbacks in between."""
        try:
            self._watch(self.relay, self._on_client)
            self._watch(self.control, self._on_control)
            self._arm_timer()
            while self.state is OPEN:
                if self.pending:
                    self._resolve_next()
                    continue
                self.waiter = Waiter()
                self.waiter.get()
        except GreenletExit:
            self.abort("worker stopped before the association ended", outcome.SHUTDOWN)
            raise
        except BaseException as exc:  # noqa: BLE001 - an association must end with its line
            log.error("udp association of %s failed", self.client_host, exc_info=True)
            self.abort(f"internal error: {exc!r}", outcome.RESET)
        assert self.result is not None
        return self.result

    def _wake(self) -> None:
        """Let the greenlet look again (from a callback, or from a signal handler's greenlet)."""
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            self.loop.run_callback(waiter.switch, None)

    def _resolve_next(self) -> None:
        """Resolve the first waiting datagram's name, judge it, and send what waited for it."""
        name = canonical_host(self.pending[0][0])
        assert isinstance(name, str)
        if len(self.names) >= _VERDICTS_MAX:
            self.names.clear()
            self.verdicts.clear()  # a verdict by name reads its entry here
        try:
            with nio.Deadline(self.resolve_timeout, _ResolveTimeout):
                self.names[name] = self.outbound.resolve(name, 0)
        except _ResolveTimeout:
            self.names[name] = f"resolving {name} timed out after {self.resolve_timeout:g}s"
        except p.Refused as exc:
            self.names[name] = str(exc)
        if self.state is not OPEN:
            return
        waiting, self.pending = self.pending, []
        for pending_name, port, payload in waiting:
            self._forward(pending_name, port, payload)

    # --- callbacks (in the hub: they must not raise) ---------------------------

    def _on_client(self, sock: socket.socket) -> None:
        """Datagrams from the client's side of the relay socket."""
        try:
            for _ in range(_BURST):
                try:
                    n, peer = sock.recvfrom_into(_buf.view)
                except BlockingIOError:
                    return
                except OSError:
                    continue  # an ICMP error queued on the socket: the next datagram may be fine
                if self.state is not OPEN:
                    return
                self._from_client(bytes(_buf.view[:n]), peer)
        except BaseException:  # noqa: BLE001 - a callback must not raise into libev
            self._fail()

    def _from_client(self, data: bytes, peer: tuple) -> None:
        host = sockaddr_endpoint(peer).host
        if host.split("%")[0] != self.client_host or (self.client_port and peer[1] != self.client_port):
            self._drop(FOREIGN)
            return
        try:
            frag, dest, offset = socks5.parse_udp_datagram(data)
        except ProtocolError:
            self._drop(MALFORMED)
            return
        if not self.client_port:  # the first well-formed datagram fixes the client's port
            self.client_port = peer[1]
        if frag:
            self._drop(FRAGMENT)
            return
        if not dest.port:
            self._drop(MALFORMED)
            return
        if not self.buckets[0].take(self.loop.now()):
            self._drop(RATE)
            return
        self._forward(dest.host, dest.port, data[offset:])

    def _forward(self, host_text: str, port: int, payload: bytes) -> None:
        """Judge the destination (once per association) and send the payload there."""
        verdict = self.verdicts.get((host_text, port))
        if verdict is None:
            try:
                host = canonical_host(host_text)
            except ValueError:
                self._drop(MALFORMED)
                return
            if isinstance(host, str) and host not in self.names:
                self._wait_for_name(host_text, host, port, payload)
                return
            verdict = self._judge(host_text, host, port)
        if isinstance(verdict, tuple):
            self._drop(verdict[0])
            return
        self._send_out(verdict, port, payload)

    def _wait_for_name(self, host_text: str, name: str, port: int, payload: bytes) -> None:
        """Queue the datagram for the greenlet to resolve its name; a denied name is never looked up."""
        try:
            self.outbound.refuse_name(name, port)
        except p.Refused as exc:
            self._remember(host_text, port, (NOT_ALLOWED, str(exc)))
            self._drop(NOT_ALLOWED)
            return
        if len(self.pending) >= _PENDING_MAX:
            self._drop(QUEUE)
            return
        self.pending.append((host_text, port, payload))
        self._wake()

    def _judge(self, host_text: str, host: Host, port: int) -> IPAddress | tuple[str, str]:
        """The address to send to, or (drop reason, why) for a destination refused or unresolved."""
        name = host if isinstance(host, str) else None
        if name is not None:
            addrs = self.names[name]
            if isinstance(addrs, str):
                return self._remember(host_text, port, (UNRESOLVED, addrs))
        else:
            addrs = [host]  # type: ignore[list-item]
        try:
            self.outbound.refuse_name(name, port)
            self.outbound.judge(name, addrs, port)
        except p.Refused as exc:
            return self._remember(host_text, port, (NOT_ALLOWED, str(exc)))
        return self._remember(host_text, port, addrs[0])

    def _remember(self, host_text: str, port: int, verdict: IPAddress | tuple[str, str]) -> IPAddress | tuple[str, str]:
        if len(self.verdicts) >= _VERDICTS_MAX:
            self.verdicts.clear()
        self.verdicts[(host_text, port)] = verdict
        return verdict

    def _send_out(self, ip: IPAddress, port: int, payload: bytes) -> None:
        sock = self._egress_socket(ip.version)
        if sock is None:
            self._drop(SEND_FAILED)
            return
        try:
            sock.sendto(payload, (str(ip), port))
        except OSError:
            self._drop(SEND_FAILED)
            return
        key = (ip.packed, port)
        if not self.destinations:
            self.first_destination = format_hostport(str(ip), port)
        if len(self.destinations) < _DESTINATIONS_COUNTED:
            self.destinations.add(key)
        self.peers.pop(key, None)
        self.peers[key] = None
        if len(self.peers) > _PEERS_MAX:
            del self.peers[next(iter(self.peers))]
        self.datagrams[0] += 1
        self.bytes[0] += len(payload)
        self.last_activity = self.loop.now()

    def _on_egress(self, sock: socket.socket) -> None:
        """Replies from the Internet: from a peer the client sent to, wrapped and passed back."""
        try:
            family = sock.family
            for _ in range(_BURST):
                try:
                    n, peer = sock.recvfrom_into(_buf.view)
                except BlockingIOError:
                    return
                except OSError:
                    continue
                if self.state is not OPEN:
                    return
                host = peer[0].split("%")[0]
                if (socket.inet_pton(family, host), peer[1]) not in self.peers:
                    self._drop(UNSOLICITED)
                    continue
                if not self.buckets[1].take(self.loop.now()):
                    self._drop(RATE)
                    continue
                header = b"\0\0\0" + socks5.encode_address(Endpoint(host, peer[1]))
                try:
                    self.relay.sendto(header + _buf.view[:n], (self.client_host, self.client_port))
                except OSError:
                    self._drop(SEND_FAILED)
                    continue
                self.datagrams[1] += 1
                self.bytes[1] += n
                self.last_activity = self.loop.now()
        except BaseException:  # noqa: BLE001 - a callback must not raise into libev
            self._fail()

    def _on_control(self, sock: socket.socket) -> None:
        """The TCP control connection: its end is the association's.  Bytes on it mean
        nothing in RFC 1928; they are read and discarded."""
        try:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                return
            except OSError as exc:
                self._end(outcome.RESET, f"control connection: {exc.strerror or exc}")
                return
            if not data:
                self._end(outcome.OK, "")
        except BaseException:  # noqa: BLE001 - a callback must not raise into libev
            self._fail()

    def _on_timer(self) -> None:
        try:
            idle = self.loop.now() - self.last_activity
            if idle >= self.idle_timeout - 0.001:
                self._end(outcome.IDLE_TIMEOUT, f"no datagram either way for {self.idle_timeout:g}s")
                return
            self.timer.close()
            self.timer = self.loop.timer(self.idle_timeout - idle)
            self.timer.start(self._on_timer)
        except BaseException:  # noqa: BLE001 - a callback must not raise into libev
            self._fail()

    def _arm_timer(self) -> None:
        if self.idle_timeout:
            self.timer = self.loop.timer(self.idle_timeout)
            self.timer.start(self._on_timer)

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    # --- the end -------------------------------------------------------------

    def abort(self, detail: str, name: str = outcome.RESET) -> None:
        """End now and reset the control connection (a worker stopping: InFlight's abort)."""
        if self.state is OPEN:
            self._end(name, detail)
            close_with_reset(self.control)

    def _fail(self) -> None:
        log.error("udp association of %s failed", self.client_host, exc_info=True)
        self.abort("internal error", outcome.RESET)

    def _end(self, name: str, reason: str) -> None:
        if self.state is not OPEN:
            return
        self.state = ENDED
        self.result = (name, reason)
        for w in self.watchers.values():
            w.close()
        self.watchers.clear()
        if self.timer is not None:
            self.timer.close()
            self.timer = None
        for sock in (self.relay, *self.egress.values()):
            sock.close()
        if self.pending:
            self.dropped[QUEUE] = self.dropped.get(QUEUE, 0) + len(self.pending)
            self.pending.clear()
        self._wake()
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            try:
                on_end(self)
            except Exception:
                log.exception("logging the end of a udp association failed")

    def fields(self) -> dict[str, Any]:
        """The access-log fields after `upstream`, in the order the line gives them."""
        out: dict[str, Any] = {
            "relay": str(self.bound),
            "dests": len(self.destinations),
            "datagrams_sent": self.datagrams[0],  # the names and order of transocks' UDP lines
            "sent": self.bytes[0],
            "datagrams_received": self.datagrams[1],
            "received": self.bytes[1],
            "dropped": sum(self.dropped.values()),
        }
        if self.dropped:
            out["drops"] = ",".join(f"{k}:{v}" for k, v in sorted(self.dropped.items()))
        return out

    def upstream(self) -> str:
        """The egress sockets' local addresses (what a destination saw), or `-` when none was used."""
        return ",".join(self.egress_shown[v] for v in sorted(self.egress_shown)) or "-"

    def count(self, counters: ConnectionStats) -> None:
        assert self.result is not None
        counters.count("udp_associations", (self.result[0],))
        for i, direction in enumerate(("sent", "received")):
            if self.datagrams[i]:
                counters.count("udp_datagrams", (direction,), self.datagrams[i])
                counters.count("udp_bytes", (direction,), self.bytes[i])
        for reason, n in self.dropped.items():
            counters.count("udp_dropped", (reason,), n)


class _ResolveTimeout(Exception):
    pass


def _udp_socket(family: int) -> socket.socket:
    """A non-blocking UDP socket; Refused (resource_exhausted) when out of descriptors."""
    try:
        return socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            raise p.Refused(p.GENERAL_FAILURE, outcome.RESOURCE_EXHAUSTED,
                            f"no descriptor for a UDP socket: {exc.strerror or exc}") from None
        raise
