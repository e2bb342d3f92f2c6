"""usocksd's own listen addresses are never a destination.

A client allowed to reach usocksd could otherwise ask it to connect to
itself, and pipeline the next request into that connection: one client
connection chained 8,000 hops and held about 14,200 descriptors.  A listener
on an exact address covers that address; a wildcard listener covers every
address of this host (and all of 127.0.0.0/8) on its port.  The addresses
checked are the ones about to be dialled, so a name that resolves to us is
caught too.

This guard holds whatever the rules say; the other addresses of this host
are refused by the destination policy's safety defaults (`acl`), which an
allow_dest rule may lift, and which read them through the same
`HostAddresses`.

transocks has a guard of the same idea (`redirector.handler.LoopGuard`) over
string endpoints; this one works on the canonical address objects usocksd's
rules use.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable

from ..core import netutil
from ..core.names import IPAddress, judged_as, unmapped
from ..core.netutil import Endpoint

REFRESH_INTERVAL = 1.0  # seconds between re-reads of this host's addresses
_LOOPBACK_V4 = ipaddress.IPv4Network("127.0.0.0/8")

AddressReader = Callable[[], set[IPAddress]]


def local_addresses() -> set[IPAddress]:
    """Every address of this network namespace's interfaces, as the ACLs compare them."""
    return {unmapped(ipaddress.ip_address(a)) for a in netutil.local_addresses()}


class HostAddresses:
    """This host's addresses, read again (at most once a second) when asked about one it does not know.

    Addresses come and go (DHCP, a new alias); the re-read costs a walk of
    every interface, so the common answer, "not ours", pays it once a second.
    """

    def __init__(self, read: AddressReader = local_addresses, clock: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self._clock = clock
        self._addrs = read()
        self._read_at = clock()

    def __contains__(self, ip: object) -> bool:
        if ip in self._addrs:
            return True
        if self._clock() - self._read_at > REFRESH_INTERVAL:
            self._addrs = self._read()
            self._read_at = self._clock()
            return ip in self._addrs
        return False


class OwnAddresses:
    """Says whether dialling (ip, port) would connect to one of our listeners."""

    def __init__(self, listens: Iterable[Endpoint], read: AddressReader = local_addresses,
                 clock: Callable[[], float] = time.monotonic, host: HostAddresses | None = None) -> None:
        self.exact: set[tuple[IPAddress, int]] = set()
        self.wildcard_ports: set[int] = set()
        for ep in listens:
            ip = unmapped(ipaddress.ip_address(ep.host))
            if ip.is_unspecified:
                self.wildcard_ports.add(ep.port)
            else:
                self.exact.add((ip, ep.port))
        self.ports = {port for _, port in self.exact} | self.wildcard_ports
        self.host = host if host is not None or not self.wildcard_ports else HostAddresses(read, clock)

    def __contains__(self, dest: tuple[IPAddress, int]) -> bool:
        """Also true for a NAT64 or 6to4 spelling of our address: the translator brings it back."""
        ip, port = dest
        if port not in self.ports:  # the usual case
            return False
        return any(self._ours(a, port) for a in judged_as(unmapped(ip)))

    def _ours(self, ip: IPAddress, port: int) -> bool:
        if (ip, port) in self.exact:
            return True
        if port not in self.wildcard_ports or self.host is None:
            return False
        return ip in _LOOPBACK_V4 or ip in self.host
