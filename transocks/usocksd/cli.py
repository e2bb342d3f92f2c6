"""The usocksd daemon: settings, logging and the SOCKS handler on transocks' pre-fork runtime."""

from __future__ import annotations

import argparse
import getpass
import socket
import sys
from collections.abc import Callable, Sequence

from ..core import logs
from ..core.config import Command, Config, ConfigError
from ..core.namecheck import NameCheck
from ..core.netutil import Endpoint
from ..runtime import control
from ..runtime.listeners import PrepareListener
from ..runtime.master import main as run_daemon
from ..runtime.metrics import ConnectionStats
from . import listener
from .acl import ClientFilter, DestPolicy
from .credentials import Credentials, CredentialsError, hash_password
from .dnsbl import DnsblMonitor
from .egress import EgressPool
from .logins import LoginGate
from .loopguard import HostAddresses, OwnAddresses
from .outbound import Outbound
from .server import Limits, SocksHandler
from .settings import SETTINGS
from .udp import UdpLimits

DEFAULT_CONFIG = "/etc/usocksd/usocksd.conf"
DESCRIPTION = """\
SOCKS5, SOCKS4 and SOCKS4a server for the edge of a network: the exit that
transocks (or any SOCKS client) sends connections to.  CONNECT and UDP
ASSOCIATE (see UDP); BIND is answered 07 (command not supported).

CLIENTS
  Only clients in allow_from get an answer (default: loopback only); others
  are closed at once.  Without auth_file SOCKS5 clients use "no
  authentication".  With auth_file they must send user/password (RFC 1929;
  a wrong one gets status 01 and the connection is closed) and SOCKS4/4a is
  refused.  The file holds one user:hash line per user, # starts a comment:
      alice:$scrypt$ln=14,r=8,p=1$<salt>$<hash>
      bob:$pbkdf2-sha256$600000$<salt>$<hash>
  (salt and hash in base64 without padding).  Print a line with
      usocksd --hash-password alice [--scheme pbkdf2-sha256]
  which reads the password from the terminal (twice) or one line of stdin.
  The file must be readable by --user; it is re-read on HUP.  Verified
  logins are remembered (shared by the workers, kept across a HUP for users
  whose hash is unchanged); a worker hashes at most two passwords at once
  and one per client; a client with auth_fail_limit failed logins within
  auth_fail_window is refused without checking for the next window.

DESTINATION RULES (allow_dest, deny_dest: HOST[:PORTS], repeatable)
  HOST   *                 any destination
         example.com       exactly this name
         .example.com      this name and every name under it
         *.example.com     only names under it (not example.com itself)
         10.0.0.0/8        a subnet; 192.0.2.7 is a /32, 2001:db8::1 a /128;
         [2001:db8::/32]   brackets when a port follows: [2001:db8::/32]:443
  PORTS  443, a range 1-1023, or * (the default: any port)
  Deny wins: a request is refused (reply 02) when any deny_dest rule matches
  its name or any address it would connect to; otherwise it is allowed when
  an allow_dest rule matches its name or allow_dest rules match every one of
  its addresses; otherwise dest_policy decides.  Subnet rules apply to
  literal addresses and to every address a requested name resolves to, so a
  name pointing at a forbidden address is refused.  Name rules match only
  requests by name (SOCKS5 domain, SOCKS4a).  Names are compared in one
  form: lower case, no trailing dot, IDNA A-labels; anything the resolver
  reads as an address (127.1, 0x7f.0.0.1, 2130706433, [::1]) is that
  address, and IPv4-mapped IPv6 (::ffff:a.b.c.d) is matched as IPv4.
  IPv6 addresses that carry an IPv4 one (NAT64 64:ff9b::/96 and
  64:ff9b:1::/48, 6to4 2002::/16, ::a.b.c.d, ::ffff:0:a.b.c.d) are refused
  when a deny_dest rule matches an IPv4 address inside; allow_dest sees them
  as dialled.  Safety defaults: loopback, link-local, the unspecified
  addresses and every address of this host (in any of these spellings, or
  as what a name resolves to) are refused unless an allow_dest subnet rule
  inside that class names them (127.0.0.0/8, [::1]:8080, the host's own
  address): * and wider subnets do not.  Examples:
      --deny-dest 10.0.0.0/8 --deny-dest fc00::/7 --deny-dest '*:25'
      --dest-policy deny --allow-dest .example.com:443 --allow-dest 203.0.113.0/24

EGRESS
  With egress_address pools, each client IP leaves from one address per
  family, chosen by rendezvous hashing: adding or removing an address moves
  only its own clients.  With dnsbl_zone, pool addresses listed in a DNS
  blocklist are left out (re-checked every dnsbl_interval).  Names are
  resolved with gevent's resolver (libc's getaddrinfo by default, which
  honours /etc/hosts and nsswitch.conf).

REPLIES
  00 success, with the outbound socket's local address; 01 name resolution
  failed, invalid name, local error; 02 refused by the rules or
  authentication; 03 network unreachable; 04 host unreachable; 05 connection
  refused; 06 connect timeout; 07 command not supported; 08 address type not
  supported.  SOCKS4 answers 5a or 5b.  A destination that is one of
  usocksd's own listen addresses (any address of this host on a wildcard
  listener's port) is refused with 02 (outcome=loop), so requests cannot
  chain through usocksd itself.  Malformed or oversized messages and
  clients too slow for negotiation_timeout are closed without a reply.  Each
  connection ends with one access-log line (the upstream field is the
  egress socket's local address).

UDP
  UDP ASSOCIATE (RFC 1928 section 7) replies with a relay address: the
  address the client's TCP connection reached, on a port of its own; the
  client sends its datagrams there, from the address of that TCP connection
  (from the port the request named, or else the first datagram's).  Each
  destination is judged by the destination rules above; datagrams leave from
  the client's egress address, and only replies from an address and port the
  client has sent to come back.  FRAG != 0 is dropped.  The association ends
  with its TCP connection or after udp_idle_timeout with no datagram either
  way; udp_max_rate bounds the datagrams a second each way.  With udp = false
  UDP ASSOCIATE is answered 07.

PROCESSES
  The same pre-fork runtime as transocks: HUP reloads (configuration and
  credentials) without dropping connections, QUIT stops gracefully, TERM
  quickly, TTIN/TTOU add/remove a worker, USR1 reopens log files."""


def _load_credentials(cfg: Config) -> None:
    """Read auth_file while loading the configuration, so a bad file fails the reload, not the workers."""
    cfg.credentials = None
    if cfg.auth_file:
        try:
            cfg.credentials = Credentials.load(cfg.auth_file)
        except CredentialsError as exc:
            raise ConfigError(f"auth_file: {exc}") from None


class UsocksdApp:
    name = "usocksd"

    def config(self) -> Config:
        hash_cmd = Command("--hash-password", "[USER] [--scheme {scrypt,pbkdf2-sha256}]",
                           "print a salted hash of a password (or a USER:hash line) for auth_file, "
                           "then exit; see CLIENTS", hash_password_command)
        status = Command("status", "[--json] [SETTINGS]",
                         "ask the running master (control_socket) about its workers", self.status)
        return Config(self.name, SETTINGS, "USOCKSD", DEFAULT_CONFIG, DESCRIPTION, validate=_load_credentials,
                      commands=[hash_cmd, status])

    def status(self, argv: Sequence[str]) -> int:
        return control.status_command(self.name, argv, self.config().load, next(s.default for s in SETTINGS if s.name == "control_socket"))

    def load_config(self, argv: Sequence[str]) -> Config:
        return self.config().load(argv)

    def setup_logging(self, cfg: Config) -> None:
        logs.setup(self.name, cfg.error_log, cfg.log_level, cfg.access_log, cfg.access_log_format)

    def listen(self, cfg: Config) -> list[Endpoint]:
        return list(cfg.listen)

    def prepare_listener(self, cfg: Config) -> PrepareListener | None:
        return listener.prepare(cfg.defer_accept, cfg.tcp_fastopen)

    def make_handler(self, cfg: Config) -> tuple[Callable[[socket.socket, tuple], None], ConnectionStats]:
        pool = EgressPool(cfg.egress_address, cfg.egress_interface)
        if cfg.dnsbl_zone and cfg.egress_address:
            DnsblMonitor(pool, cfg.dnsbl_zone, cfg.dnsbl_interval).start()
        host = HostAddresses()
        policy = DestPolicy(cfg.allow_dest, cfg.deny_dest, cfg.dest_policy == "allow", host)
        counters = ConnectionStats()
        outbound = Outbound(policy, pool, cfg.connect_timeout, own=OwnAddresses(cfg.listen, host=host))
        handler = SocksHandler(
            ClientFilter(cfg.allow_from),
            outbound,
            cfg.credentials,
            cfg.socks4,
            Limits(cfg.negotiation_timeout, cfg.idle_timeout, cfg.half_close_timeout,
                   UdpLimits(cfg.udp_idle_timeout, cfg.udp_max_rate) if cfg.udp else None),
            counters,
            LoginGate(cfg.auth_fail_limit, cfg.auth_fail_window),
            NameCheck(cfg.name_cache_ttl, cfg.name_check_timeout, outbound.addresses),
            cfg.dest_name_mismatch == "refuse",
        )
        return handler, counters


def hash_password_command(argv: Sequence[str]) -> int:
    """`usocksd --hash-password [USER]`: print a hash (or a user:hash line) for the credentials file."""
    parser = argparse.ArgumentParser(prog="usocksd --hash-password",
                                     description="Print a salted hash of a password for usocksd's auth_file.")
    parser.add_argument("user", nargs="?", help="print a complete user:hash line")
    parser.add_argument("--scheme", choices=["scrypt", "pbkdf2-sha256"], default="scrypt")
    args = parser.parse_args(argv)
    if args.user is not None and (":" in args.user or not 0 < len(args.user.encode()) <= 255):
        print("usocksd: error: a user name is 1-255 bytes without ':'", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("usocksd: error: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not 0 < len(password.encode()) <= 255:
        print("usocksd: error: a SOCKS5 password is 1-255 bytes", file=sys.stderr)
        return 1
    encoded = hash_password(password, args.scheme)
    print(f"{args.user}:{encoded}" if args.user is not None else encoded)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_daemon(UsocksdApp(), argv)
