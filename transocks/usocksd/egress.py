"""Which local address a client's connections leave from.

Why rendezvous (highest random weight) hashing: each client IP scores every
address of the pool and takes the best, so the same client always leaves from
the same address (destinations see a stable source), and adding or removing
an address moves only the clients that win or lose it - about 1/n of them -
while everybody else stays put.  The score is an unkeyed hash of the two
addresses, so every worker and every restart agrees.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from ..core.names import IPAddress, address, unmapped


def egress_address(text: str) -> IPAddress:
    """Setting type: a local IP literal (brackets allowed around IPv6)."""
    ip = address(text)
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"{text!r} cannot be a source address")
    return ip


def weight(key: str, candidate: str) -> int:
    """The score of candidate for key: 64 bits of BLAKE2b over both."""
    digest = hashlib.blake2b(f"{key}|{candidate}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous(key: str, candidates: Sequence[str]) -> str | None:
    """The candidate with the highest weight for key (None for an empty pool)."""
    if not candidates:
        return None
    return max(candidates, key=lambda c: (weight(key, c), c))


class EgressPool:
    """Source addresses per family, minus those a DNSBL lists."""

    def __init__(self, addresses: Iterable[IPAddress] = (), interface: str | None = None) -> None:
        self.addresses = list(dict.fromkeys(addresses))
        self.interface = interface
        self.listed: set[IPAddress] = set()

    def configured(self, version: int) -> list[IPAddress]:
        return [a for a in self.addresses if a.version == version]

    def usable(self, version: int) -> list[IPAddress]:
        """The family's addresses not listed; all of them when every one is listed.

        A pool that lists all its addresses keeps using them (the DNSBL monitor
        warns): refusing every connection would be worse than a listed source.
        """
        configured = self.configured(version)
        clean = [a for a in configured if a not in self.listed]
        return clean or configured

    def set_listed(self, listed: Iterable[IPAddress]) -> None:
        self.listed = set(listed)

    def source_for(self, client: IPAddress, version: int) -> IPAddress | None:
        """The client's address for this destination family; None lets the kernel choose."""
        pool = self.usable(version)
        if not pool:
            return None
        by_text = {str(a): a for a in pool}
        chosen = rendezvous(str(unmapped(client)), list(by_text))
        return by_text[chosen] if chosen is not None else None
