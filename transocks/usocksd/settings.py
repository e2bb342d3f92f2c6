"""usocksd's own settings, declared once; the runtime's are added to them."""

from __future__ import annotations

from ..core import namecheck
from ..core.config import (
    Setting,
    boolean,
    choice,
    non_negative_int,
    optional_str,
    seconds,
)
from ..core.names import network
from ..runtime.settings import runtime_settings
from .acl import dest_rule
from .dnsbl import dnsbl_zone
from .egress import egress_address

DEFAULT_LISTEN = ["127.0.0.1:1080", "[::1]:1080"]
DEFAULT_ALLOW_FROM = ["127.0.0.0/8", "::1"]

SETTINGS: list[Setting] = runtime_settings(DEFAULT_LISTEN, "usocksd") + [
    Setting("defer_accept", seconds, 5.0,
            "hand a connection to a worker only once its first bytes arrive, or after this long "
            "(TCP_DEFER_ACCEPT, whole seconds; SOCKS clients speak first); 0 disables; changes only with a restart",
            section="listening", metavar="SECONDS", reload=False),
    Setting("tcp_fastopen", non_negative_int, 0,
            "TCP Fast Open queue length of each listening socket (clients' first bytes in the SYN); needs "
            "net.ipv4.tcp_fastopen with bit 2 set (e.g. 3); 0 disables; changes only with a restart",
            section="listening", metavar="N", reload=False),
    Setting("allow_from", network, [network(n) for n in DEFAULT_ALLOW_FROM],
            "client subnet allowed to connect (10.0.0.0/8, 2001:db8::/32; a bare address is a /32 or /128); "
            "repeat for several; other clients are closed at once",
            section="clients", multiple=True, metavar="CIDR"),
    Setting("auth_file", optional_str, None,
            "credentials file of user:hash lines (see --hash-password); when set, SOCKS5 clients must send "
            "user/password (RFC 1929) and SOCKS4 is refused; re-read on HUP",
            section="clients", metavar="FILE"),
    Setting("auth_fail_limit", non_negative_int, 10,
            "failed logins from one client (an IPv4 address, an IPv6 /64) within auth_fail_window after which "
            "its logins are refused without checking for auth_fail_window (counted per worker); 0 disables",
            section="clients", metavar="N"),
    Setting("auth_fail_window", seconds, 60.0, "the period auth_fail_limit counts failures in, and how long "
            "a client that reached it is refused", section="clients", metavar="SECONDS"),
    Setting("socks4", boolean, True, "accept SOCKS4 and SOCKS4a requests (they carry no password)",
            section="clients", metavar="BOOL"),
    Setting("negotiation_timeout", seconds, 10.0,
            "deadline for a client's whole greeting, authentication and request", section="clients",
            metavar="SECONDS"),
    Setting("allow_dest", dest_rule, [],
            "destination allowed: HOST[:PORTS] (see DESTINATION RULES above); repeat for several",
            section="destinations", multiple=True, metavar="RULE"),
    Setting("deny_dest", dest_rule, [],
            "destination refused (reply 02); wins over every allow_dest; repeat for several",
            section="destinations", multiple=True, metavar="RULE"),
    Setting("dest_policy", choice("allow", "deny"), "allow",
            "what a destination matching no rule gets: allow or deny", section="destinations", metavar="POLICY"),
    Setting("dest_name_mismatch", choice("address", "refuse"), "address",
            "a named request (transocks sends the name it sniffed with the original address) whose name does "
            "not resolve to that address: `address` judges it by the address alone, as if it had no name; "
            "`refuse` answers reply 02; either way the connection goes to the address, never to the name's",
            section="destinations", metavar="MODE"),
    *namecheck.settings("destinations"),
    Setting("connect_timeout", seconds, 10.0,
            "deadline for resolving and connecting to the destination (reply 06 when it passes)",
            section="egress", metavar="SECONDS"),
    Setting("egress_address", egress_address, [],
            "local source address for outbound connections, IPv4 or IPv6; repeat for a pool: each client "
            "keeps one address per family (rendezvous hashing); none: the kernel chooses",
            section="egress", multiple=True, metavar="ADDR"),
    Setting("egress_interface", optional_str, None,
            "bind outbound connections to this interface (SO_BINDTODEVICE)", section="egress", metavar="IFACE"),
    Setting("dnsbl_zone", dnsbl_zone, [],
            "DNS blocklist zone (e.g. zen.spamhaus.org); an egress address listed there leaves the pool; "
            "repeat for several", section="egress", multiple=True, metavar="ZONE"),
    Setting("dnsbl_interval", seconds, 3600.0, "how often the egress addresses are checked against dnsbl_zone; 0: only when a worker starts",
            section="egress", metavar="SECONDS"),
    Setting("idle_timeout", seconds, 0.0, "close a relayed connection with no traffic for this long; 0 disables",
            section="relay", metavar="SECONDS"),
    Setting("half_close_timeout", seconds, 60.0,
            "after one side has finished sending, close if the other is silent this long",
            section="relay", metavar="SECONDS"),
    Setting("udp", boolean, True,
            "take UDP ASSOCIATE (RFC 1928 section 7): a relay socket per association on the client's egress address; "
            "datagrams only from the associating client's address, each judged by the same rules as CONNECT; "
            "false answers 07 (command not supported)", section="udp", metavar="BOOL"),
    Setting("udp_idle_timeout", seconds, 120.0,
            "an association with no datagram either way for this long ends (its TCP connection is closed); "
            "longer than the client's own idle timeout (transocks: 60 s), so the client ends a quiet flow first "
            "and an edge's end means the edge went away",
            section="udp", metavar="SECONDS"),
    Setting("udp_max_rate", non_negative_int, 1000,
            "datagrams a second one association may send out (and take back); more are dropped and counted, so "
            "a client cannot use the edge to amplify; 0 disables", section="udp", metavar="N"),
]
