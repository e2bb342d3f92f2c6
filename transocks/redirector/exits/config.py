"""Pools as configured: the `pool` line, balance names, retries, and the reserved route targets."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...core.config import boolean
from ..upstream import ProxyURL, parse_proxy_url

DEFAULT_POOL = "default"
DIRECT = "direct"
REJECT = "reject"
RESERVED = (DEFAULT_POOL, DIRECT, REJECT)
BALANCES = ("sticky", "round-robin", "least-conn")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$")

NAMED_SCHEMES = frozenset({"socks5", "socks4a", "http"})  # exits whose request can carry a name
CLAIMING_SCHEME = "socks5"  # the exit that can carry a name with the address (to usocksd, see wire.socks5.NAMED)
# Exits of UDP flows: SOCKS5 through UDP ASSOCIATE, direct:// sends the datagrams itself, reject:// drops
# them.  HTTP CONNECT and SOCKS4 have no UDP: a UDP flow skips such members.
UDP_SCHEMES = frozenset({"socks5", DIRECT, REJECT})
ASSOCIATING_SCHEME = "socks5"  # the exit whose UDP goes through an association that health checks open


@dataclass(frozen=True)
class PoolSpec:
    """A pool as configured: `pool = NAME URL [URL...] [balance=...] [send_domain=...]`."""

    name: str
    urls: tuple[ProxyURL, ...]
    balance: str = "sticky"
    send_domain: bool = False

    def __str__(self) -> str:
        """The pool as a config line would state it, without passwords."""
        return " ".join([self.name, *map(str, self.urls), f"balance={self.balance}",
                         f"send_domain={'true' if self.send_domain else 'false'}"])


def pool_name(text: str) -> str:
    if not _NAME.match(text):
        raise ValueError(f"bad pool name {text!r} (a letter, then letters, digits, '_', '-', '.')")
    return text


def balance(text: str) -> str:
    v = text.strip().lower()
    if v not in BALANCES:
        raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {text!r}")
    return v


def parse_pool(text: str) -> PoolSpec:
    """Parse the value of one `pool` line."""
    words = text.split()
    if len(words) < 2:
        raise ValueError("expected NAME URL [URL...] [balance=sticky|round-robin|least-conn] [send_domain=BOOL]")
    name = pool_name(words[0])
    if name in RESERVED:
        raise ValueError(f"{name!r} is reserved (route targets {', '.join(RESERVED)} exist already)")
    urls: list[ProxyURL] = []
    options: dict[str, str] = {}
    for word in words[1:]:
        if "://" in word:
            urls.append(parse_proxy_url(word))
            continue
        key, eq, value = word.partition("=")
        if not eq or key not in ("balance", "send_domain"):
            raise ValueError(f"unknown pool option {word!r} (balance=, send_domain=)")
        if key in options:
            raise ValueError(f"{key} given twice")
        options[key] = value
    if not urls:
        raise ValueError(f"pool {name} has no member URL")
    if any(u.scheme == REJECT for u in urls):
        raise ValueError("reject:// cannot be a pool member (route to `reject` instead)")
    return PoolSpec(name, tuple(urls), balance(options.get("balance", "sticky")),
                    boolean(options.get("send_domain", "false")))


ALL = "all"


def retries(text: str) -> int | str:
    """Members tried after the first fails: a number, or `all`."""
    v = text.strip().lower()
    if v == ALL:
        return ALL
    n = int(v)
    if n < 0:
        raise ValueError("must not be negative")
    return n
