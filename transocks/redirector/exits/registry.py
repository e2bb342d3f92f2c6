"""The exits registry: every member of every pool of this worker, one per configured URL and address.

A URL whose host is a name stands for one member per address the name resolves
to (see `health.Discovery`).  A member is shared by every pool that lists its
URL, so it is checked once and its health and live connections are one state.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from ...core.config import AUTO
from ...core.netutil import Endpoint
from ..upstream import Dialer, ProxyURL, make_dialer
from .balance import Pool
from .config import ALL, DIRECT, REJECT
from .member import HealthPolicy, Member


@dataclass
class Source:
    """The members one configured URL stands for: itself, or one per address of its name."""

    url: ProxyURL
    members: list[Member] = field(default_factory=list)

    @property
    def is_name(self) -> bool:
        if self.url.scheme in (DIRECT, REJECT):
            return False
        try:
            ipaddress.ip_address(self.url.host)
            return False
        except ValueError:
            return True


@dataclass(frozen=True)
class DialSettings:
    connect_timeout: float
    handshake_timeout: float
    socks5_pipelining: bool | str = AUTO  # AUTO: per member, as each says
    fastopen: bool = False


class Exits:
    """Every member of every pool of this worker, one per configured URL and address."""

    def __init__(self, dial: DialSettings, policy: HealthPolicy) -> None:
        self.dial = dial
        self.policy = policy
        self.sources: dict[ProxyURL, Source] = {}
        self.pools: list[Pool] = []

    def source(self, url: ProxyURL) -> Source:
        src = self.sources.get(url)
        if src is None:
            src = self.sources[url] = Source(url)
            if not src.is_name:
                src.members = [Member(self._dialer(url), str(url))]
        return src

    def _dialer(self, url: ProxyURL) -> Dialer:
        return make_dialer(url, self.dial.connect_timeout, self.dial.handshake_timeout, self.dial.socks5_pipelining,
                           self.dial.fastopen)

    def set_addresses(self, src: Source, addresses: Sequence[str]) -> tuple[list[str], list[str]]:
        """Make `src`'s members the given addresses, keeping the state of those that stay.

        Returns the addresses added and removed.
        """
        old = {m.dialer.url.host: m for m in src.members}
        members = []
        for addr in addresses:
            m = old.get(addr)
            if m is None:
                m = Member(self._dialer(replace(src.url, host=addr)), str(src.url))
            members.append(m)
        src.members = members
        for pool in self.pools:
            pool.rebuild()
        return [a for a in addresses if a not in old], [a for a in old if a not in addresses]

    def members(self) -> list[Member]:
        return [m for src in self.sources.values() for m in src.members]

    def endpoints(self) -> set[Endpoint]:
        """Every member's proxy address, for the loop guard."""
        return {m.dialer.upstream for m in self.members() if m.dialer.upstream is not None}

    def pool(self, name: str, urls: Iterable[ProxyURL], balance: str = "sticky", send_domain: bool = False,
             retries: int | str = ALL, checked: bool = True) -> Pool:
        p = Pool(name, [self.source(u) for u in urls], self, balance, send_domain, retries, checked)
        self.pools.append(p)
        return p

    def checked_members(self) -> list[Member]:
        """Members that active health checks probe (not the built-in direct exit)."""
        seen: dict[int, Member] = {}
        for p in self.pools:
            if p.checked:
                for m in p.members:
                    seen[id(m)] = m
        return list(seen.values())
