"""Listening sockets, bound by the master and inherited by the workers.

Two layouts, chosen once per master (`per_slot_mode`):

Shared: one socket per address, inherited by every worker.  Linux resets
every connection waiting in a SO_REUSEPORT socket's accept queue when that
socket is closed, which is what a per-worker socket does when its worker
exits, is recycled, or is retired by a HUP or TTOU (gunicorn's reuse_port
mode loses connections this way).  A socket inherited by all workers keeps
its queue no matter which worker comes or goes.  The cost is a thundering
herd: every worker wakes for every connection, all but one find EAGAIN, and
each accepts one connection per wake-up (max_accept=1) to keep the balance.

Per slot (with ``net.ipv4.tcp_migrate_req=1``, Linux >= 5.14): one
SO_REUSEPORT socket per address and worker slot, held open by the master as
nginx does, so a worker that exits or is recycled leaves its queue to its
successor in the same slot.  The kernel spreads connections by hash, so a
worker wakes only for its own and accepts in bursts.  A slot socket is closed
only when its slot goes away (TTOU, a reload with fewer workers, an address
leaving the configuration); migrate_req then moves its queued connections
(and handshakes in progress) to a sibling instead of resetting them, which is
why this layout is refused without it.  Slots beyond the sockets an address
has (a TTIN whose bind failed after the privilege drop: a reuseport group
admits only sockets of one uid) share one round-robin.  The trade-off: while
a slot has no worker accepting (it crashed and its successor boots, it hangs
until worker_timeout, it is at max_connections) the connections hashed to it
wait in its queue instead of going to another worker.

Either way SO_REUSEPORT is set, so a changed configuration or a second master
started for an upgrade can bind the same port while the old socket drains.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable

from ..core.names import unmapped
from ..core.netutil import (
    Endpoint,
    read_sysctl,
    set_keepalive,
    set_user_timeout,
)

log = logging.getLogger("transocks")

PrepareListener = Callable[[socket.socket], None]
"""A daemon's own options for its listening sockets, set before bind (e.g. TPROXY's IP_TRANSPARENT)."""


def bind(ep: Endpoint, prepare: PrepareListener | None = None, user_timeout: float = 0.0) -> socket.socket:
    """Bind (without listening); `[::]` is dual stack, other IPv6 addresses IPv6 only.

    Keepalive, TCP_NODELAY and TCP_USER_TIMEOUT are set here once: Linux
    copies a listener's socket options into every connection it accepts,
    which saves setsockopt calls per connection in the workers.

    Why no listen(): a bound socket that does not listen takes no connection,
    so a reload's new socket cannot win connections (an exact address wins
    over a wildcard one) before a worker of its generation accepts on it.
    The first worker that serves it calls `activate` (the master does for
    the first generation, which competes with nothing).
    """

    def inherited(sock: socket.socket) -> None:
        set_keepalive(sock)
        set_user_timeout(sock, user_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if prepare is not None:
            prepare(sock)

    return _bound(ep, socket.SOCK_STREAM, inherited)


def bind_datagram(ep: Endpoint, prepare: PrepareListener | None = None, user_timeout: float = 0.0) -> socket.socket:
    """A UDP socket for one worker slot: SO_REUSEPORT, so the kernel hashes each flow
    (its 4-tuple) to one slot's socket, hence one worker, for as long as the group
    is unchanged.  The master binds one per slot and holds them across reloads and
    upgrades, as it does per-slot TCP sockets; closing one loses only the datagrams
    it had queued, so UDP needs no migrate_req and is always per slot."""
    return _bound(ep, socket.SOCK_DGRAM, prepare)


def _bound(ep: Endpoint, kind: int, options: PrepareListener | None) -> socket.socket:
    """A socket of `kind` bound on `ep` with SO_REUSEADDR and SO_REUSEPORT, `options` set before
    the bind, non-blocking and inheritable (the workers and an upgrade's new master get it)."""
    ip = ipaddress.ip_address(ep.host)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if ip.is_unspecified else 1)
        if options is not None:
            options(sock)
        sock.bind((ep.host, ep.port))
        sock.setblocking(False)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def activate(sock: socket.socket, backlog: int) -> None:
    """Start listening (again: listen() on a listening socket only sets its backlog)."""
    sock.listen(backlog)


MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"

Groups = dict[Endpoint, list[socket.socket]]
"""Each address's listening sockets: one (shared), or one per worker slot."""


def per_slot_mode(sysctl: str = MIGRATE_REQ) -> tuple[bool, str]:
    """(per slot?, why): per-slot sockets only where closing one loses nothing."""
    value = read_sysctl(sysctl)
    if value is None:
        return False, "net.ipv4.tcp_migrate_req is absent (Linux < 5.14)"
    if value != "1":
        return False, f"net.ipv4.tcp_migrate_req = {value}, not 1"
    return True, "net.ipv4.tcp_migrate_req = 1"


def slot_sockets(groups: Groups, slot: int) -> list[tuple[Endpoint, socket.socket]]:
    """The socket of each address that the worker in `slot` (from 1) accepts on."""
    return [(ep, group[(slot - 1) % len(group)]) for ep, group in groups.items()]


def held(groups: Groups, nworkers: int) -> list[socket.socket]:
    """The sockets that slots 1..nworkers accept on."""
    return [s for group in groups.values() for s in group[:nworkers]]


def exclusive(groups: Groups, nworkers: int) -> bool:
    """No two slots share a socket: a worker may accept in bursts without starving the others."""
    return all(len(group) >= nworkers for group in groups.values())


class Listeners:
    """Every listening socket the master holds, by address.

    A generation takes its sockets from here (`take`); an address kept by a
    reload keeps its sockets, so their accept queues survive.  The master
    closes its copy of a socket once no starting or serving generation's
    slots use it (`release`); retiring workers close theirs after accepting
    what is queued.  A generation holds the very lists kept here, so a group
    grown for a TTIN is seen by both.

    `prepare` is fixed for the master's lifetime: TPROXY's option needs
    CAP_NET_ADMIN, which a master that dropped privileges no longer has, and
    workers of both kinds would share the sockets during a reload.
    `datagram` makes UDP sockets (`bind_datagram`) instead of TCP listeners.
    """

    def __init__(self, prepare: PrepareListener | None = None, datagram: bool = False) -> None:
        self.sockets: Groups = {}
        self.prepare = prepare
        self.datagram = datagram
        self._bind = bind_datagram if datagram else bind

    def adopt(self, ep: Endpoint, group: list[socket.socket]) -> None:
        """Sockets inherited from the master this one upgrades."""
        self.sockets[ep] = group

    def take(self, wanted: list[Endpoint], user_timeout: float = 0.0, per_address: int = 1) -> Groups:
        """At least one socket for each of `wanted`, up to `per_address`: those held, and new ones bound.

        The first socket of an address is all or none: any failure closes the
        new ones and raises.  A further one that cannot be bound (a reuseport
        group admits only sockets of the uid that made it, and this master
        may have dropped root since) leaves the group shorter: its slots share.
        Returns the groups in `wanted`'s order; new sockets stay here even if
        the caller then gives them up (`release` closes them).
        """
        new: Groups = {}
        try:
            for ep in wanted:
                if ep not in self.sockets and ep not in new:
                    new[ep] = [self._bind(ep, self.prepare, user_timeout)]
        except OSError:
            for group in new.values():
                group[0].close()
            raise
        self.sockets.update(new)
        taken = {ep: self.sockets[ep] for ep in dict.fromkeys(wanted)}
        for ep, group in taken.items():
            while len(group) < per_address:
                try:
                    group.append(self._bind(ep, self.prepare, user_timeout))
                except OSError as exc:
                    log.info("%s: %d %s sockets for %d workers (%s); slots beyond share them",
                             ep, len(group), "udp" if self.datagram else "listening", per_address,
                             exc.strerror or exc)
                    break
            for s in group if not self.datagram else ():
                set_user_timeout(s, user_timeout)  # a reload may change it; accepted sockets copy it
        return taken

    def release(self, keep: list[socket.socket]) -> list[Endpoint]:
        """Close every socket not in `keep`; returns the addresses left without any."""
        kept = {id(s) for s in keep}
        gone = []
        for ep, group in list(self.sockets.items()):
            for s in [s for s in group if id(s) not in kept]:
                group.remove(s)
                s.close()
            if not group:
                del self.sockets[ep]
                gone.append(ep)
        return gone

    def all(self) -> list[socket.socket]:
        return [s for group in self.sockets.values() for s in group]

    def close(self) -> None:
        for s in self.all():
            s.close()
        self.sockets.clear()


class AddressTaken(OSError):
    """Another process (a running master) already listens on an address we bound."""


def check_not_served(sockets: Groups, allowed_pids: set[int]) -> None:
    """Refuse an address another process listens on.

    SO_REUSEPORT lets a second instance bind the same port silently (the kernel
    would then split new connections between the two), so bind() cannot tell.
    The listening sockets of this network namespace are in /proc/net/tcp{,6};
    our own (by inode) and those of `allowed_pids` (our workers, the master we
    upgrade) do not count.
    """
    own = {os.fstat(s.fileno()).st_ino for group in sockets.values() for s in group}
    listening = [(ip, port, inode) for ip, port, inode in _proc_listeners() if inode not in own]
    for ep in sockets:
        mine = ipaddress.ip_address(ep.host)
        for ip, port, inode in listening:
            if port != ep.port or not _overlap(mine, ip):
                continue
            pids = _socket_owners(inode) - allowed_pids
            if pids:
                pid = _topmost(pids)
                raise AddressTaken(errno.EADDRINUSE, f"{ep} is already served by process {pid} ({_describe(pid)}); "
                                   f"stop it first, or send it USR2 to upgrade in place")


def _overlap(a: ipaddress.IPv4Address | ipaddress.IPv6Address, b: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    a, b = (unmapped(x) for x in (a, b))
    if a == b:
        return True
    if a.is_unspecified or b.is_unspecified:
        wild, other = (a, b) if a.is_unspecified else (b, a)
        return wild.version == 6 or other.version == 4  # [::] is dual stack; 0.0.0.0 takes IPv4 only
    return False


def _proc_listeners() -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, int]]:
    """(address, port, inode) of every TCP socket in LISTEN state in this network namespace."""
    out = []
    for path, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":
                continue
            addr_hex, port_hex = fields[1].split(":")
            # The kernel prints each 32-bit word in host byte order.
            raw = b"".join(struct.pack("=I", int(addr_hex[i:i + 8], 16)) for i in range(0, width, 8))
            out.append((ipaddress.ip_address(raw), int(port_hex, 16), int(fields[9])))
    return out


def _socket_owners(inode: int) -> set[int]:
    target = f"socket:[{inode}]"
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") == target:
                    pids.add(int(entry))
                    break
        except OSError:
            continue
    return pids


def _topmost(pids: set[int]) -> int:
    """The holder whose parent does not hold the socket: a master rather than its workers."""
    for pid in sorted(pids):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid not in pids:
            return pid
    return min(pids)


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:80] or "?"
    except OSError:
        return "?"
