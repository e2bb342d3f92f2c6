"""Build the lab, run every load against every setup in turn, collect metrics.

The lab is tests/lab's three namespaces: client (load generators, the proxy
under test, REDIRECT rules), gw (router with masquerade, the SOCKS5 upstreams
dante and usocksd), inet (nginx, iperf3, echo server).  Setups run one after
the other on the same lab, each with the same loads in the same order, and
nothing is pinned to a CPU.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.lab.names import hosts_overlay
from tests.lab.netns import GW_NAT_V4, INET_V4, Lab, require_root_and_tools
from tests.lab.services import Service, start_echo, start_iperf3, start_nginx
from tests.lab.upstreams import Upstream, start_dante, start_usocksd

from . import loads
from .setups import UPSTREAMS, Setup, TransocksSetup

SMALL = "small.bin"
LARGE = "large.bin"
HTTP_PORT = 80
IPERF_PORT = 5201
ECHO_PORT = 7007
DANTE_PORT = 1080
USOCKSD_PORT = 1082
REPO = Path(__file__).resolve().parent.parent
# The web server's name in the client namespace's hosts file: requests carry it as their Host, so
# transocks' default sniffing recovers it and checks it (a cached lookup per connection), as it
# would a real site's.
HTTP_NAME = "www.example.com"
HTTP_URL = f"http://{HTTP_NAME}:{HTTP_PORT}"


@dataclass
class Options:
    duration: float = 5.0
    idle_conns: int = 2000
    small_size: int = 1024
    large_size: int = 64 << 20
    loads: list[str] = field(default_factory=lambda: list(LOADS))
    profile_dir: Path | None = None
    quiet_wait: float = 30.0
    upstreams: list[str] = field(default_factory=lambda: list(UPSTREAMS))
    usocksd_workers: int = 1
    usocksd_args: list[str] = field(default_factory=list)
    log: Callable[[str], None] = print

    def usocksd_extra_args(self) -> list[str]:
        """usocksd's flags besides listen, workers, allow-from and egress (start_usocksd's)."""
        return ["--access-log", "off", *self.usocksd_args]


@dataclass
class Env:
    lab: Lab
    opts: Options
    nginx: Service
    iperf: Service
    echo: Service
    upstreams: dict[str, Upstream]
    foreign: Foreign

    def upstream_of(self, setup: Setup) -> Upstream | None:
        return self.upstreams[setup.upstream] if setup.upstream else None


def _load_idle(env: Env, setup: Setup) -> dict[str, float]:
    upstream = env.upstream_of(setup)
    tree = (lambda: _tree(upstream.proc.pid)) if upstream else None
    return loads.hold_idle(env.lab, INET_V4, ECHO_PORT, env.opts.idle_conns, setup.processes, tree)


def _load_iperf(streams: int) -> Callable[[Env, Setup], dict[str, float]]:
    def run(env: Env, setup: Setup) -> dict[str, float]:
        return loads.iperf3(env.lab, INET_V4, IPERF_PORT, env.opts.duration, streams)
    return run


def _load_wrk(connections: int, close: bool = False, path: str = SMALL) -> Callable[[Env, Setup], dict[str, float]]:
    def run(env: Env, setup: Setup) -> dict[str, float]:
        return loads.wrk(env.lab, f"{HTTP_URL}/{path}", connections,
                         env.opts.duration, close=close)
    return run


LOADS: dict[str, Callable[[Env, Setup], dict[str, float]]] = {
    "idle": _load_idle,
    "iperf1": _load_iperf(1),
    "iperf8": _load_iperf(8),
    "conn": _load_wrk(64, close=True),
    "ka64": _load_wrk(64),
    "ka1": _load_wrk(1),
    "download": _load_wrk(1, path=LARGE),
}


def _cpu_split(procs: list[psutil.Process]) -> tuple[float, float]:
    """(user, system) CPU seconds of a process tree from /proc, reaped children included
    (dante forks and reaps)."""
    user = system = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            user += t.user + t.children_user
            system += t.system + t.children_system
    return user, system


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    return sum(_cpu_split(procs))


def _python_workers(env: Env, setup: Setup) -> list[tuple[str, int]]:
    """(kind, pid) of this checkout's byte-moving processes in a setup: transocks and usocksd workers."""
    out = [("transocks", pid) for pid in setup.profile_pids()] if isinstance(setup, TransocksSetup) else []
    upstream = env.upstream_of(setup)
    if upstream is not None and upstream.kind == "usocksd":
        with contextlib.suppress(psutil.Error):
            out += [("usocksd", p.pid) for p in psutil.Process(upstream.proc.pid).children()]
    return out


@contextlib.contextmanager
def _profiled(env: Env, setup: Setup, load: str) -> Iterator[None]:
    """py-spy record every transocks and usocksd worker of the setup while the load runs."""
    workers = _python_workers(env, setup) if env.opts.profile_dir is not None else []
    if not workers:
        yield
        return
    assert env.opts.profile_dir is not None
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    env.opts.profile_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for kind, pid in workers:
        out = env.opts.profile_dir / f"{setup.name}-{load}-{kind}-{pid}.txt"
        procs.append(subprocess.Popen(
            [pyspy, "record", "--pid", str(pid), "--rate", "200", "--nonblocking",
             "--format", "raw", "--duration", f"{env.opts.duration + 2:g}", "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        yield
    finally:
        for p in procs:
            try:
                p.wait(env.opts.duration + 30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Foreign:
    """CPU used by processes outside this benchmark's namespaces (other work on the machine).

    The lab shares its two cores with whatever else runs; a load whose
    numbers were taken while something else burnt CPU is flagged.  Processes
    that both start and end within one load are missed, so this is a lower
    bound.
    """

    def __init__(self, lab: Lab) -> None:
        self.ours = {os.stat(lab.netns_path(ns)).st_ino for ns in lab.namespaces}
        self.me = os.getpid()

    def cpu_seconds(self) -> dict[int, float]:
        out = {}
        for p in psutil.process_iter():
            try:
                if p.pid == self.me or os.stat(f"/proc/{p.pid}/ns/net").st_ino in self.ours:
                    continue
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except (psutil.Error, OSError):
                continue
        return out

    def busy_pct(self, before: dict[int, float], after: dict[int, float], elapsed: float) -> float:
        used = sum(t - before.get(pid, 0.0) for pid, t in after.items())
        return 100.0 * used / elapsed / (os.cpu_count() or 1)

    def wait_quiet(self, log: Callable[[str], None], limit_pct: float = 10.0, max_wait: float = 30.0) -> float:
        """Wait (up to max_wait) for other work to use under limit_pct of the machine; returns the last reading."""
        deadline = time.monotonic() + max_wait
        while True:
            before = self.cpu_seconds()
            time.sleep(1.0)
            pct = self.busy_pct(before, self.cpu_seconds(), 1.0)
            if pct < limit_pct or time.monotonic() > deadline:
                return pct
            log(f"  other processes use {pct:.0f}% of the machine; waiting")


def _tree(pid: int) -> list[psutil.Process]:
    main = psutil.Process(pid)
    return [main, *main.children(recursive=True)]


def measure(env: Env, setup: Setup, load: str) -> dict[str, float]:
    """One load on one setup, with the CPU use of the proxy and of its upstream, and how busy the machine was."""
    procs = setup.processes()
    upstream = env.upstream_of(setup)
    foreign0 = env.foreign.cpu_seconds()
    cpu0 = _cpu_split(procs)
    upstream0 = _cpu_seconds(_tree(upstream.proc.pid)) if upstream else 0.0
    sys0 = psutil.cpu_times()
    t0 = time.monotonic()
    with _profiled(env, setup, load):
        res = LOADS[load](env, setup)
    elapsed = time.monotonic() - t0
    sys1 = psutil.cpu_times()
    res["foreign_cpu_pct"] = env.foreign.busy_pct(foreign0, env.foreign.cpu_seconds(), elapsed)
    total = sum(sys1) - sum(sys0)
    res["machine_busy_pct"] = 100.0 * (1 - (sys1.idle - sys0.idle) / total) if total else 0.0
    if procs:
        user, system = (after - before for after, before in zip(_cpu_split(setup.processes()), cpu0))
        res["proxy_cpu_pct"] = 100.0 * (user + system) / elapsed
        requests = res.get("requests", 0.0)
        if requests:
            res["proxy_user_us_per_req"] = 1e6 * user / requests
            res["proxy_sys_us_per_req"] = 1e6 * system / requests
            res["proxy_us_per_req"] = 1e6 * (user + system) / requests
    if upstream is not None:
        res["upstream_cpu_pct"] = 100.0 * (_cpu_seconds(_tree(upstream.proc.pid)) - upstream0) / elapsed
    return res


def run_setup(env: Env, setup: Setup) -> dict[str, dict[str, float]]:
    """Start the setup, prove the path works, run the loads, stop it."""
    out: dict[str, dict[str, float]] = {}
    env.foreign.wait_quiet(env.opts.log, max_wait=env.opts.quiet_wait)
    try:
        setup.start(env.lab, env.upstream_of(setup))
        env.lab.run(env.lab.client, ["curl", "-sSf", "-o", "/dev/null", "--max-time", "10",
                                     f"{HTTP_URL}/{SMALL}"])
        for load in env.opts.loads:
            env.opts.log(f"  {setup.name}: {load} ...")
            try:
                out[load] = measure(env, setup, load)
            except loads.LoadError as exc:
                env.opts.log(f"  {setup.name}: {load} FAILED: {exc}")
                out[load] = {"failed": 1.0}
            env.opts.log(f"  {setup.name}: {load} {_short(out[load])}")
    finally:
        setup.stop(env.lab)
    return out


def _short(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def new_lab() -> Lab:
    """The namespaces, with room for many short connections and NAT on the gw."""
    lab = Lab.create()
    try:
        for ns in (lab.client, lab.gw):
            # A few thousand short connections a second for a minute must
            # not run out of ports to TIME_WAIT; the same for every setup.
            lab.sysctl(ns, "net.ipv4.ip_local_port_range=1024 65000")
            lab.sysctl(ns, "net.ipv4.tcp_tw_reuse=1")
        # Fast Open may be served on the gw: only listeners that ask for it
        # (usocksd --tcp-fastopen) do, so every other setup is unchanged.
        lab.sysctl(lab.gw, "net.ipv4.tcp_fastopen=3")
        lab.masquerade(to_source=GW_NAT_V4)
        names = hosts_overlay(lab, lab.client, {HTTP_NAME: [INET_V4]})  # seen by what starts from here on
        names.__enter__()
        lab.add_cleanup(lambda: names.__exit__(None, None, None))
    except BaseException:
        lab.close()
        raise
    return lab


def build_lab(opts: Options) -> Env:
    """The namespaces, NAT on the gw, the upstreams (dante, usocksd), nginx, iperf3 and the echo server."""
    lab = new_lab()
    try:
        upstreams: dict[str, Upstream] = {}
        if "dante" in opts.upstreams:
            upstreams["dante"] = start_dante(lab, DANTE_PORT)
        if "usocksd" in opts.upstreams:
            upstreams["usocksd"] = start_usocksd(lab, USOCKSD_PORT, opts.usocksd_workers,
                                                 opts.usocksd_extra_args())
        nginx = start_nginx(lab, {SMALL: opts.small_size, LARGE: opts.large_size}, HTTP_PORT)
        iperf = start_iperf3(lab, IPERF_PORT)
        echo = start_echo(lab, ECHO_PORT)
    except BaseException:
        lab.close()
        raise
    return Env(lab, opts, nginx, iperf, echo, upstreams, Foreign(lab))


def raise_fd_limit() -> None:
    """Children inherit it: 2000 held connections need more than 1024 fds."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def preflight() -> str | None:
    """Why the benchmark cannot run here, or None."""
    why = require_root_and_tools()
    if why:
        return why
    missing = [t for t in ("nginx", "iperf3", "wrk", "redsocks", "ss") if shutil.which(t) is None]
    if missing:
        return "missing tools: " + ", ".join(missing) + " (apt-get install nginx-light iperf3 wrk redsocks)"
    return None


def _dpkg_version(pkg: str) -> str:
    res = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True, check=False)
    return res.stdout.strip() or "?"


def _git(*args: str) -> str:
    res = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
    return res.stdout.strip()


def metadata() -> dict[str, Any]:
    """Machine, kernel and versions, so results can be compared across runs."""
    import gevent
    import greenlet

    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "python": platform.python_version(),
        "gevent": gevent.__version__,
        "greenlet": greenlet.__version__,
        "git": _git("rev-parse", "--short", "HEAD") + ("+dirty" if _git("status", "--porcelain", "transocks") else ""),
        "packages": {p: _dpkg_version(p) for p in ("redsocks", "dante-server", "nginx-light", "iperf3", "wrk")},
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()
