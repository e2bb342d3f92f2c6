"""transocks' own settings, declared once; the runtime's are added to them."""

from __future__ import annotations

from ..core import namecheck
from ..core.config import (
    Setting,
    auto_boolean,
    boolean,
    finite,
    non_negative_int,
    optional_str,
    positive_int,
    seconds,
)
from ..core.names import port_number
from ..core.netutil import Endpoint, parse_hostport
from ..runtime.settings import runtime_settings
from .exits.config import balance, parse_pool, retries
from .route import parse_rule
from .upstream import parse_proxy_url


def health_target(text: str) -> Endpoint | None:
    """HOST:PORT that health checks open a whole tunnel to, or empty for none."""
    value = optional_str(text)
    return None if value is None else parse_hostport(value)


def per_second(value: str) -> float:
    """A rate a second, not negative; 0 disables."""
    rate = finite(value)
    if rate < 0:
        raise ValueError("a rate is a finite number, 0 or more")
    return rate


DEFAULT_LISTEN = ["127.0.0.1:1081", "[::1]:1081"]

SETTINGS: list[Setting] = runtime_settings(DEFAULT_LISTEN) + [
    Setting("tproxy", boolean, False,
            "also take connections that an iptables/nft TPROXY rule diverts (router set-up): listening sockets "
            "get IP_TRANSPARENT (needs CAP_NET_ADMIN) and a connection without a NAT entry goes to the accepted "
            "socket's own address; listen on [::]:PORT (or TPROXY's --on-ip); changes only with a restart",
            section="listening", metavar="BOOL", reload=False),
    Setting("bypass_user", str, [],
            "`transocks rules` never diverts connections of this local user (besides the daemon's own `user`): "
            "a usocksd on this host, whose outbound connections would otherwise come back here; repeat for "
            "several", section="listening", multiple=True, metavar="USER"),
    Setting("proxy_url", parse_proxy_url, [parse_proxy_url("socks5://127.0.0.1:1080")],
            "exit for redirected connections, a member of the default pool (repeat for several): "
            "socks5://[user:pass@]host:port, socks4a://[user@]host:port, socks4://..., "
            "http://[user:pass@]host:port (CONNECT), direct:// or reject://; a host name is resolved at start "
            "and every resolve_interval, each address a member of its own",
            section="upstream", multiple=True, metavar="URL"),
    Setting("balance", balance, "sticky",
            "how the default pool spreads connections: sticky (rendezvous hash of the destination address: "
            "one server, one member, one egress address), round-robin, least-conn (per worker)",
            section="pools", metavar="BALANCE"),
    Setting("pool", parse_pool, [],
            "a named pool for routes: NAME URL [URL...] [balance=sticky|round-robin|least-conn] "
            "[send_domain=true|false]; repeat for several (one per line)",
            section="pools", multiple=True, split=False, metavar="SPEC"),
    Setting("route", parse_rule, [],
            "MATCH [MATCH...] -> TARGET, first match wins, else the default pool; MATCH: dst=CIDR[,CIDR], "
            "port=N[,N-M], domain=example.com|.example.com|*.example.com, src=CIDR, listen=PORT, proto=tcp|udp "
            "(all must hold; without proto= a rule holds for both, domain= for TCP only); "
            "TARGET: a pool name, default, direct or reject; repeat for several (one per line)",
            section="pools", multiple=True, split=False, metavar="RULE"),
    Setting("retries", retries, "all",
            "members tried after the first fails at the member (refused, timed out, handshake or login failed): "
            "a number or all", section="pools", metavar="N"),
    Setting("health_interval", seconds, 5.0, "active check of every member this often (each worker); 0 disables",
            section="pools", metavar="SECONDS"),
    Setting("health_timeout", seconds, 3.0, "deadline of one health check", section="pools", metavar="SECONDS"),
    Setting("health_target", health_target, None,
            "HOST:PORT that each check opens a whole tunnel to (SOCKS CONNECT, HTTP CONNECT); without it a check "
            "is the TCP connect plus the SOCKS5 greeting and login", section="pools", metavar="HOST:PORT"),
    Setting("rise", positive_int, 2, "good checks in a row that bring a member back", section="pools", metavar="N"),
    Setting("fall", positive_int, 3, "failed checks or dials in a row that take a member out", section="pools",
            metavar="N"),
    Setting("resolve_interval", seconds, 30.0, "re-resolve member host names this often; 0 resolves at start only",
            section="pools", metavar="SECONDS"),
    Setting("connect_timeout", seconds, 5.0, "deadline for the TCP connect to the upstream proxy", section="upstream",
            metavar="SECONDS"),
    Setting("handshake_timeout", seconds, 10.0, "deadline for the whole SOCKS/CONNECT negotiation", section="upstream",
            metavar="SECONDS"),
    Setting("socks5_pipelining", auto_boolean, "auto",
            "send the SOCKS5 CONNECT request behind the greeting without waiting for the method reply "
            "(a round trip and a wakeup less per connection). auto: only to members that said they can "
            "(usocksd chooses private method 0x8a when offered, learnt at the first greeting or health check); "
            "true: to every member (microsocks hangs on it); false: never. No effect with a user name",
            section="upstream", metavar="auto|true|false"),
    Setting("upstream_fastopen", boolean, False,
            "TCP Fast Open towards the upstream proxy (TCP_FASTOPEN_CONNECT): the greeting goes in the SYN "
            "once the proxy has handed out a cookie (its listener needs TFO, e.g. usocksd --tcp-fastopen, "
            "and net.ipv4.tcp_fastopen bit 1 here)",
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
            "give the edge the recovered name so its name rules apply: a usocksd member gets the name and the "
            "original address in one request and checks them itself; other exits get a verified name instead of "
            "the address (SOCKS5 ATYP 3, SOCKS4a, CONNECT name:port); connections without a verified name, and "
            "socks4:// and direct:// exits, go by address",
            section="sniffing", metavar="BOOL"),
    Setting("verify_names", boolean, True,
            "trust a sniffed name only when the resolver answers it with the connection's original address: only "
            "then does it match domain= routes, go to a third-party edge with send_domain, and show as host= "
            "(else host_unverified=); false trusts names as sent, so any client can forge its way through a "
            "domain= route", section="sniffing", metavar="BOOL"),
    *namecheck.settings("sniffing"),
    # --- UDP (TPROXY) ---
    Setting("udp", boolean, False,
            "also carry UDP: UDP listeners on the listen addresses take what a TPROXY rule diverts (`transocks rules` "
            "writes them), each flow goes through a SOCKS5 UDP ASSOCIATE on its route's member (or direct), and "
            "replies reach the client from the original destination; needs CAP_NET_RAW in the workers; changes "
            "only with a restart", section="udp", metavar="BOOL", reload=False),
    Setting("udp_idle_timeout", seconds, 60.0,
            "a UDP flow (client address and port, original destination) with no datagram either way for this long "
            "ends; flows to port 53 end after half of it", section="udp", metavar="SECONDS"),
    Setting("udp_max_sessions", positive_int, 4096,
            "UDP flows one worker keeps at once; a new flow beyond it ends the one idle longest",
            section="udp", metavar="N"),
    Setting("udp_reject_ports", port_number, [443],
            "UDP destination ports `transocks rules` rejects in the kernel with ICMP port unreachable (with "
            "udp = true), so HTTP/3 (QUIC) clients fall back at once to TCP, where the name is sniffed and checked; "
            "empty lets them through by address like any UDP",
            section="udp", multiple=True, metavar="PORT"),
    # --- per-source limits (gateway mode) ---
    Setting("max_conns_per_source", non_negative_int, 0,
            "connections one client address may have open at once in each worker; more are reset (outcome "
            "source_limited); 0 disables; per worker: with N workers a source may get up to N times this",
            section="limits", metavar="N"),
    Setting("conn_rate_per_source", per_second, 0.0,
            "new connections a second one client address may open in each worker (a token bucket of "
            "conn_burst_per_source); more are reset (outcome source_limited); 0 disables",
            section="limits", metavar="RATE"),
    Setting("conn_burst_per_source", non_negative_int, 0,
            "new connections one client address may open at once before conn_rate_per_source holds it back "
            "(the token bucket's size); 0 is one second's worth (the rate, at least 1)",
            section="limits", metavar="N"),
]
