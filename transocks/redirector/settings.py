"""transocks' own settings, declared once; the runtime's are added to them."""

from __future__ import annotations

from ..core.config import Setting, boolean, seconds
from ..runtime.settings import runtime_settings
from .upstream import parse_proxy_url


def port_number(value: str) -> int:
    """A TCP port, 1-65535."""
    port = int(value)
    if not 0 < port < 65536:
        raise ValueError("a port is 1-65535")
    return port


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
    Setting("sniff_ports", port_number, [80, 443, 8080, 8443],
            "destination ports where the client's first bytes are read (at most sniff_timeout, 16 KiB) for the "
            "destination's name: the TLS ClientHello's server_name or the HTTP Host header; other ports are never "
            "delayed; empty turns sniffing off",
            section="sniffing", multiple=True, metavar="PORT"),
    Setting("sniff_timeout", seconds, 0.3,
            "how long to wait for the client's first bytes on a sniff port; a destination where the client stayed "
            "silent this long (a server-first protocol such as SMTP) is not waited for again for 10 minutes",
            section="sniffing", metavar="SECONDS"),
    Setting("send_domain", boolean, False,
            "open the tunnel by the recovered name instead of the address (SOCKS5 ATYP 3, SOCKS4a, CONNECT "
            "name:port), so the edge's name rules apply; connections without a name, and socks4:// and direct:// "
            "exits, go by address",
            section="sniffing", metavar="BOOL"),
]
