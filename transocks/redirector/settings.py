"""transocks' own settings, declared once; the runtime's are added to them."""

from __future__ import annotations

from ..core.config import Setting, boolean, seconds
from ..runtime.settings import runtime_settings
from .upstream import parse_proxy_url

DEFAULT_LISTEN = ["127.0.0.1:1081", "[::1]:1081"]

SETTINGS: list[Setting] = runtime_settings(DEFAULT_LISTEN) + [
    Setting("tproxy", boolean, False,
            "also take connections that an iptables/nft TPROXY rule diverts (router set-up): listening sockets "
            "get IP_TRANSPARENT (needs CAP_NET_ADMIN) and a connection without a NAT entry goes to the accepted "
            "socket's own address; listen on [::]:PORT (or TPROXY's --on-ip); changes only with a restart",
            section="listening", metavar="BOOL", reload=False),
    Setting("proxy_url", parse_proxy_url, parse_proxy_url("socks5://127.0.0.1:1080"),
            "exit for redirected connections: socks5://[user:pass@]host:port, socks4a://[user@]host:port, "
            "socks4://..., http://[user:pass@]host:port (CONNECT), direct:// or reject://",
            section="upstream", metavar="URL"),
    Setting("connect_timeout", seconds, 5.0, "deadline for the TCP connect to the upstream proxy", section="upstream",
            metavar="SECONDS"),
    Setting("handshake_timeout", seconds, 10.0, "deadline for the whole SOCKS/CONNECT negotiation", section="upstream",
            metavar="SECONDS"),
    Setting("socks5_pipelining", boolean, False,
            "send the SOCKS5 greeting and CONNECT request in one write: saves a round trip with dante, "
            "but servers such as microsocks hang on it; no effect with auth",
            section="upstream", metavar="BOOL"),
    Setting("idle_timeout", seconds, 0.0, "close a relayed connection with no traffic for this long; 0 disables",
            section="relay", metavar="SECONDS"),
    Setting("half_close_timeout", seconds, 60.0, "after one side has finished sending, close if the other is silent this long",
            section="relay", metavar="SECONDS"),
]
