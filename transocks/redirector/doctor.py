"""`transocks doctor`: which step of the path is broken, checked in the order traffic takes it.

One line per step: the configuration; the daemon (pidfile, a listening socket
of its own on every listen address); the redirect rules (a divert to a listen
port, and for the rules `transocks rules` installs, every upstream address
excluded); each upstream (reached without being diverted back, then a SOCKS5
greeting, or the whole handshake with a CONNECT to --target); and a canary
connection from this host to --target.

The daemon step reads the kernel's socket table instead of connecting: a
connection that was not redirected is exactly what transocks warns about
(`loop ... not redirected`), and doctor must leave the log it is asked about as
it was.  Each failing step's advice is about what failed there; a later step
that fails because an earlier one did (a canary reset because the upstream is
down) points at that step, never at a remedy for something else (applying the
rules again does not bring an upstream back).

The canary is known to have gone through transocks without metrics: while
it is open, the kernel's socket table (psutil) holds a connection whose local
end is a transocks listen port and whose remote end is the canary's own
address, i.e. the redirect delivered it to the listener; bytes coming back
(after a HEAD request) prove the tunnel through the proxy; a reset means
transocks could not open one.  When the access log is a file, the line
transocks wrote for the canary (its client address) is quoted too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from ..core import nio, outcome
from ..core.config import ConfigError
from ..core.netutil import (
    Endpoint,
    close_quietly,
    close_with_reset,
    parse_hostport,
    sockaddr_endpoint,
)
from ..wire import ProtocolError
from ..wire.socks5 import NO_ACCEPTABLE, NO_AUTH, USERPASS, greeting, read_method
from . import firewall
from .upstream import make_dialer
from .upstream.base import UpstreamError

ACCESS_LOG_WAIT = 5.0
EARLY_RESET_WAIT = 0.3
START = "start transocks with this configuration (systemctl start transocks)"
APPLY_RULES = "transocks rules --apply (with the daemon's settings)"


_EARLY_RESET = ("was reset before any greeting, as transocks' loop guard resets a connection diverted back "
                "to it (a redirect loop)")


class _Timeout(Exception):
    pass


@dataclass(frozen=True)
class Step:
    name: str
    ok: bool
    found: str
    todo: str = ""

    def line(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        todo = f"; do: {self.todo}" if not self.ok and self.todo else ""
        return f"{status}  {self.name}: {self.found}{todo}"


def resolver_todo(what: str) -> str:
    """The advice for a name that does not resolve: the resolver or the name, nothing else."""
    return f"check this host's resolver (/etc/resolv.conf, /etc/hosts, `getent hosts NAME`) or {what}"


def listeners() -> dict[Endpoint, int | None]:
    """Listening TCP sockets in this network namespace: address -> owning pid (None when the
    kernel does not say, e.g. not root)."""
    out: dict[Endpoint, int | None] = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr:
            out[sockaddr_endpoint(conn.laddr)] = conn.pid
    return out


def process_tree(pid: int) -> set[int]:
    """`pid` and its descendants (a master and its workers)."""
    try:
        return {pid} | {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return {pid}


def diverted_to(sock: socket.socket, listen_ports: Iterable[int]) -> Endpoint | None:
    """The transocks listen address this socket's connection arrived at, if the kernel
    diverted it there: a socket on a listen port whose peer is our own address."""
    me = sockaddr_endpoint(sock.getsockname())
    ports = set(listen_ports)
    for conn in psutil.net_connections(kind="tcp"):
        if conn.raddr and conn.laddr and conn.laddr[1] in ports and sockaddr_endpoint(conn.raddr) == me:
            return sockaddr_endpoint(conn.laddr)
    return None


class Doctor:
    """Runs the steps against one loaded configuration."""

    def __init__(self, cfg: Any, target: Endpoint | None, run: Callable[..., subprocess.CompletedProcess] | None = None) -> None:
        self.cfg = cfg
        self.target = target
        self.ports = sorted({ep.port for ep in cfg.listen})
        self.run = run or (lambda argv: subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30))
        self.failed: list[Step] = []  # the steps that failed so far, in order
        self.upstream_excluded = False  # the rules step saw every upstream excluded by our rules

    def steps(self) -> list[Callable[[], Step]]:
        return [self.daemon, self.rules, self.upstreams, self.canary]

    def run_steps(self) -> Iterable[Step]:
        """Each step's result, in order; later steps' advice knows which failed before them."""
        for step in self.steps():
            result = step()
            if not result.ok:
                self.failed.append(result)
            yield result

    # --- the daemon -----------------------------------------------------------

    def daemon(self) -> Step:
        found = []
        pids = None
        if self.cfg.pidfile:
            try:
                with open(self.cfg.pidfile) as f:
                    pid = int(f.read().split()[0])
            except (OSError, ValueError, IndexError) as exc:
                return Step("daemon", False, f"pidfile {self.cfg.pidfile}: {getattr(exc, 'strerror', None) or exc}",
                            START)
            if not psutil.pid_exists(pid):
                return Step("daemon", False, f"pidfile {self.cfg.pidfile} names pid {pid}, which is not running",
                            START)
            found.append(f"pid {pid}")
            pids = process_tree(pid)
        listening = listeners()
        for ep in self.cfg.listen:
            if ep not in listening:
                return Step("daemon", False, f"nothing listens on {ep}", f"{START}, or fix `listen`")
            owner = listening[ep]
            if pids is not None and owner is not None and owner not in pids:
                return Step("daemon", False, f"{ep} is held by pid {owner}, not by the pidfile's pid {pid} or its "
                                             "workers", f"stop what holds {ep}, or fix `listen` or `pidfile`")
            found.append(f"listening on {ep}")
        return Step("daemon", True, ", ".join(found))

    # --- the rules ------------------------------------------------------------

    def _rules_text(self) -> tuple[dict[str, str], list[str]]:
        texts, problems = {}, []
        for name, argv in (("iptables", ["iptables-save"]), ("ip6tables", ["ip6tables-save"]),
                           ("nft", ["nft", "list", "ruleset"])):
            if shutil.which(argv[0]) is None:
                continue
            res = self.run(argv)
            if res.returncode != 0:
                problems.append(f"{argv[0]}: {(res.stderr or res.stdout).strip()[:120]}")
            else:
                texts[name] = res.stdout
        return texts, problems

    def rules(self) -> Step:
        texts, problems = self._rules_text()
        if not texts:
            why = "; ".join(problems) or "neither iptables nor nft is installed"
            return Step("redirect rules", False, f"cannot read the rules ({why})", "run doctor as root")
        diverts: list[str] = []
        for name, text in texts.items():
            for port in _divert_ports(text):
                diverts.append(f"{name} -> :{port}")
        if not diverts:
            return Step("redirect rules", False, "no REDIRECT or TPROXY rule found", APPLY_RULES)
        ports = {int(d.rsplit(":", 1)[1]) for d in diverts}
        if not ports & set(self.ports):
            return Step("redirect rules", False,
                        f"rules divert to {', '.join(sorted(set(diverts)))}, not to a listen port "
                        f"({', '.join(map(str, self.ports))})", APPLY_RULES)
        found = ", ".join(sorted(set(diverts)))
        ours = _our_exclusions(texts)
        if ours is None:
            return Step("redirect rules", True, f"{found} (not made by transocks rules: the upstream check below "
                                                "shows whether the upstream is excluded)")
        try:
            ups = firewall.upstream_endpoints(self.cfg)
        except firewall.FirewallError as exc:
            return Step("redirect rules", False, str(exc), resolver_todo("the upstream's name in proxy_url"))
        missing = [str(ep.host) for ep in ups if not any(ipaddress.ip_address(ep.host) in net for net in ours)]
        if missing:
            return Step("redirect rules", False, f"{found}, but upstream {', '.join(missing)} is not excluded",
                        "transocks rules --apply (the upstream changed since the rules were applied)")
        self.upstream_excluded = True
        return Step("redirect rules", True, f"{found}; upstream excluded")

    # --- the upstreams --------------------------------------------------------

    def upstreams(self) -> Step:
        """Every member of every pool, each of its addresses."""
        urls = [url for url in firewall.member_urls(self.cfg) if url.host]
        if not urls:
            return Step("upstream", True, "direct/reject exits only: no upstream proxy to reach")
        found = []
        for url in urls:
            try:
                endpoints = firewall.resolve(url.endpoint)
            except firewall.FirewallError as exc:
                return Step("upstream", False, str(exc), resolver_todo("the upstream's name in proxy_url"))
            for ep in endpoints:
                result = self._probe_upstream(dataclasses.replace(url, host=ep.host))
                if not result.ok:
                    return result
                found.append(result.found)
        return Step("upstream", True, "; ".join(found))

    def _probe_upstream(self, url: Any) -> Step:
        cfg = self.cfg
        dialer = make_dialer(url, cfg.connect_timeout, cfg.handshake_timeout, cfg.socks5_pipelining)
        todo = f"check that {url} runs and accepts this host (proxy_url, its ACL and credentials)"
        loop_todo = "exclude the upstream: transocks rules --apply"
        try:
            sock = socket.create_connection((url.host, url.port), timeout=cfg.connect_timeout or None)
        except ConnectionResetError:
            if self.upstream_excluded:  # not a loop: the proxy's host reset the connection
                return Step("upstream", False, f"the connection to {url} was reset", todo)
            return Step("upstream", False, f"the connection to {url} {_EARLY_RESET}", loop_todo)
        except OSError as exc:
            return Step("upstream", False, f"connect to {url}: {exc.strerror or exc}", todo)
        sock.setblocking(False)  # the dialers' handshakes wait through the hub
        stream = nio.Stream(sock)
        try:
            loop = self._diverted_upstream(sock)
            if loop:
                return Step("upstream", False, f"the connection to {url} {loop}", loop_todo)
            with nio.Deadline(cfg.handshake_timeout or None, _Timeout):
                if self.target is not None:
                    dialer.handshake(stream, self.target)
                    return Step("upstream", True, f"{url}: CONNECT to {self.target} granted")
                if url.scheme == "socks5":
                    methods = bytes([NO_AUTH, USERPASS]) if url.username is not None else bytes([NO_AUTH])
                    stream.sendall(greeting(methods))
                    stream.wait(nio.READ)
                    method = read_method(stream.recv_exact)
                    if method == NO_ACCEPTABLE:
                        return Step("upstream", False, f"{url} accepts none of our auth methods",
                                    "set user:password in proxy_url")
                    return Step("upstream", True, f"{url}: SOCKS5 greeting answered (method {method:#04x})")
                return Step("upstream", True, f"{url}: TCP connect ok (give --target for a handshake)")
        except _Timeout:
            return Step("upstream", False, f"{url}: no handshake answer within {cfg.handshake_timeout:g}s", todo)
        except UpstreamError as exc:
            if exc.outcome in (outcome.DEST_UNREACHABLE, outcome.DEST_REFUSED):
                return Step("upstream", False, f"{url}: {exc}",
                            f"the upstream runs but cannot reach {self.target}: check the target (its name is "
                            "resolved by the upstream) and the upstream's own way out")
            return Step("upstream", False, f"{url}: {exc}", todo)
        except ProtocolError as exc:
            return Step("upstream", False, f"{url}: {exc}", todo)
        except ConnectionResetError:
            if self.upstream_excluded:
                return Step("upstream", False, f"the connection to {url} was reset before the proxy answered", todo)
            return Step("upstream", False, f"the connection to {url} was reset before the proxy answered: a "
                                           "redirect loop (transocks' loop guard resets a connection diverted back "
                                           "to it) or the proxy refused this host", f"{todo}; if it is a loop, "
                                           f"{loop_todo}")
        except (OSError, EOFError) as exc:
            return Step("upstream", False, f"{url}: handshake failed ({getattr(exc, 'strerror', None) or exc})", todo)
        finally:
            stream.release()
            close_quietly(sock)

    def _diverted_upstream(self, sock: socket.socket) -> str:
        """Why the connection to the upstream looks diverted back to transocks ("" when it does not).

        transocks' loop guard resets such a connection within a millisecond of
        accepting it, often before the socket table can be read; a proxy never
        speaks, nor resets, before the client's greeting.  So: the socket table
        if it still shows it, else a reset that arrives before we said anything.
        """
        listener = diverted_to(sock, self.ports)
        if listener is not None:
            return f"was diverted to transocks on {listener} (a redirect loop)"
        if self.upstream_excluded:  # our rules skip it: an early reset is the proxy's, seen by the handshake
            return ""
        readable, _, _ = select.select([sock], [], [], EARLY_RESET_WAIT)
        if readable:
            try:
                sock.recv(1, socket.MSG_PEEK)
            except ConnectionResetError:
                return _EARLY_RESET
        return ""

    # --- the canary -----------------------------------------------------------

    def canary(self) -> Step:
        if self.target is None:
            return Step("canary", False, "no --target given",
                        "run again with --target HOST:PORT, a server this host reaches through the proxy")
        cfg = self.cfg
        wait = (cfg.connect_timeout or 5.0) + (cfg.handshake_timeout or 10.0) + 5.0
        try:
            sock = socket.create_connection(self.target, timeout=wait)
        except socket.gaierror as exc:
            return Step("canary", False, f"{self.target.host} does not resolve here ({exc.strerror})",
                        resolver_todo("the name given to --target"))
        except OSError as exc:
            return Step("canary", False, f"connect to {self.target}: {exc.strerror or exc}",
                        self._blame("check that transocks runs, then the redirect rules"))
        me = sockaddr_endpoint(sock.getsockname())
        try:
            result = self._canary_on(sock)
        finally:
            close_with_reset(sock)  # transocks then logs it at once, not after half_close_timeout
        if result.found.startswith("diverted") or result.ok:
            result = dataclasses.replace(result, found=result.found + self._access_line(me))
        return result

    def _blame(self, otherwise: str) -> str:
        """Advice for a canary that failed: the first earlier step that failed, if one did."""
        if not self.failed:
            return otherwise
        earlier = self.failed[0]
        return f"fix the {earlier.name} step first" + (f" ({earlier.todo})" if earlier.todo else "")

    def _canary_on(self, sock: socket.socket) -> Step:
        """Where the canary went, by what the socket table and the answer say.

        A connection transocks refuses (no healthy upstream) is reset within a
        millisecond, often before the socket table can be read, so not seeing it
        on a listener proves nothing until the target has answered: only a
        connection that is answered and still not on a listener went straight out.
        """
        listener = diverted_to(sock, self.ports)
        try:
            sock.sendall(f"HEAD / HTTP/1.0\r\nHost: {self.target.host}\r\n\r\n".encode())
            data = sock.recv(512)
        except ConnectionResetError:
            where = f"diverted to {listener}, then reset" if listener else "reset before it was answered"
            return Step("canary", False, f"{where}: transocks could not open a tunnel to {self.target}",
                        self._blame("see transocks' log for the reason"))
        except TimeoutError:
            where = f"diverted to {listener}, but" if listener else "the connection was made, but"
            return Step("canary", False, f"{where} no answer within {sock.gettimeout():g}s",
                        self._blame("check the upstream and the target"))
        listener = listener or diverted_to(sock, self.ports)
        if listener is None:
            if not data:
                return Step("canary", False, f"the connection to {self.target} was closed without an answer, "
                                             "before it could be seen on a transocks listener",
                            self._blame("see transocks' log for the reason"))
            return Step("canary", False, f"the connection to {self.target} went straight out, not to transocks",
                        "divert this host's traffic: transocks rules --apply (a target in a private range "
                        "is never diverted; on a gateway, run doctor on a client)")
        reply = f"{len(data)} bytes back" if data else "the target closed without a reply"
        return Step("canary", True, f"{self.target} via transocks on {listener} (the kernel delivered it to "
                                    f"the listener), {reply}")

    def _access_line(self, client: Endpoint) -> str:
        """The access-log line of the connection from `client`, when the access log is a file."""
        path = self.cfg.access_log
        if path in ("-", "off", "none", "") or not os.path.isfile(path):
            return ""
        needle = f"client={client}" if self.cfg.access_log_format == "logfmt" else f'"client": "{client}"'
        deadline = time.monotonic() + ACCESS_LOG_WAIT
        while time.monotonic() < deadline:
            try:
                with open(path, "rb") as f:
                    f.seek(max(0, os.path.getsize(path) - 65536))
                    lines = f.read().decode(errors="replace").splitlines()
            except OSError:
                return ""
            for line in reversed(lines):
                if needle in line:
                    m = re.search(r'outcome"?[=:] ?"?([a-z_]+)', line)
                    return f"; access log: outcome={m.group(1) if m else '?'}"
            time.sleep(0.1)
        return "; no access-log line for it yet"


_DIVERT = (re.compile(r"-j REDIRECT\b.*--to-ports (\d+)"), re.compile(r"-j TPROXY\b.*--on-port (\d+)"),
           re.compile(r"\bredirect to :(\d+)"), re.compile(r"\btproxy (?:ip6? )?to \S*:(\d+)"))


def _divert_ports(text: str) -> list[int]:
    ports = []
    for line in text.splitlines():
        for pattern in _DIVERT:
            m = pattern.search(line)
            if m:
                ports.append(int(m.group(1)))
    return ports


_NET = re.compile(r"(?<![\w:.])((?:\d{1,3}\.){3}\d{1,3}(?:/\d+)?|[0-9a-f]*:[0-9a-f:.]*(?:/\d+)?)(?![\w:.])", re.IGNORECASE)


def _our_exclusions(texts: dict[str, str]) -> list[Any] | None:
    """The networks our rules (chains TRANSOCKS*, table inet transocks) skip; None when none of ours are installed."""
    nets: list[Any] = []
    found = False
    for name in ("iptables", "ip6tables"):
        for line in texts.get(name, "").splitlines():
            if line.startswith(f"-A {firewall.CHAIN_PREFIX}"):
                found = True
                m = re.search(r"-d (\S+) -j RETURN", line)
                if m:
                    nets.append(ipaddress.ip_network(m.group(1), strict=False))
    table = re.search(rf"table inet {firewall.NFT_TABLE} {{(.*?)\n}}", texts.get("nft", ""), re.DOTALL)
    if table:
        found = True
        for elements in re.findall(r"elements = {(.*?)}", table.group(1), re.DOTALL):
            for word in _NET.findall(elements):
                with contextlib.suppress(ValueError):
                    nets.append(ipaddress.ip_network(word, strict=False))
    return nets if found else None


def doctor_command(argv: Sequence[str], load_config: Callable[[Sequence[str]], Any]) -> int:
    """`transocks doctor [--target HOST:PORT] [SETTINGS]`: exit 0 only when every step holds."""
    parser = argparse.ArgumentParser(
        prog="transocks doctor", allow_abbrev=False,
        description="Check, in order, the configuration, the daemon, the redirect rules, each upstream and a "
                    "canary connection through the redirect and the proxy; one line per step; exit status 0 "
                    "only when all hold.",
        epilog="Every daemon setting is read as the daemon reads it: -c FILE, TRANSOCKS_* variables and flags. "
               "Run it as root on the host whose traffic transocks serves.")
    parser.add_argument("--target", type=parse_hostport, metavar="HOST:PORT",
                        help="a server this host reaches through the proxy: the upstream handshake CONNECTs to it "
                             "and the canary connects to it")
    args, rest = parser.parse_known_args(list(argv))
    try:
        cfg = load_config(rest)
    except ConfigError as exc:
        print(Step("configuration", False, str(exc), "fix it; transocks --check-config shows the same").line())
        return 1
    source = cfg.config_file or "built-in defaults"
    print(Step("configuration", True, f"{source}; listen {' '.join(map(str, cfg.listen))}; exit {', '.join(map(str, cfg.proxy_url))}").line())
    sys.stdout.flush()
    doctor = Doctor(cfg, args.target)
    ok = True
    for result in doctor.run_steps():
        ok = ok and result.ok
        print(result.line())
        sys.stdout.flush()
    return 0 if ok else 1
