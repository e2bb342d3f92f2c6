"""The demo's own network: three namespaces, their hosts files, the processes inside, and their removal.

client -> edge -> inet, joined by veth pairs created directly inside the
namespaces, so no interface ever appears in the root namespace and nothing is
linked to a real one: the demo's traffic cannot leave the machine.  The edge
does not forward, so the client reaches "the Internet" only through the SOCKS
servers running there.  Addresses are documentation ranges (RFC 5737).

Everything the demo makes carries one random prefix (namespaces
`PREFIX-client`, `PREFIX-edge`, `PREFIX-inet`, /etc/netns/PREFIX-*, the work
directory /tmp/PREFIX-*), so `close()` removes it by name even when an
interrupt came half-way through making it.  A marker file holding the demo's
pid lets the next run remove what a SIGKILLed one left behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import psutil

PREFIX_STEM = "tsdemo"
NETNS_RUN_DIR = Path("/run/netns")
ETC_NETNS_DIR = Path("/etc/netns")
MARKER_DIR = Path("/run/transocks-demo")
# Signals that end the demo: held back while a process or namespace is being made and recorded,
# ignored while everything is removed.
ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_TIMEOUT = 10.0

CLIENT_V4 = "192.0.2.2"
EDGE_V4 = ("192.0.2.1", "192.0.2.3")  # one SOCKS server on each
EDGE_EXT_V4 = "198.51.100.1"
EGRESS_V4 = ("198.51.100.11", "198.51.100.12")  # where each SOCKS server's connections come from
INET_LINK_V4 = "198.51.100.2"
WEB_V4 = "203.0.113.10"
INET_NET_V4 = "203.0.113.0/24"


class SandboxError(Exception):
    """A command that builds or runs the demo failed; the message carries its output."""


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold ending signals back while a process or namespace is made and recorded, so that an
    interrupt never leaves one running that the teardown does not know of."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, ENDING_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _unblock_in_child() -> None:
    # A forked child inherits the held mask; the daemons must receive their signals.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, ENDING_SIGNALS)


def run(argv: Sequence[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; a failure says which command and what it printed."""
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False,
                         stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise SandboxError(f"`{' '.join(argv)}` failed ({res.returncode}): {(res.stderr or res.stdout).strip()}")
    return res


def _alive(proc: psutil.Process) -> bool:
    """Running, not merely waiting to be reaped (a killed orphan stays a zombie until init reaps it)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def orphaned(marker_dir: Path) -> Iterator[Path]:
    """The markers in `marker_dir` (a file named by a prefix, holding its owner's pid) whose
    owner is gone: what they name was left behind by a killed run."""
    if not marker_dir.is_dir():
        return
    for marker in marker_dir.iterdir():
        try:
            pid = int(marker.read_text().strip() or "0")
        except (OSError, ValueError):
            continue
        if not (pid and psutil.pid_exists(pid)):
            yield marker


def reap_stale() -> list[str]:
    """Remove what earlier demos left when they were killed (their marker names a dead pid)."""
    reaped: list[str] = []
    for marker in orphaned(MARKER_DIR):
        Sandbox(marker.name).close()
        reaped.append(marker.name)
    return reaped


def _fresh_prefix() -> str:
    """A prefix no demo and no namespace uses: close() removes everything that carries it."""
    while True:
        prefix = f"{PREFIX_STEM}{secrets.token_hex(3)}"
        taken = (MARKER_DIR / prefix).exists() or any(
            p.name.startswith(prefix + "-") for p in (NETNS_RUN_DIR.iterdir() if NETNS_RUN_DIR.is_dir() else ()))
        if not taken:
            return prefix


class Sandbox:
    """The demo's namespaces, files and processes; `close()` removes all of them (idempotent)."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or _fresh_prefix()
        self.client = f"{self.prefix}-client"
        self.edge = f"{self.prefix}-edge"
        self.inet = f"{self.prefix}-inet"
        self.namespaces = (self.client, self.edge, self.inet)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.workdir: Path | None = None
        self._made_etc_netns = False

    # --- building -------------------------------------------------------------------------------

    def build(self) -> None:
        """The marker, the work directory, the namespaces, their links, addresses and routes."""
        with signals_held():
            while True:  # another demo ending now may remove the empty directory between the two calls
                MARKER_DIR.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    (MARKER_DIR / self.prefix).write_text(f"{os.getpid()}\n")
                    break
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        for ns in self.namespaces:
            run(["ip", "netns", "add", ns])
            self.ip(ns, "link", "set", "lo", "up")
        self.ip(self.client, "link", "add", "edge0", "type", "veth", "peer", "name", "client0", "netns", self.edge)
        self.ip(self.edge, "link", "add", "inet0", "type", "veth", "peer", "name", "edge0", "netns", self.inet)
        self.ip(self.client, "addr", "add", f"{CLIENT_V4}/24", "dev", "edge0")
        for addr in EDGE_V4:
            self.ip(self.edge, "addr", "add", f"{addr}/24", "dev", "client0")
        for addr in (EDGE_EXT_V4, *EGRESS_V4):
            self.ip(self.edge, "addr", "add", f"{addr}/24", "dev", "inet0")
        self.ip(self.inet, "addr", "add", f"{INET_LINK_V4}/24", "dev", "edge0")
        self.ip(self.inet, "addr", "add", f"{WEB_V4}/32", "dev", "lo")
        for ns, ifname in ((self.client, "edge0"), (self.edge, "client0"), (self.edge, "inet0"),
                           (self.inet, "edge0")):
            self.ip(ns, "link", "set", ifname, "up")
        self.ip(self.client, "route", "add", "default", "via", EDGE_V4[0])
        self.ip(self.edge, "route", "add", INET_NET_V4, "via", INET_LINK_V4)

    def ip(self, ns: str, *args: str) -> None:
        run(["ip", "-n", ns, *args])

    def hosts(self, ns: str, names: Mapping[str, str]) -> Path:
        """Name resolution in `ns` from files only: `ip netns exec` mounts /etc/netns/NS/* over /etc.

        nsswitch says files only and resolv.conf points at the namespace's own
        loopback, so no lookup can become DNS traffic to the host's resolver.
        """
        with signals_held():
            self._made_etc_netns = self._made_etc_netns or not ETC_NETNS_DIR.exists()
            etc = ETC_NETNS_DIR / ns
            etc.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", "::1 localhost", *(f"{addr} {name}" for name, addr in names.items())]
        try:
            nsswitch = Path("/etc/nsswitch.conf").read_text().splitlines()
        except OSError:
            nsswitch = []
        nsswitch = [ln for ln in nsswitch if not ln.startswith("hosts:")] + ["hosts: files"]
        files = {"hosts": lines, "nsswitch.conf": nsswitch,
                 "resolv.conf": ["nameserver 127.0.0.1", "options timeout:1 attempts:1"]}
        for name, text in files.items():
            (etc / name).write_text("\n".join(text) + "\n")
            (etc / name).chmod(0o644)
        return etc / "hosts"

    # --- processes ------------------------------------------------------------------------------

    def start(self, name: str, ns: str, argv: Sequence[str], log: Path,
              env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running process in `ns`, output to `log`; `ip netns exec` execs, so the pid is
        the process itself.  Its own session: a Ctrl-C at the terminal reaches only the demo, which
        then stops it in order."""
        assert self.workdir is not None
        with signals_held(), open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=self.workdir, env=dict(env or os.environ),
                                    start_new_session=True, preexec_fn=_unblock_in_child)
            self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int:
        """Signal one process by pid, SIGKILL it after STOP_TIMEOUT; returns its exit status."""
        proc = self.procs[name]  # forgotten only once gone, so an interrupt here leaves it to close()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        del self.procs[name]
        return proc.returncode

    def run_in(self, ns: str, argv: Sequence[str], timeout: float = 30,
               env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside `ns` and capture its output (never raises on its status)."""
        return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL,
                              env=dict(env or os.environ))

    # --- removing -------------------------------------------------------------------------------

    def _own_namespaces(self) -> list[str]:
        """Every namespace with this prefix, recorded or not (an interrupt may come before the record)."""
        if not NETNS_RUN_DIR.is_dir():
            return []
        return sorted(p.name for p in NETNS_RUN_DIR.iterdir() if p.name.startswith(self.prefix + "-"))

    def _kill_inside(self, ns: str) -> None:
        """SIGKILL whatever still runs inside `ns` (workers whose master is gone) and wait for it to go."""
        res = run(["ip", "netns", "pids", ns], check=False)
        procs = []
        for word in res.stdout.split():
            with contextlib.suppress(psutil.Error, ValueError):
                proc = psutil.Process(int(word))
                proc.kill()
                procs.append(proc)
        with contextlib.suppress(SandboxError):  # what stays is reported by leftovers()
            wait_for(f"processes in {ns} to go", lambda: not [p for p in procs if _alive(p)], STOP_TIMEOUT)

    def close(self) -> list[str]:
        """Stop the processes (newest first), delete the namespaces, /etc/netns entries, work directory
        and marker; returns what was removed, one line each.  Safe to call again."""
        done: list[str] = []
        for name in reversed(list(self.procs)):
            pid = self.procs[name].pid
            self.stop(name)
            done.append(f"stopped {name} (pid {pid})")
        for ns in self._own_namespaces():
            self._kill_inside(ns)
            run(["ip", "netns", "delete", ns], check=False)
            done.append(f"deleted namespace {ns}")
        for path in sorted(ETC_NETNS_DIR.glob(f"{self.prefix}-*")):
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path}")
        if self._made_etc_netns:
            with contextlib.suppress(OSError):
                ETC_NETNS_DIR.rmdir()
        for path in sorted(Path(tempfile.gettempdir()).glob(f"{self.prefix}-*")):
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path}")
        (MARKER_DIR / self.prefix).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the demos' shared directory goes with the last marker
            MARKER_DIR.rmdir()
        return done

    def leftovers(self) -> list[str]:
        """What of this sandbox still exists (for the demo's last line): namespaces, files, processes."""
        left = [f"namespace {ns}" for ns in self._own_namespaces()]
        left += [str(p) for p in ETC_NETNS_DIR.glob(f"{self.prefix}-*")]
        left += [str(p) for p in Path(tempfile.gettempdir()).glob(f"{self.prefix}-*")]
        left += [f"{name} (pid {p.pid})" for name, p in self.procs.items() if p.poll() is None]
        if self.workdir is not None:  # every process the demo starts, workers too, runs in the work dir
            left += [f"pid {p.pid} ({p.info['name']})" for p in psutil.process_iter(["cwd", "name"])
                     if (p.info["cwd"] or "").startswith(str(self.workdir)) and _alive(p)]
        return left


def wait_for(what: str, test: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes] | None = None,
             log: Path | None = None) -> None:
    """Poll `test()` until true; fail early when `proc` exits, with the tail of `log`."""
    deadline = time.monotonic() + timeout
    while not test():
        exited = proc is not None and proc.poll() is not None
        if exited or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
            why = f"exited with {proc.returncode}" if exited and proc is not None else f"not after {timeout:g}s"
            raise SandboxError(f"{what}: {why}" + (f"\n{tail}" if tail else ""))
        time.sleep(0.05)
