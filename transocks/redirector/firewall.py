"""Firewall rules from the daemon's own configuration (`transocks rules`).

The rules send TCP to the listen port and leave alone, by construction,
what must never reach it: reserved and private ranges of both families,
every upstream address (resolved now), the listen addresses, the host's own
addresses, and the daemon's own traffic by owner when `user` is set.  A
forgotten upstream exclusion is the classic proxy loop.

Everything lives in objects of its own, as sshuttle and mihomo do: chains
named TRANSOCKS* (iptables, one `iptables-restore --noflush` per family, so
each family changes atomically), or the table `inet transocks` (nft, replaced
in one `nft -f`), and for TPROXY `ip rule`/`ip route` entries tagged with
routing protocol RT_PROTO.  `--apply` first takes away whatever an earlier
apply left (in either format), `--remove` takes exactly those away; both are
idempotent.  With iptables-nft the first apply may have to create the table
it jumps from (nat, mangle, filter), or a built-in chain of a table it found;
an empty marker chain records that, so that remove deletes that table (or
chain) again when nothing else is in it and the ruleset is as it was.  Which of the two formats a host gets, unless told, is
`Firewall.choose`'s decision (`--format auto`).

With `udp = true` UDP goes to the listeners by TPROXY, the only way a UDP
socket learns a datagram's original destination.  A gateway's is caught in
mangle PREROUTING; the host's own is marked in mangle OUTPUT, which policy
routing sends through `lo` back into PREROUTING, where TPROXY takes it (the
recipe of ipt2socks and hev-socks5-tproxy).  There is no socket match for
UDP: the workers' transparent reply sockets are bound on the remote
endpoints and shared by every flow to them, so a socket match would hand
every other flow's datagrams to such a socket instead of the listener;
TPROXY's own lookup takes connected sockets only.  UDP to
`udp_reject_ports` (QUIC's 443) is refused with ICMP port unreachable before
TPROXY: in filter OUTPUT for the host (the sender's send() fails with EPERM
and its next recv() with ECONNREFUSED), for a gateway in filter FORWARD
(iptables: REJECT exists only in the filter table, and after TPROXY the
error would need the foreign destination as its source, which the kernel
refuses to route, so these datagrams are left to be forwarded and rejected
there) or in nft's prerouting (where reject works whether or not the
gateway forwards).  TCP and UDP skip the same destinations: every chain
gets its exclusions from `_iptables_excludes` / `_nft_excludes`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import pwd
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.config import ConfigError
from ..core.netutil import Endpoint

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Never diverted.  The documentation ranges (192.0.2.0/24, 198.51.100.0/24,
# 203.0.113.0/24, 2001:db8::/32) are not excluded: examples and tests use them as "the Internet".
RESERVED_V4 = ("0.0.0.0/8", "10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
               "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4")
RESERVED_V6 = ("::/128", "::1/128", "::ffff:0:0/96", "64:ff9b:1::/48", "100::/64", "fc00::/7",
               "fe80::/10", "fec0::/10", "ff00::/8")

CHAIN_PREFIX = "TRANSOCKS"
OUTPUT_CHAIN = "TRANSOCKS"            # nat OUTPUT: the host's own traffic
GATEWAY_CHAIN = "TRANSOCKS_GW"        # nat PREROUTING: a gateway's, REDIRECT
TPROXY_CHAIN = "TRANSOCKS_TPROXY"     # mangle PREROUTING: a gateway's, TPROXY
UDP_MARK_CHAIN = "TRANSOCKS_UDP"      # mangle OUTPUT: marks the host's own UDP for the trip through lo
UDP_TPROXY_CHAIN = "TRANSOCKS_UDP_TPROXY"  # mangle PREROUTING: UDP to the listeners, TPROXY
UDP_REJECT_CHAIN = "TRANSOCKS_UDP_REJECT"  # filter OUTPUT / FORWARD: udp_reject_ports, ICMP port unreachable
MULTIPORT_MAX = 15  # ports one `-m multiport --dports` takes
MADE_MARKER = "TRANSOCKS_MADE_TABLE"  # empty chain: apply created this table (iptables-nft)
MADE_CHAIN = "TRANSOCKS_MADE_"  # + a built-in chain's name: apply created that chain in a table it found (iptables-nft)
BUILTIN_CHAINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
NFT_TABLE = "transocks"
FWMARK = 0x1
ROUTE_TABLE = 100
RT_PROTO = 243  # unassigned in iproute2's rt_protos
AUTO = "auto"
FORMATS = (AUTO, "iptables", "nft")
# Where the kernel lists iptables-legacy's tables of the reader's network namespace; iptables-nft
# reads the same files to warn "iptables-legacy tables present".
LEGACY_TABLE_LISTS = ("/proc/net/ip_tables_names", "/proc/net/ip6_tables_names")


class FirewallError(Exception):
    """The rules cannot be made or applied; the message says why and what to do."""


@dataclass(frozen=True)
class Family:
    version: int
    name: str
    iptables: str
    reserved: tuple[str, ...]
    loopback: str
    wildcard: str
    unreachable: str  # REJECT --reject-with for ICMP port unreachable

    def has(self, host: str) -> bool:
        return ipaddress.ip_address(host).version == self.version


IPV4 = Family(4, "ipv4", "iptables", RESERVED_V4, "127.0.0.1", "0.0.0.0", "icmp-port-unreachable")
IPV6 = Family(6, "ipv6", "ip6tables", RESERVED_V6, "::1", "::", "icmp6-port-unreachable")
FAMILIES = (IPV4, IPV6)


@dataclass(frozen=True)
class Divert:
    """Where one family's diverted TCP (and UDP) goes, and what both skip."""

    family: Family
    port: int
    exclude: tuple[IPNetwork, ...]
    on_ip: str | None = None  # TPROXY --on-ip, when the listener is not a wildcard
    udp: tuple[int, str | None] | None = None  # UDP's TPROXY (port, on-ip), with udp = true


@dataclass(frozen=True)
class Plan:
    """The rules one configuration needs: host (nat OUTPUT) or gateway (PREROUTING from `ifaces`)."""

    ifaces: tuple[str, ...]
    tproxy: bool
    uids: tuple[int, ...]  # owners whose connections are never diverted: the daemon's user, bypass_user
    diverts: tuple[Divert, ...]
    notes: tuple[str, ...] = ()
    mark: int = FWMARK
    table: int = ROUTE_TABLE
    reject_ports: tuple[int, ...] = ()  # UDP ports refused with ICMP port unreachable (udp only)

    @property
    def udp(self) -> bool:
        return any(d.udp for d in self.diverts)

    @property
    def policy_routing(self) -> bool:
        """Whether marked packets must be delivered locally: TPROXY of either protocol."""
        return self.tproxy or self.udp

    @property
    def gateway(self) -> bool:
        return bool(self.ifaces)

    @property
    def chain(self) -> str:
        if not self.gateway:
            return OUTPUT_CHAIN
        return TPROXY_CHAIN if self.tproxy else GATEWAY_CHAIN

    @property
    def hook(self) -> tuple[str, str]:
        """(iptables table, built-in chain) the jump goes in."""
        if not self.gateway:
            return "nat", "OUTPUT"
        return ("mangle" if self.tproxy else "nat"), "PREROUTING"

    def divert(self, family: Family) -> Divert | None:
        return next((d for d in self.diverts if d.family is family), None)


def member_urls(cfg: Any) -> list[Any]:
    """Every exit URL of every pool (the default pool's proxy_url lines and each `pool`), once each."""
    urls = [*cfg.proxy_url, *(url for spec in cfg.pool for url in spec.urls)]
    return list(dict.fromkeys(urls))


def upstream_endpoints(cfg: Any) -> list[Endpoint]:
    """Every upstream the daemon dials, by address (names resolved now); none for direct/reject."""
    out: list[Endpoint] = []
    for url in member_urls(cfg):
        if url.host:
            out += [ep for ep in resolve(url.endpoint) if ep not in out]
    return out


def dials_directly(cfg: Any) -> bool:
    """Whether some connection may leave with the daemon's own address (a direct member or route)."""
    return any(not url.host for url in member_urls(cfg)) or any(rule.target == "direct" for rule in cfg.route)


def resolve(ep: Endpoint) -> list[Endpoint]:
    try:
        infos = socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FirewallError(f"cannot resolve upstream {ep}: {exc.strerror}; without its addresses "
                            "the rules would send the upstream connection back to transocks") from None
    out: list[Endpoint] = []
    for info in infos:
        found = Endpoint(str(ipaddress.ip_address(info[4][0].split("%")[0])), ep.port)
        if found not in out:
            out.append(found)
    return out


def owner_uid(user: str | None, why: str = "the rules exclude the daemon's own traffic by its uid") -> int | None:
    if user is None:
        return None
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise FirewallError(f"user {user!r} does not exist (create it: init/transocks.sysusers); {why}") from None


def make_plan(cfg: Any, ifaces: Sequence[str] = (), upstreams: Iterable[Endpoint] | None = None) -> Plan:
    """The rules `cfg` needs; `ifaces` makes them a gateway's."""
    ups = list(upstream_endpoints(cfg) if upstreams is None else upstreams)
    tproxy = bool(cfg.tproxy) and bool(ifaces)
    udp = bool(getattr(cfg, "udp", False))  # UDP is always TPROXYed: REDIRECT loses its destination
    notes: list[str] = []
    if cfg.tproxy and not ifaces:
        notes.append("tproxy is on but TPROXY diverts only forwarded traffic: give --from IFACE for a "
                     "gateway; the host's own traffic is REDIRECTed")
    diverts = []
    for fam in FAMILIES:
        target = _listener_for(cfg.listen, fam, bool(ifaces), tproxy)
        if target is None:
            notes.append(f"no listen address takes {fam.name} connections in this mode: {fam.name} is not diverted")
            continue
        port, on_ip = target
        udp_target = _listener_for(cfg.listen, fam, bool(ifaces), True) if udp else None
        diverts.append(Divert(fam, port, _excludes(fam, ups, cfg.listen), on_ip, udp_target))
    if not diverts:
        where = "a wildcard or this host's address" if ifaces else "127.0.0.1:PORT, [::1]:PORT or a wildcard"
        raise FirewallError(f"no listen address can take diverted connections: listen on {where}")
    uid = None if ifaces else owner_uid(cfg.user)
    if not ifaces and uid is None and dials_directly(cfg):
        notes.append("a direct:// exit without `user`: the daemon's own connections would be diverted "
                     "back to it; set user so the rules can exclude them")
    if not ifaces and uid is None and udp:
        notes.append("udp = true without `user`: the daemon's own datagrams (direct flows, a member's UDP relay "
                     "on another address) would be diverted back to it; set user so the rules can exclude them")
    uids: list[int] = [] if uid is None else [uid]
    if not ifaces:
        for user in getattr(cfg, "bypass_user", None) or ():
            other = owner_uid(user, "bypass_user names the users whose connections go out undiverted")
            if other is not None and other not in uids:
                uids.append(other)
    reject = tuple(dict.fromkeys(cfg.udp_reject_ports)) if udp else ()
    return Plan(tuple(ifaces), tproxy, tuple(uids), tuple(diverts), tuple(notes), reject_ports=reject)


def _listener_for(listens: Iterable[Endpoint], fam: Family, gateway: bool, tproxy: bool) -> tuple[int, str | None] | None:
    """(port, TPROXY on-ip) of the first listener that diverted connections of `fam` reach.

    REDIRECT in nat OUTPUT rewrites the destination to 127.0.0.1 / ::1, in
    PREROUTING to the incoming interface's address; TPROXY finds a wildcard
    listener, or the one given by --on-ip.  [::] is dual stack.
    """
    for ep in listens:
        addr = ipaddress.ip_address(ep.host)
        if addr.is_unspecified:
            if addr.version in (fam.version, 6):
                return ep.port, None
            continue
        if addr.version != fam.version:
            continue
        if tproxy:
            return ep.port, ep.host
        if (gateway and not addr.is_loopback) or (not gateway and ep.host == fam.loopback):
            return ep.port, None
    return None


def _excludes(fam: Family, upstreams: Iterable[Endpoint], listens: Iterable[Endpoint]) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    hosts = [ep.host for ep in upstreams] + [ep.host for ep in listens]
    for host in hosts:
        addr = ipaddress.ip_address(host)
        if fam.has(host) and not addr.is_unspecified:
            out.append(ipaddress.ip_network(addr))
    out += [ipaddress.ip_network(n) for n in fam.reserved]
    seen: list[IPNetwork] = []
    for net in out:
        if net not in seen:
            seen.append(net)
    return tuple(seen)


# --- iptables ---------------------------------------------------------------


def iptables_rules(plan: Plan, fam: Family) -> dict[str, list[str]]:
    """table -> restore lines (chain declarations and -A rules) for one family."""
    d = plan.divert(fam)
    if d is None:
        return {}
    table, hook = plan.hook
    chain = plan.chain
    lines = [f":{chain} - [0:0]"]
    lines += _jumps(plan, hook, "tcp", chain)
    lines += _iptables_excludes(chain, plan, d)
    if plan.tproxy:
        lines.append(f"-A {chain} -p tcp -j {_tproxy_target(plan, d.port, d.on_ip)}")
    else:
        lines.append(f"-A {chain} -p tcp -j REDIRECT --to-ports {d.port}")
    out = {table: lines}
    if d.udp:
        for tbl, more in _iptables_udp(plan, d, *d.udp).items():
            out.setdefault(tbl, []).extend(more)
    return out


def _jumps(plan: Plan, hook: str, proto: str, chain: str, match: str = "") -> list[str]:
    """Jumps from a built-in chain: from each interface of a gateway, or for all the host's traffic."""
    if plan.gateway:
        return [f"-A {hook} -i {iface} -p {proto}{match} -j {chain}" for iface in plan.ifaces]
    return [f"-A {hook} -p {proto}{match} -j {chain}"]


def _iptables_excludes(chain: str, plan: Plan, d: Divert, owner: bool = True) -> list[str]:
    """The RETURNs every chain of ours starts with: the one list of what is never diverted.

    Owner matches exist only for locally generated packets (OUTPUT); `owner`
    False leaves them out of PREROUTING chains.
    """
    lines = [f"-A {chain} -m owner --uid-owner {uid} -j RETURN" for uid in plan.uids] if owner else []
    lines.append(f"-A {chain} -m addrtype --dst-type LOCAL -j RETURN")
    lines += [f"-A {chain} -d {net} -j RETURN" for net in d.exclude]
    return lines


def _tproxy_target(plan: Plan, port: int, on_ip: str | None) -> str:
    on = f" --on-ip {on_ip}" if on_ip else ""
    return f"TPROXY --on-port {port}{on} --tproxy-mark {plan.mark:#x}/{plan.mark:#x}"


def _port_lists(ports: Sequence[int]) -> list[str]:
    """`-m multiport --dports` arguments, at most MULTIPORT_MAX ports each."""
    return [",".join(str(p) for p in ports[i:i + MULTIPORT_MAX]) for i in range(0, len(ports), MULTIPORT_MAX)]


def _leave_to_reject(chain: str, plan: Plan) -> list[str]:
    """RETURNs that keep udp_reject_ports from being marked or TPROXYed: the ICMP error of a REJECT
    after either would need the foreign destination as its source, which the kernel will not route
    (v4), so these datagrams keep their ordinary route to filter OUTPUT / FORWARD."""
    return [f"-A {chain} -p udp -m multiport --dports {ports} -j RETURN" for ports in _port_lists(plan.reject_ports)]


def _iptables_udp(plan: Plan, d: Divert, port: int, on_ip: str | None) -> dict[str, list[str]]:
    """UDP's chains for one family: reject ports, the host's mark, TPROXY (no socket match: see the module)."""
    mark = f"{plan.mark:#x}/{plan.mark:#x}"
    out: dict[str, list[str]] = {}
    if plan.reject_ports:
        chain = UDP_REJECT_CHAIN
        hook = "FORWARD" if plan.gateway else "OUTPUT"
        lines = [f":{chain} - [0:0]"]
        for ports in _port_lists(plan.reject_ports):
            lines += _jumps(plan, hook, "udp", chain, f" -m multiport --dports {ports}")
        lines += _iptables_excludes(chain, plan, d, owner=not plan.gateway)
        lines.append(f"-A {chain} -p udp -j REJECT --reject-with {d.family.unreachable}")
        out["filter"] = lines
    mangle: list[str] = []
    if not plan.gateway:
        chain = UDP_MARK_CHAIN
        mangle += [f":{chain} - [0:0]", f"-A OUTPUT -p udp -j {chain}"]
        mangle += _iptables_excludes(chain, plan, d)
        mangle += _leave_to_reject(chain, plan)
        mangle.append(f"-A {chain} -p udp -j MARK --set-mark {mark}")
    chain = UDP_TPROXY_CHAIN
    mangle.append(f":{chain} - [0:0]")
    if plan.gateway:
        mangle += _jumps(plan, "PREROUTING", "udp", chain)
    else:  # the host's own datagrams, marked in OUTPUT, come back through lo
        mangle.append(f"-A PREROUTING -i lo -p udp -m mark --mark {mark} -j {chain}")
    mangle += _iptables_excludes(chain, plan, d, owner=False)
    if plan.gateway:
        mangle += _leave_to_reject(chain, plan)
    mangle.append(f"-A {chain} -p udp -j {_tproxy_target(plan, port, on_ip)}")
    out["mangle"] = mangle
    return out


def iptables_text(plan: Plan, fam: Family) -> str:
    """iptables-restore (ip6tables-restore) input for one family, for `iptables-restore --noflush`."""
    out = [f"# transocks rules for {fam.name}: {fam.iptables}-restore --noflush < FILE"]
    for table, lines in iptables_rules(plan, fam).items():
        out += [f"*{table}", *lines, "COMMIT"]
    return "\n".join(out) + "\n"


@dataclass
class SavedTable:
    """What an iptables-save section says about our objects."""

    chains: list[str] = field(default_factory=list)       # every chain declared
    jumps: list[str] = field(default_factory=list)        # "-A BUILTIN ... -j TRANSOCKS*" lines
    ours: list[str] = field(default_factory=list)         # our chains, marker chains included
    rules: dict[str, int] = field(default_factory=dict)   # rules per chain
    builtin_accept: list[str] = field(default_factory=list)  # built-in chains with policy ACCEPT


_JUMP = re.compile(rf"\s-[jg]\s+{CHAIN_PREFIX}\S*(\s|$)")


def parse_save(text: str) -> dict[str, SavedTable]:
    """iptables-save output -> table -> SavedTable."""
    tables: dict[str, SavedTable] = {}
    cur: SavedTable | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            cur = tables.setdefault(line[1:].strip(), SavedTable())
        elif cur is None:
            continue
        elif line.startswith(":"):
            name, policy = (line[1:].split() + ["", ""])[:2]
            cur.chains.append(name)
            if policy == "ACCEPT":
                cur.builtin_accept.append(name)
            cur.rules.setdefault(name, 0)
            if name.startswith(CHAIN_PREFIX):
                cur.ours.append(name)
        elif line.startswith("-A "):
            chain = line.split()[1]
            cur.rules[chain] = cur.rules.get(chain, 0) + 1
            if not chain.startswith(CHAIN_PREFIX) and _JUMP.search(line):
                cur.jumps.append(line)
    return tables


def _chain_markers(old: SavedTable, new: Sequence[str], present: set[str] | None) -> list[str]:
    """Markers for the built-in chains `new` appends to that apply creates, or created earlier.

    iptables-nft makes a table's built-in chains only as rules need them (and
    iptables-save lists them all the same, so `present` comes from nft): a
    FORWARD that an apply brings into an existing table must go again at remove.
    """
    used = dict.fromkeys(ln.split()[1] for ln in new if ln.startswith("-A ") and ln.split()[1] in BUILTIN_CHAINS)
    return [MADE_CHAIN + chain for chain in used
            if MADE_CHAIN + chain in old.ours or (present is not None and chain not in present)]


def removal_lines(saved: SavedTable, keep: Iterable[str] = ()) -> list[str]:
    """Restore lines that take our jumps and chains out of one table (chains in `keep` stay, flushed later)."""
    keep = set(keep)
    lines = ["-D " + jump[3:] for jump in saved.jumps]
    for chain in saved.ours:
        if chain not in keep:
            lines += [f"-F {chain}", f"-X {chain}"]
    return lines


# --- nft --------------------------------------------------------------------


def nft_table(plan: Plan) -> str:
    """The `table inet transocks` definition."""
    out = [f"table inet {NFT_TABLE} {{"]
    for d in plan.diverts:
        kind = "ipv4_addr" if d.family is IPV4 else "ipv6_addr"
        nets = ", ".join(str(n) for n in ipaddress.collapse_addresses(d.exclude))  # type: ignore[arg-type]
        out += [f"    set bypass{d.family.version} {{",
                f"        type {kind}; flags interval",
                f"        elements = {{ {nets} }}",
                "    }"]
    chain = "divert"
    if plan.gateway:
        prio = "-150" if plan.tproxy else "-100"
        typ = "filter" if plan.tproxy else "nat"
        out += ["    chain prerouting {", f"        type {typ} hook prerouting priority {prio}; policy accept;"]
        out += [f'        iifname "{iface}" meta l4proto tcp jump {chain}' for iface in plan.ifaces]
    else:
        out += ["    chain output {", "        type nat hook output priority -100; policy accept;",
                f"        meta l4proto tcp jump {chain}"]
    out += ["    }", f"    chain {chain} {{"]
    out += _nft_excludes(plan)
    for d in plan.diverts:
        if plan.tproxy:
            out.append(f"        meta nfproto {d.family.name} meta l4proto tcp {_nft_tproxy(plan, d, d.port, d.on_ip)}")
        else:
            out.append(f"        meta nfproto {d.family.name} meta l4proto tcp redirect to :{d.port}")
    out.append("    }")
    if plan.udp:
        out += _nft_udp(plan)
    out.append("}")
    return "\n".join(out) + "\n"


def _nft_excludes(plan: Plan, owner: bool = True) -> list[str]:
    """The returns every chain of ours starts with (owner matches only where packets are local)."""
    out = [f"        meta skuid {uid} return" for uid in plan.uids] if owner else []
    out.append("        fib daddr type local return")
    for d in plan.diverts:
        ip = "ip" if d.family is IPV4 else "ip6"
        out.append(f"        {ip} daddr @bypass{d.family.version} return")
    return out


def _nft_tproxy(plan: Plan, d: Divert, port: int, on_ip: str | None) -> str:
    ip = "ip" if d.family is IPV4 else "ip6"
    addr = (f"[{on_ip}]" if ":" in on_ip else on_ip) if on_ip else ""
    return f"tproxy {ip} to {addr}:{port} meta mark set meta mark | {plan.mark:#x} accept"


def _nft_udp(plan: Plan) -> list[str]:
    """UDP's chains: the host's mark (a route chain, so the mark reroutes), reject ports, TPROXY."""
    mark = f"{plan.mark:#x}"
    reject = ([f"        udp dport {{ {', '.join(str(p) for p in plan.reject_ports)} }} "
               "reject with icmpx type port-unreachable"] if plan.reject_ports else [])
    out: list[str] = []
    if not plan.gateway:
        out += ["    chain udp_output {", "        type route hook output priority -150; policy accept;",
                "        meta l4proto udp jump udp_mark", "    }", "    chain udp_mark {"]
        out += _nft_excludes(plan)
        out += reject
        out += [f"        meta mark set meta mark | {mark}", "    }"]
    out += ["    chain udp_prerouting {", "        type filter hook prerouting priority -150; policy accept;"]
    if plan.gateway:
        out += [f'        iifname "{iface}" meta l4proto udp jump udp_divert' for iface in plan.ifaces]
    else:  # the host's own datagrams, marked in output, come back through lo
        out.append(f'        iifname "lo" meta l4proto udp meta mark & {mark} == {mark} jump udp_divert')
    out += ["    }", "    chain udp_divert {"]
    out += _nft_excludes(plan, owner=False)
    if plan.gateway:
        out += reject
    for d in plan.diverts:
        if d.udp:
            out.append(f"        meta nfproto {d.family.name} meta l4proto udp {_nft_tproxy(plan, d, *d.udp)}")
    out.append("    }")
    return out


def nft_text(plan: Plan) -> str:
    """An `nft -f` script that replaces our table in one transaction."""
    return (f"# transocks rules: nft -f FILE (replaces table inet {NFT_TABLE} atomically)\n"
            + _NFT_DROP + nft_table(plan))


_NFT_DROP = f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"


# --- policy routing (TPROXY) --------------------------------------------------


def routing_commands(plan: Plan) -> list[list[str]]:
    """`ip` commands that deliver TPROXY-marked packets locally."""
    if not plan.policy_routing:
        return []
    cmds = []
    for d in plan.diverts:
        v = f"-{d.family.version}"
        local = "0.0.0.0/0" if d.family is IPV4 else "::/0"
        cmds.append(["ip", v, "rule", "add", "fwmark", f"{plan.mark:#x}/{plan.mark:#x}", "lookup",
                     str(plan.table), "protocol", str(RT_PROTO)])
        cmds.append(["ip", v, "route", "replace", "local", local, "dev", "lo", "table", str(plan.table),
                     "proto", str(RT_PROTO)])
    return cmds


def render(plan: Plan, fmt: str, family: str | None = None) -> str:
    """What `transocks rules` prints."""
    fams = [f for f in FAMILIES if family in (None, f.name)]
    notes = "".join(f"# note: {n}\n" for n in plan.notes)
    routing = "".join("# " + " ".join(cmd) + "\n" for cmd in routing_commands(plan)
                      if family is None or cmd[1] == f"-{fams[0].version}")
    if routing:
        routing = "# policy routing for TPROXY (--apply runs these):\n" + routing
    if fmt == "nft":
        return notes + nft_text(plan) + routing
    return notes + "".join(iptables_text(plan, f) for f in fams if plan.divert(f)) + routing


# --- applying ------------------------------------------------------------------

Runner = Callable[..., subprocess.CompletedProcess]


def legacy_tables_in_use(lists: Sequence[str] = LEGACY_TABLE_LISTS) -> bool:
    """Whether iptables-legacy has a table in this network namespace (either family)."""
    for path in lists:
        try:
            with open(path) as f:
                if f.read().strip():
                    return True
        except OSError:
            continue
    return False


def _run(argv: Sequence[str], input: str | None = None) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(list(argv), input=input, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise FirewallError(f"{argv[0]} not found: install it (Debian: iptables, nftables, iproute2)") from None
    if res.returncode != 0:
        raise FirewallError(f"{' '.join(argv)} failed: {(res.stderr or res.stdout).strip()}")
    return res


class Firewall:
    """Applies and removes a plan with the real tools; `run` is replaceable for unit tests."""

    def __init__(self, run: Runner = _run, which: Callable[[str], str | None] = shutil.which,
                 legacy_tables: Callable[[], bool] = legacy_tables_in_use) -> None:
        self.run = run
        self.which = which
        self.legacy_tables = legacy_tables

    def choose(self) -> tuple[str, str]:
        """What `--format auto` means on this host, and why.

        nft where iptables cannot work (no iptables-restore: a stock Debian 12
        has nftables only) or where iptables is itself only a front end of
        nf_tables, so that one `nft -f` replaces our table atomically.  iptables
        where it is all there is, where it is iptables-legacy, or where legacy
        tables are in use: rules of both kinds would then run side by side and
        `iptables-save` would not show ours next to the others.
        """
        nft = self.which("nft") is not None
        restore = self.which("iptables-restore") is not None
        if not nft and not restore:
            raise FirewallError("neither nft nor iptables-restore found: install nftables or iptables "
                                "(Debian: apt-get install nftables)")
        if not restore:
            return "nft", "nft found, iptables-restore not"
        if not nft:
            return "iptables", "iptables-restore found, nft not"
        try:
            shim = self._nft_backend(IPV4)
        except FirewallError:
            shim = False
        if not shim:
            return "iptables", "iptables is iptables-legacy"
        if self.legacy_tables():
            return "iptables", "iptables is the nf_tables shim, but iptables-legacy tables are in use"
        return "nft", "iptables is the nf_tables shim and no iptables-legacy tables are in use"

    # iptables ------------------------------------------------------------------

    def _nft_backend(self, fam: Family) -> bool:
        return "nf_tables" in self.run([fam.iptables, "--version"]).stdout

    def _iptables(self, fam: Family, plan: Plan | None) -> None:
        """Make our objects in one family what `plan` says (None: none at all), in one restore."""
        if self.which(f"{fam.iptables}-restore") is None:
            if plan is not None and plan.divert(fam):
                raise FirewallError(f"{fam.iptables}-restore not found: install iptables, or leave the format "
                                    "to --format auto (nft where nftables is installed)")
            return
        saved = parse_save(self.run([f"{fam.iptables}-save"]).stdout)
        wanted = iptables_rules(plan, fam) if plan is not None else {}
        nft_backend = self._nft_backend(fam)
        chains = self._nft_chains(fam) if nft_backend else {}
        made: list[str] = []
        made_chains: list[tuple[str, str]] = []
        body: list[str] = []
        for table in sorted(set(saved) | set(wanted)):
            old = saved.get(table, SavedTable())
            new = wanted.get(table, [])
            keep = [ln[1:].split()[0] for ln in new if ln.startswith(":")]
            if new and (MADE_MARKER in old.ours or (nft_backend and table not in saved)):
                keep.append(MADE_MARKER)
                if MADE_MARKER not in old.ours:
                    new = [f":{MADE_MARKER} - [0:0]", *new]
            else:
                if MADE_MARKER in old.ours:
                    made.append(table)
                markers = _chain_markers(old, new, chains.get(table) if nft_backend else None)
                new = [f":{m} - [0:0]" for m in markers if m not in old.ours] + new
                keep += markers
                made_chains += [(table, m[len(MADE_CHAIN):]) for m in old.ours
                                if m.startswith(MADE_CHAIN) and m != MADE_MARKER and m not in markers]
            lines = removal_lines(old, keep) + new
            if lines:
                body += [f"*{table}", *lines, "COMMIT"]
        if body:
            self.run([f"{fam.iptables}-restore", "-w", "--noflush"], input="\n".join(body) + "\n")
        if made or made_chains:
            self._drop_made(fam, made, made_chains)

    def _nft_chains(self, fam: Family) -> dict[str, set[str]]:
        """table -> the chains that really exist in it, for iptables-nft's family (ip, ip6)."""
        if self.which("nft") is None:
            return {}
        out: dict[str, set[str]] = {}
        text = self.run(["nft", "-j", "list", "chains", "ip" if fam is IPV4 else "ip6"]).stdout
        for item in json.loads(text or "{}").get("nftables", []):
            chain = item.get("chain")
            if chain:
                out.setdefault(chain["table"], set()).add(chain["name"])
        return out

    def _drop_made(self, fam: Family, tables: list[str], chains: list[tuple[str, str]]) -> None:
        """Delete tables and built-in chains that an apply created, once nothing else is in them (iptables-nft)."""
        if self.which("nft") is None:
            return
        saved = parse_save(self.run([f"{fam.iptables}-save"]).stdout)
        family = "ip" if fam is IPV4 else "ip6"
        for table, chain in chains:
            t = saved.get(table)
            if t is not None and table not in tables and not t.rules.get(chain, 1) and chain in t.builtin_accept:
                self.run(["nft", "delete", "chain", family, table, chain])
        for table in tables:
            t = saved.get(table)
            if t is not None and not any(t.rules.values()) and not t.ours and t.chains == t.builtin_accept:
                self.run(["nft", "delete", "table", family, table])

    # nft -----------------------------------------------------------------------

    def _nft(self, plan: Plan | None) -> None:
        if self.which("nft") is None:
            if plan is not None:
                raise FirewallError("nft not found: install nftables, or leave the format to --format auto "
                                    "(iptables where it is installed)")
            return
        self.run(["nft", "-f", "-"], input=_NFT_DROP + (nft_table(plan) if plan is not None else ""))

    # policy routing ------------------------------------------------------------

    def _routing(self, plan: Plan | None) -> None:
        """Our `ip rule`s and local routes (tagged with RT_PROTO) made what `plan` needs."""
        if self.which("ip") is None:
            if plan is not None and plan.policy_routing:
                raise FirewallError("ip not found: install iproute2")
            return
        for v in ("-4", "-6"):
            rules = json.loads(self.run(["ip", "-j", v, "rule", "show"]).stdout or "[]")
            for rule in rules:
                if str(rule.get("protocol")) == str(RT_PROTO):
                    self.run(["ip", v, "rule", "del", "priority", str(rule["priority"]), "protocol", str(RT_PROTO)])
            self.run(["ip", v, "route", "flush", "table", "all", "proto", str(RT_PROTO)])
        for cmd in routing_commands(plan) if plan is not None else []:
            self.run(cmd)

    # public --------------------------------------------------------------------

    def apply(self, plan: Plan, fmt: str) -> None:
        """Install `plan` in `fmt`, replacing whatever an earlier apply (in either format) left."""
        for fam in FAMILIES:
            self._iptables(fam, plan if fmt == "iptables" else None)
        if fmt == "nft":
            self._nft(plan)
        else:
            self._nft(None)
        self._routing(plan)

    def remove(self) -> None:
        """Take away everything apply installs, in both formats; nothing else."""
        for fam in FAMILIES:
            self._iptables(fam, None)
        self._nft(None)
        self._routing(None)


# --- the command ------------------------------------------------------------------


def rules_command(argv: Sequence[str], load_config: Callable[[Sequence[str]], Any]) -> int:
    """`transocks rules [--apply|--remove] [--format auto|iptables|nft] [--from IFACE] [SETTINGS]`."""
    parser = argparse.ArgumentParser(
        prog="transocks rules", allow_abbrev=False,
        description="Print (or apply, or remove) the iptables/ip6tables or nft rules that divert TCP to this "
                    "configuration's listener (and UDP by TPROXY with udp = true, udp_reject_ports refused with "
                    "ICMP port unreachable), excluding reserved and private ranges, every upstream address "
                    "(resolved now), the listen addresses, local addresses and, with `user`, the daemon's own "
                    "traffic.",
        epilog="Every daemon setting is read as the daemon reads it: -c FILE, TRANSOCKS_* variables and flags "
               "such as --listen, --proxy-url, --tproxy, --user (see transocks --help).")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--apply", action="store_true",
                        help="install the rules (chains TRANSOCKS*, or table inet transocks), replacing an earlier apply")
    action.add_argument("--remove", action="store_true",
                        help="take away everything --apply installs, in both formats; needs no configuration")
    parser.add_argument("--format", choices=FORMATS, default=AUTO,
                        help="iptables-restore input or an nft script; auto (the default): nft where iptables-restore "
                             "is missing, or is the nf_tables shim and no iptables-legacy tables are in use; "
                             "otherwise iptables (--family: iptables)")
    parser.add_argument("--from", dest="ifaces", action="append", default=[], metavar="IFACE",
                        help="a gateway's rules for traffic arriving on IFACE (PREROUTING; TPROXY when tproxy is "
                             "on) instead of the host's own (nat OUTPUT); repeatable")
    parser.add_argument("--family", choices=[f.name for f in FAMILIES],
                        help="print only this family's iptables-restore input (to pipe it into the tool)")
    args, rest = parser.parse_known_args(list(argv))
    try:
        if args.remove:
            Firewall().remove()
            print("transocks rules: removed", file=sys.stderr)
            return 0
        try:
            cfg = load_config(rest)
        except ConfigError as exc:
            print(f"transocks rules: error: {exc}", file=sys.stderr)
            return 2
        plan = make_plan(cfg, args.ifaces)
        firewall = Firewall()
        fmt = args.format
        if fmt == AUTO:
            fmt, why = ("iptables", "--family") if args.family else firewall.choose()
            print(f"transocks rules: format {fmt} (auto: {why})", file=sys.stderr)
        if not args.apply:
            sys.stdout.write(render(plan, fmt, args.family))
            return 0
        firewall.apply(plan, fmt)
    except FirewallError as exc:
        print(f"transocks rules: error: {exc}", file=sys.stderr)
        return 1
    for note in plan.notes:
        print(f"transocks rules: note: {note}", file=sys.stderr)
    what = ", ".join(f"{d.family.name} -> :{d.port}" + (f" (udp :{d.udp[0]})" if d.udp else "") for d in plan.diverts)
    if plan.reject_ports:
        what += f"; udp ports {','.join(map(str, plan.reject_ports))} rejected"
    print(f"transocks rules: applied ({fmt}, {'from ' + ' '.join(plan.ifaces) if plan.gateway else 'this host'}"
          f"{', tproxy' if plan.tproxy else ''}): {what}", file=sys.stderr)
    return 0
