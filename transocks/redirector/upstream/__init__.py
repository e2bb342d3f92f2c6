"""Upstream dialers, chosen by the proxy URL's scheme."""

from __future__ import annotations

from ...core.config import AUTO
from .base import Dialer, ProxyURL, UpstreamError, parse_proxy_url
from .direct import DirectDialer, RejectDialer
from .http_connect import HttpConnectDialer
from .socks4 import Socks4Dialer
from .socks5 import Socks5Dialer

DIALERS: dict[str, type[Dialer]] = {
    "socks5": Socks5Dialer,
    "socks4": Socks4Dialer,
    "socks4a": Socks4Dialer,
    "http": HttpConnectDialer,
    "direct": DirectDialer,
    "reject": RejectDialer,
}


def make_dialer(url: ProxyURL, connect_timeout: float, handshake_timeout: float,
                socks5_pipelining: bool | str = AUTO, fastopen: bool = False) -> Dialer:
    """The scheme's dialer (`socks5_pipelining`: see Socks5Dialer)."""
    cls = DIALERS[url.scheme]
    if cls is Socks5Dialer:
        return Socks5Dialer(url, connect_timeout, handshake_timeout, fastopen, pipelining=socks5_pipelining)
    return cls(url, connect_timeout, handshake_timeout, fastopen)


__all__ = ["DIALERS", "Dialer", "ProxyURL", "UpstreamError", "make_dialer", "parse_proxy_url"]
