"""What usocksd's end-to-end tests build on: the daemon in the gw namespace, names, extra addresses.

usocksd listens on the gw's client-side addresses (GW_V4 / GW_V6) at ports
from 1180 up, one fresh port per instance, and is stopped by pid at test end.
Names resolve from an /etc/hosts overlay of the gw namespace, with nsswitch
set to "files" only and resolv.conf pointing at the namespace's own loopback,
so no lookup can ever become DNS traffic.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.conftest import LOG_TAIL
from tests.lab.names import hosts_overlay
from tests.lab.netns import (
    CLIENT_IF,
    CLIENT_NET_V4,
    CLIENT_NET_V6,
    GW_INET_IF,
    GW_V4,
    GW_V6,
    INET_V4,
    INET_V6,
    Lab,
)
from tests.lab.upstreams import start_usocksd, wait_usocksd
from transocks.usocksd.dnsbl import query_name

FIRST_PORT = 1180
START_TIMEOUT = 20.0
_ports = itertools.count(FIRST_PORT)

EGRESS_V4 = ["198.51.100.21", "198.51.100.22", "198.51.100.23"]
EGRESS_V6 = ["2001:db8:1::21", "2001:db8:1::22", "2001:db8:1::23"]
CLIENTS_V4 = [f"192.0.2.{n}" for n in range(31, 39)]
CLIENTS_V6 = [f"2001:db8:c::{n}" for n in range(31, 39)]
DNSBL_ZONE = "bl.test"
LISTED_V4 = "198.51.100.22"
LISTED_V6 = "2001:db8:1::22"

HOSTS = {
    "good.test": [INET_V4],
    "good6.test": [INET_V6],
    "dual.test": [INET_V4, INET_V6],
    "blocked.test": [INET_V4],
    "www.blocked.test": [INET_V4],
    "evil.test": ["127.0.0.1"],
    "evil6.test": ["::1"],
    "mapped.test": ["::ffff:127.0.0.1"],
    "gw.test": [GW_V4],
    "client.test": ["192.0.2.2"],
}


def _dnsbl_name(ip: str) -> str:
    return query_name(ipaddress.ip_address(ip), DNSBL_ZONE)


@dataclass
class Usocksd:
    """A usocksd master running in the gw namespace."""

    lab: Lab
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    argv: list[str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, scheme: str = "socks5", auth: tuple[str, str] | None = None, v6: bool = False) -> str:
        host = f"[{GW_V6}]" if v6 else GW_V4
        creds = f"{auth[0]}:{auth[1]}@" if auth else ""
        return f"{scheme}://{creds}{host}:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, *needles: str, count: int = 1, timeout: float = 5.0) -> str:
        """Wait until every needle appears at least `count` times in the log."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            if all(text.count(n) >= count for n in needles):
                return text
            if time.monotonic() > deadline:
                missing = [n for n in needles if text.count(n) < count]
                raise AssertionError(f"{missing} not (x{count}) in usocksd log:\n{text[-LOG_TAIL:]}")
            time.sleep(0.05)

    def access_lines(self, needle: str = "") -> list[str]:
        return [ln for ln in self.log_text().splitlines() if ln.startswith("time=") and needle in ln]

    def workers(self) -> list[psutil.Process]:
        try:
            return [p for p in psutil.Process(self.pid).children()
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        except psutil.NoSuchProcess:
            return []

    def worker(self) -> psutil.Process:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            procs = [p for p in self.workers() if "conns=" in " ".join(p.cmdline())]
            if procs:
                return procs[0]
            time.sleep(0.05)
        raise AssertionError("no serving usocksd worker")

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        return self.lab.stop(self.proc, sig, 5)


@contextlib.contextmanager
def name_overlay(lab: Lab) -> Iterator[dict[str, list[str]]]:
    """/etc/hosts (HOSTS plus DNSBL listings), nsswitch.conf and resolv.conf overlays for the gw."""
    listed = {_dnsbl_name(LISTED_V4): ["127.0.0.2"], _dnsbl_name(LISTED_V6): ["127.0.0.2"]}
    with hosts_overlay(lab, lab.gw, {**HOSTS, **listed}):
        yield HOSTS


def _addr(lab: Lab, ns: str, ifname: str, addrs: Sequence[str], action: str) -> None:
    for addr in addrs:
        prefix = "/64" if ":" in addr else "/24"
        extra = ["nodad"] if ":" in addr and action == "add" else []
        lab.run(ns, ["ip", "addr", action, addr + prefix, "dev", ifname, *extra], check=action == "add")


@contextlib.contextmanager
def extra_addresses(lab: Lab) -> Iterator[None]:
    """Egress addresses on the gw's inet side and more client addresses, removed afterwards."""
    added: list[tuple[str, str, list[str]]] = []
    try:
        for ns, ifname, addrs in ((lab.gw, GW_INET_IF, EGRESS_V4 + EGRESS_V6),
                                  (lab.client, CLIENT_IF, CLIENTS_V4 + CLIENTS_V6)):
            added.append((ns, ifname, addrs))
            _addr(lab, ns, ifname, addrs, "add")
        yield
    finally:
        for ns, ifname, addrs in added:
            _addr(lab, ns, ifname, addrs, "del")


class UsocksdFactory:
    """Starts usocksd instances in the gw namespace and stops them all at `close()`.

    Each is `upstreams.start_usocksd` on a fresh port with the kernel choosing
    the egress address (tests bring their own pools), allows the client
    networks (or `allow_from`) and is returned once its workers are ready.
    """

    def __init__(self, lab: Lab, log_dir: Path) -> None:
        self.lab = lab
        self.log_dir = log_dir
        self.started: list[Usocksd] = []

    def start(self, args: Sequence[str] = (), *, workers: int = 1, env: dict[str, str] | None = None,
              log_dir: Path | None = None, wait: bool = True,
              allow_from: Sequence[str] = (CLIENT_NET_V4, CLIENT_NET_V6)) -> Usocksd:
        up = start_usocksd(self.lab, next(_ports), workers, args, allow_from=allow_from, egress=(), env=env,
                           workdir=log_dir or self.log_dir, wait=False)
        u = Usocksd(self.lab, up.proc, up.port, up.log_paths[0], list(up.proc.args))
        self.started.append(u)
        if wait:
            wait_usocksd(up, START_TIMEOUT)
        return u

    def close(self) -> None:
        """Stop every instance by pid; print the log tails (pytest shows them for failures)."""
        for u in reversed(self.started):
            with contextlib.suppress(Exception):
                u.stop()
            print(f"--- usocksd pid {u.pid} rc={u.proc.returncode} {u.log_path} ---\n{u.log_text()[-LOG_TAIL:]}")


# --- a raw client, for what well-behaved clients never send ----------------------------------


def raw_connect(lab: Lab, u: Usocksd, v6: bool = False, source: str | None = None, timeout: float = 10) -> socket.socket:
    """A plain TCP connection from the client namespace to usocksd."""
    with lab.netns(lab.client):
        return socket.create_connection((GW_V6 if v6 else GW_V4, u.port), timeout=timeout,
                                        source_address=(source, 0) if source else None)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {buf!r}")
        buf += chunk
    return buf


def closed_by_peer(sock: socket.socket, within: float = 5.0) -> float:
    """Seconds until the server closed (EOF or reset); fails if it stays open."""
    start = time.monotonic()
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def socks5_address(host: str, port: int) -> bytes:
    """ATYP + address + port for a literal IP; a DOMAIN for anything else, sent verbatim."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raw = host.encode()
        return b"\x03" + bytes([len(raw)]) + raw + struct.pack("!H", port)
    return (b"\x01" if ip.version == 4 else b"\x04") + ip.packed + struct.pack("!H", port)


def socks5_raw(sock: socket.socket, host: str, port: int, cmd: int = 1) -> int:
    """No-auth greeting and one request; returns REP (the whole reply is read)."""
    sock.sendall(b"\x05\x01\x00")
    assert recv_exact(sock, 2) == b"\x05\x00"
    sock.sendall(b"\x05" + bytes([cmd]) + b"\x00" + socks5_address(host, port))
    _, rep, _, atyp = recv_exact(sock, 4)
    recv_exact(sock, {1: 4, 4: 16}[atyp] + 2)
    return rep


def socks4_raw(sock: socket.socket, host: str, port: int, userid: bytes = b"") -> int:
    """A SOCKS4 (IPv4 literal) or SOCKS4a (anything else) CONNECT; returns CD."""
    try:
        packed = ipaddress.IPv4Address(host).packed
        data = struct.pack("!BBH4s", 4, 1, port, packed) + userid + b"\0"
    except ValueError:
        data = struct.pack("!BBH4s", 4, 1, port, b"\0\0\0\x01") + userid + b"\0" + host.encode() + b"\0"
    sock.sendall(data)
    return recv_exact(sock, 8)[1]


class Canary:
    """Listeners that must never be reached: they count every connection accepted."""

    def __init__(self, lab: Lab, where: Sequence[tuple[str, str]], port: int) -> None:
        self.port = port
        self.accepted: list[tuple[str, tuple]] = []
        self.socks = []
        for ns, host in where:
            with lab.netns(ns):
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                s = socket.create_server((host, port), family=family, backlog=64)
            self.socks.append(s)
            threading.Thread(target=self._run, args=(s, host), daemon=True).start()

    def _run(self, sock: socket.socket, host: str) -> None:
        while True:
            try:
                conn, peer = sock.accept()
            except OSError:
                return
            self.accepted.append((host, peer))
            conn.close()

    def close(self) -> None:
        for s in self.socks:
            s.close()


def fd_count_settles(proc: psutil.Process, baseline: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while proc.num_fds() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc.num_fds()
