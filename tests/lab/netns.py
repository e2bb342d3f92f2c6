"""Three-namespace test network: client -> gw -> inet.

The client namespace is where transocks and the test clients run, the gw
namespace hosts the upstream proxies and routes, and the inet namespace plays
"the Internet" with the test servers on documentation addresses.  Nothing is
linked to a real interface, so test traffic can never leave the machine.
Every namespace, iptables rule, /etc/netns override and process is owned by
one `Lab` and removed by `Lab.close()`, which also runs at interpreter exit.
Should a run be SIGKILLed, the next `Lab.create()` reaps what it left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import psutil

from transocks.demo.sandbox import orphaned

CLIENT_V4 = "192.0.2.2"
CLIENT_V6 = "2001:db8:c::2"
GW_V4 = "192.0.2.1"
GW_V6 = "2001:db8:c::1"
GW_EXT_V4 = "198.51.100.1"
GW_EXT_V6 = "2001:db8:1::1"
GW_NAT_V4 = "198.51.100.3"
INET_LINK_V4 = "198.51.100.2"
INET_LINK_V6 = "2001:db8:1::2"
INET_V4 = "203.0.113.10"
INET_V6 = "2001:db8:2::10"
INET2_V4 = "203.0.113.11"
INET2_V6 = "2001:db8:2::11"
TEST_PORT = 9000
CLIENT_NET_V4 = "192.0.2.0/24"
CLIENT_NET_V6 = "2001:db8:c::/64"
INET_NET_V4 = "203.0.113.0/24"
INET_NET_V6 = "2001:db8:2::/64"

CLIENT_IF = "gw0"
GW_CLIENT_IF = "cl0"
GW_INET_IF = "inet0"
INET_IF = "gw0"

# TPROXY's packet mark and policy-routing table, one pair per protocol so that TCP and UDP
# diversions can stand in the same namespace at once.
TPROXY_MARKS = {"tcp": (0x51, 151), "udp": (0x52, 152)}

REQUIRED_TOOLS = ("ip", "iptables", "ip6tables", "conntrack", "danted", "tinyproxy", "curl")

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")
ETC_NETNS_DIR = Path("/etc/netns")
OWNER_DIR = Path("/run/transocks-lab")
PREFIX_STEM = "tsk"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def require_root_and_tools() -> str | None:
    """Return why the lab cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "network-namespace lab needs root"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return "network-namespace lab needs missing tools: " + ", ".join(missing)
    return None


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _own_netns_fd() -> int:
    """Open the calling thread's (not the process's) current netns."""
    return os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)


@contextlib.contextmanager
def enter_netns(path: str | os.PathLike[str]) -> Iterator[None]:
    """Run the block with the calling thread inside the netns at `path`.

    setns(CLONE_NEWNET) only affects the calling thread, so concurrent threads
    can each sit in a different namespace.  Sockets created inside the block
    keep belonging to that namespace after the thread switches back.
    """
    home = _own_netns_fd()
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def reap_stale_labs() -> list[str]:
    """Delete namespaces left by earlier labs whose creating process is gone.

    Only prefixes registered in OWNER_DIR by `Lab.create` are considered, so
    namespaces created by anything else are never touched.  Temp dirs named
    "<prefix>-*" (see Lab.tempdir) go too.
    """
    reaped: list[str] = []
    for marker in orphaned(OWNER_DIR):
        prefix = marker.name
        for ns in _netns_names():
            if ns.startswith(prefix + "-"):
                _kill_netns_pids(ns)
                subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)
                shutil.rmtree(ETC_NETNS_DIR / ns, ignore_errors=True)
                reaped.append(ns)
        for path in Path(tempfile.gettempdir()).glob(f"{prefix}-*"):
            shutil.rmtree(path, ignore_errors=True)
        marker.unlink(missing_ok=True)
    return reaped


def _netns_names() -> list[str]:
    if not NETNS_RUN_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_RUN_DIR.iterdir())


def _kill_netns_pids(ns: str) -> None:
    """SIGKILL every process inside a namespace this lab created."""
    res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    for word in res.stdout.split():
        if word.isdigit() and int(word) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(word), signal.SIGKILL)


class Redirect:
    """Rules that divert traffic in one namespace (REDIRECT, or TPROXY with its policy
    routing); `remove()` runs their undo commands, newest first."""

    def __init__(self, lab: Lab, ns: str) -> None:
        self.lab = lab
        self.ns = ns
        self.undo: list[list[str]] = []

    def add(self, argv: Sequence[str], undo: Sequence[str]) -> None:
        """Run `argv` in the namespace; `undo` reverses it at `remove()`."""
        self.lab.run(self.ns, list(argv))
        self.undo.append(list(undo))

    def deliver_marked_locally(self, ip: str, mark: int, table: int) -> None:
        """TPROXY's policy routing for family `ip` ("-4"/"-6"): packets carrying `mark` look up
        `table`, whose only route delivers everything to this host."""
        rule = ["fwmark", f"{hex(mark)}/{hex(mark)}", "lookup", str(table)]
        self.add(["ip", ip, "rule", "add", *rule], ["ip", ip, "rule", "del", *rule])
        route = ["local", "0.0.0.0/0" if ip == "-4" else "::/0", "dev", "lo", "table", str(table)]
        self.add(["ip", ip, "route", "add", *route], ["ip", ip, "route", "del", *route])

    @contextlib.contextmanager
    def undone_on_error(self) -> Iterator[None]:
        """Remove what was added so far if setting up the rest fails: a half-installed
        diversion must not outlive the test that asked for it."""
        try:
            yield
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Delete the rules; idempotent so teardown can always call it."""
        while self.undo:
            self.lab.run(self.ns, self.undo.pop(), check=False)
        self.lab.forget_connections(self.ns)
        with contextlib.suppress(ValueError):
            self.lab._redirects.remove(self)


class Lab:
    """The client/gw/inet namespaces plus everything started inside them."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"{PREFIX_STEM}{secrets.token_hex(3)}"
        self.client = f"{self.prefix}-client"
        self.gw = f"{self.prefix}-gw"
        self.inet = f"{self.prefix}-inet"
        self.namespaces = (self.client, self.gw, self.inet)
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._redirects: list[Redirect] = []
        self._etc_dirs: set[Path] = set()
        self._cleanups: list[Callable[[], object]] = []
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def create(cls, prefix: str | None = None) -> Lab:
        """Build the namespaces; on any failure everything is torn down again."""
        reap_stale_labs()
        lab = cls(prefix)
        atexit.register(lab.close)
        try:
            lab._build()
        except BaseException:
            lab.close()
            raise
        return lab

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ip(self, ns: str, *args: str) -> None:
        subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True)

    def _build(self) -> None:
        OWNER_DIR.mkdir(parents=True, exist_ok=True)
        (OWNER_DIR / self.prefix).write_text(f"{os.getpid()}\n")
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, text=True)
            self._created.append(ns)
            self._ip(ns, "link", "set", "lo", "up")
            # No duplicate address detection: tentative link-local addresses
            # stall the first IPv6 connections by a second or two.
            self.sysctl(ns, "net.ipv6.conf.all.accept_dad=0")
            self.sysctl(ns, "net.ipv6.conf.default.accept_dad=0")
        # veth pairs are created directly inside the namespaces so that no
        # interface ever appears in the root namespace.
        self._ip(self.client, "link", "add", CLIENT_IF, "type", "veth",
                 "peer", "name", GW_CLIENT_IF, "netns", self.gw)
        self._ip(self.gw, "link", "add", GW_INET_IF, "type", "veth",
                 "peer", "name", INET_IF, "netns", self.inet)
        self.sysctl(self.gw, "net.ipv4.ip_forward=1")
        self.sysctl(self.gw, "net.ipv6.conf.all.forwarding=1")

        self._addrs(self.client, CLIENT_IF, [f"{CLIENT_V4}/24", f"{CLIENT_V6}/64"])
        self._addrs(self.gw, GW_CLIENT_IF, [f"{GW_V4}/24", f"{GW_V6}/64"])
        self._addrs(self.gw, GW_INET_IF, [f"{GW_EXT_V4}/24", f"{GW_EXT_V6}/64"])
        self._addrs(self.inet, INET_IF, [f"{INET_LINK_V4}/24", f"{INET_LINK_V6}/64"])
        self._addrs(self.inet, "lo", [f"{INET_V4}/32", f"{INET2_V4}/32",
                                      f"{INET_V6}/128", f"{INET2_V6}/128"])
        for ns, ifname in ((self.client, CLIENT_IF), (self.gw, GW_CLIENT_IF),
                           (self.gw, GW_INET_IF), (self.inet, INET_IF)):
            self._ip(ns, "link", "set", ifname, "up")

        self._wait_links_up()

        self._ip(self.client, "route", "add", "default", "via", GW_V4)
        self._ip(self.client, "-6", "route", "add", "default", "via", GW_V6)
        self._ip(self.gw, "route", "add", INET_NET_V4, "via", INET_LINK_V4)
        self._ip(self.gw, "-6", "route", "add", INET_NET_V6, "via", INET_LINK_V6)
        self._ip(self.inet, "route", "add", "default", "via", GW_EXT_V4)
        self._ip(self.inet, "-6", "route", "add", "default", "via", GW_EXT_V6)

    def _wait_links_up(self, timeout: float = 5) -> None:
        """Wait for linkwatch to activate the veths.

        Until then their qdisc is "noop" and drops packets: the first
        neighbour solicitation is lost and IPv6 connects stall for a second.
        """
        pending = [(self.client, CLIENT_IF), (self.gw, GW_CLIENT_IF),
                   (self.gw, GW_INET_IF), (self.inet, INET_IF)]
        deadline = time.monotonic() + timeout
        while pending:
            ns, ifname = pending[0]
            out = subprocess.run(["ip", "-n", ns, "-o", "link", "show", "dev", ifname],
                                 capture_output=True, text=True, check=True).stdout
            if "state UP" in out and "qdisc noop" not in out:
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ifname} in {ns} not up after {timeout}s: {out}")
            time.sleep(0.02)

    def _addrs(self, ns: str, ifname: str, addrs: Sequence[str]) -> None:
        for addr in addrs:
            extra = ["nodad"] if ":" in addr else []
            self._ip(ns, "addr", "add", addr, "dev", ifname, *extra)

    def sysctl(self, ns: str, setting: str) -> None:
        """Set a per-namespace sysctl such as net.ipv4.ip_forward=1."""
        self.run(ns, ["sysctl", "-q", "-w", setting])

    def forget_connections(self, ns: str) -> None:
        """Empty `ns`'s conntrack table, once what diverted its connections is gone.

        A connection the proxy reset stays in conntrack as CLOSE for 10 s with its NAT
        binding, and a SYN reusing its source port (a later test's client) is not taken
        for a new connection: it follows the old binding to a port nobody listens on any
        more and is refused (caught in the act with TRANSOCKS_LAB_PCAP).
        """
        self.run(ns, ["conntrack", "-F"], check=False)

    def tcp_ext(self, ns: str, name: str) -> int:
        """A TcpExt counter of `ns`, e.g. TCPFastOpenPassive (/proc/net/netstat is the reader's namespace's)."""
        lines = [ln.split() for ln in self.run(ns, ["cat", "/proc/net/netstat"]).stdout.splitlines()
                 if ln.startswith("TcpExt:")]
        return int(dict(zip(lines[0], lines[1]))[name])

    def netns_path(self, ns: str) -> Path:
        """Path of the namespace handle that `ip netns add` created."""
        return NETNS_RUN_DIR / ns

    def netns(self, ns: str) -> contextlib.AbstractContextManager[None]:
        """Context manager moving the current thread into `ns`; see enter_netns."""
        return enter_netns(self.netns_path(ns))

    def run(self, ns: str, argv: Sequence[str], check: bool = True,
            timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside `ns` and capture its output."""
        res = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True,
                             text=True, timeout=timeout, input=input, check=False)
        if check and res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, res.args, res.stdout, res.stderr)
        return res

    def popen(self, ns: str, argv: Sequence[str], stdout: int | IO[Any] | None = subprocess.DEVNULL,
              stderr: int | IO[Any] | None = subprocess.STDOUT, env: dict[str, str] | None = None,
              cwd: str | os.PathLike[str] | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running process in `ns`; it is stopped at close().

        `ip netns exec` execs the command, so the Popen pid is the process
        itself.  It gets its own session so that a test's Ctrl-C does not hit
        it before the orderly teardown does.
        """
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                                stdout=stdout, stderr=stderr, env=env, cwd=cwd,
                                start_new_session=True)
        with self._lock:
            self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], sig: int = signal.SIGTERM,
             timeout: float = 5, children_grace: float = 1.0) -> int | None:
        """Signal `proc` by pid, SIGKILL it after `timeout`, then its children too."""
        self.stop_many([proc], sig, timeout, children_grace)
        return proc.returncode

    def stop_many(self, procs: Sequence[subprocess.Popen[Any]], sig: int = signal.SIGTERM,
                  timeout: float = 5, children_grace: float = 1.0) -> None:
        """Stop several processes concurrently so their grace periods overlap.

        Children are collected before signalling because once a parent exits
        they are reparented and can no longer be found through it.  Those
        still alive after their parent get the same signal and are SIGKILLed
        after `children_grace` (dante's helpers otherwise linger for ~2 s).
        Tests that assert a graceful shutdown of children must check that
        themselves before calling this.
        """
        children: list[psutil.Process] = []
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                children += psutil.Process(proc.pid).children(recursive=True)
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.send_signal(sig)
        _, alive = psutil.wait_procs(children, timeout=children_grace)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(alive, timeout=timeout)
        with self._lock:
            for proc in procs:
                with contextlib.suppress(ValueError):
                    self._procs.remove(proc)

    def iptables(self, ns: str, *args: str,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run iptables inside `ns` (never in the root namespace)."""
        return self.run(ns, ["iptables", "-w", *args], check=check)

    def ip6tables(self, ns: str, *args: str,
                  check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ip6tables inside `ns` (never in the root namespace)."""
        return self.run(ns, ["ip6tables", "-w", *args], check=check)

    def iptables_redirect(self, port: int, v4_dst: str | None = INET_NET_V4,
                          v6_dst: str | None = INET_NET_V6) -> Redirect:
        """REDIRECT the client namespace's outgoing TCP to `port` on loopback.

        This is how transparent proxying is wired: the client's connections
        to the "Internet" land on transocks at 127.0.0.1/[::1]:port.
        """
        redirect = Redirect(self, self.client)
        self._redirects.append(redirect)
        with redirect.undone_on_error():
            for tool, dst in (("iptables", v4_dst), ("ip6tables", v6_dst)):
                if dst is None:
                    continue
                spec = ["OUTPUT", "-p", "tcp", "-d", dst, "-j", "REDIRECT", "--to-ports", str(port)]
                redirect.add([tool, "-w", "-t", "nat", "-A", *spec], [tool, "-w", "-t", "nat", "-D", *spec])
        return redirect

    def tproxy(self, port: int, proto: str = "tcp",
               dests: tuple[str, str] = (INET_NET_V4, INET_NET_V6)) -> Redirect:
        """Divert the client network's `proto` traffic to `dests` (v4, v6), as it passes through
        the gw, to `port` on the gw with TPROXY (the router set-up of transocks --tproxy).

        TPROXY marks the packets; a policy rule sends marked packets to a table
        whose only route delivers everything locally.  Only packets arriving
        from the client interface match, so the gw's own connections (the
        upstream proxy's) are never diverted.
        """
        mark, table = TPROXY_MARKS[proto]
        redirect = Redirect(self, self.gw)
        self._redirects.append(redirect)
        with redirect.undone_on_error():
            for tool, ip, dst in (("iptables", "-4", dests[0]), ("ip6tables", "-6", dests[1])):
                redirect.deliver_marked_locally(ip, mark, table)
                spec = ["PREROUTING", "-i", GW_CLIENT_IF, "-p", proto, "-d", dst, "-j", "TPROXY",
                        "--on-port", str(port), "--tproxy-mark", f"{hex(mark)}/{hex(mark)}"]
                redirect.add([tool, "-w", "-t", "mangle", "-A", *spec], [tool, "-w", "-t", "mangle", "-D", *spec])
        return redirect

    def masquerade(self, ns: str | None = None, out_if: str = GW_INET_IF,
                   sources: Sequence[str] = (CLIENT_NET_V4,),
                   to_source: str | None = None) -> None:
        """Kernel NAT on the gw: masquerade `sources` leaving through `out_if`.

        The baseline a transparent proxy replaces.  Limited to the client
        network so the gw's own connections (the upstream proxies') are left
        as they are; the rule goes away with the namespace.  With `to_source`
        (e.g. GW_NAT_V4) that address is added to `out_if` and used instead of
        the interface's own: NATed connections then never share source
        address and ports with the proxies' connections from the gw, whose
        SYNs would otherwise meet the servers' TIME_WAIT entries of the NATed
        ones with other TCP timestamps and be dropped (PAWS), costing 1 s.
        """
        ns = ns or self.gw
        if to_source is not None:
            self._addrs(ns, out_if, [f"{to_source}/24"])
        for src in sources:
            tool = "ip6tables" if ":" in src else "iptables"
            target = ["SNAT", "--to-source", to_source] if to_source else ["MASQUERADE"]
            self.run(ns, [tool, "-w", "-t", "nat", "-A", "POSTROUTING", "-s", src,
                          "-o", out_if, "-j", *target])

    def wait_tcp(self, ns: str, host: str, port: int, timeout: float = 10) -> None:
        """Poll until a TCP connect from inside `ns` to host:port succeeds."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        while time.monotonic() < deadline:
            with self.netns(ns):
                sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.1, min(1.0, deadline - time.monotonic())))
                sock.connect((host, port))
                return
            except OSError as exc:
                last = exc
            finally:
                sock.close()
            time.sleep(0.05)
        raise TimeoutError(f"{host}:{port} not accepting in {ns} after {timeout}s: {last}")

    def etc_dir(self, ns: str) -> Path:
        """Per-namespace /etc overlay: `ip netns exec` bind-mounts files from it."""
        path = ETC_NETNS_DIR / ns
        path.mkdir(parents=True, exist_ok=True)
        self._etc_dirs.add(path)
        return path

    def tempdir(self, name: str) -> Path:
        """World-traversable temp dir removed at close (or by the reaper).

        For daemons that open files only after dropping root privileges.
        """
        path = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-{name}-"))
        path.chmod(0o777)
        self.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
        return path

    def add_cleanup(self, func: Callable[[], object]) -> None:
        """Run `func` at close(), after the processes are stopped (LIFO)."""
        self._cleanups.append(func)

    def close(self) -> None:
        """Stop processes, drop rules and overlays, delete the namespaces.

        Idempotent, and safe to call again (e.g. from atexit) when an earlier
        call was interrupted half-way.
        """
        if self._closed:
            return
        errors: list[str] = []
        try:
            self.stop_many(list(reversed(self._procs)))
        except Exception as exc:  # noqa: BLE001 - keep tearing down
            errors.append(f"stopping processes: {exc}")
        while self._cleanups:
            func = self._cleanups.pop()
            try:
                func()
            except Exception as exc:  # noqa: BLE001 - keep tearing down
                errors.append(f"cleanup {func!r}: {exc}")
        for redirect in list(self._redirects):
            with contextlib.suppress(Exception):
                redirect.remove()
        for ns in reversed(self._created):
            _kill_netns_pids(ns)
            res = subprocess.run(["ip", "netns", "delete", ns], capture_output=True,
                                 text=True, check=False)
            if res.returncode != 0 and (NETNS_RUN_DIR / ns).exists():
                errors.append(f"delete {ns}: {res.stderr.strip()}")
        self._created.clear()
        for path in self._etc_dirs:
            shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            (OWNER_DIR / self.prefix).unlink()
        self._closed = True
        atexit.unregister(self.close)
        if errors:
            raise RuntimeError("lab teardown incomplete: " + "; ".join(errors))

