"""Servers and proxies for load tests: nginx, iperf3 and an echo server in the
"Internet" namespace; redsocks and transocks in the client namespace.

Like upstreams.py, each starter writes its configuration into a fresh work
directory, runs the daemon in the foreground under `Lab.popen` and returns
only once it listens, so a benchmark never races a startup.  Readiness is read
from the listening sockets (`ss`), not probed with a connection: a probe would
count as a test to iperf3 and as a redirect loop to transocks.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .netns import INET_V4, INET_V6, Lab
from .servers import iter_pattern
from .upstreams import STARTUP_TIMEOUT, Upstream, _workdir, read_logs

REPO_ROOT = Path(__file__).resolve().parents[2]
ECHO_SCRIPT = Path(__file__).resolve().parent / "echo.py"


@dataclass
class Service:
    """A daemon started in one namespace; `procs[0]` is its main process."""

    kind: str
    ns: str
    port: int
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log_paths: list[Path] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """pid of the main process (`ip netns exec` execs, so it is the daemon)."""
        return self.procs[0].pid

    def processes(self) -> list[psutil.Process]:
        """The main process and all its descendants (e.g. transocks workers)."""
        main = psutil.Process(self.pid)
        return [main, *main.children(recursive=True)]

    def log_text(self) -> str:
        """Everything logged so far, for error messages."""
        return read_logs(self.log_paths)

    def stop(self, lab: Lab) -> None:
        """Stop it now rather than at lab close."""
        lab.stop_many(self.procs)


def pid_in(path: Path) -> int | None:
    """The pid a pidfile names; None while it is missing, empty or half-written."""
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().strip() or 0) or None
    return None


def stop_master(pid: int) -> None:
    """Stop a master this process did not start (the one a USR2 upgrade started) and its workers,
    by pid: TERM to the master, KILL to whatever is left after 10 s."""
    with contextlib.suppress(psutil.Error):
        master = psutil.Process(pid)
        procs = [master, *master.children()]
        master.terminate()
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()


def _spawn(lab: Lab, svc: Service, argv: Sequence[str], log_name: str,
           env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
    log_path = svc.workdir / log_name
    with open(log_path, "ab") as log:
        svc.procs.append(lab.popen(svc.ns, argv, stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(env) if env is not None else None, cwd=cwd))
    svc.log_paths.append(log_path)


def listening_ports(lab: Lab, ns: str) -> set[int]:
    """TCP ports with a listening socket in `ns`."""
    out = lab.run(ns, ["ss", "-Hltn"]).stdout
    ports = set()
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 4:
            ports.add(int(words[3].rsplit(":", 1)[1]))
    return ports


def wait_listening(lab: Lab, svc: Service, timeout: float = STARTUP_TIMEOUT,
                   ready: str | None = None) -> None:
    """Wait until `svc.port` listens in its namespace (and `ready` is in its log)."""
    deadline = time.monotonic() + timeout
    while True:
        dead = [p for p in svc.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{svc.kind} exited with {dead[0].returncode}:\n{svc.log_text()}")
        if svc.port in listening_ports(lab, svc.ns) and (ready is None or ready in svc.log_text()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{svc.kind} not ready on port {svc.port}:\n{svc.log_text()}")
        time.sleep(0.05)


def start_nginx(lab: Lab, files: Mapping[str, int], port: int = 80, workers: int = 1,
                hosts: Iterable[str] = (INET_V4, INET_V6), workdir: Path | None = None) -> Service:
    """nginx in the inet namespace serving `files` (name -> size in bytes).

    No access log and effectively unlimited keep-alive requests, so a load
    generator measures the path to nginx rather than nginx's bookkeeping.
    """
    svc = Service("nginx", lab.inet, port, _workdir(lab, "nginx", workdir))
    www = svc.workdir / "www"
    www.mkdir()
    www.chmod(0o755)
    for name, size in files.items():
        path = www / name
        with open(path, "wb") as f:
            f.writelines(iter_pattern(size, name))
        path.chmod(0o644)
    listens = "\n".join(f"        listen {f'[{h}]' if ':' in h else h}:{port} backlog=4096;"
                        for h in hosts)
    temp = "\n".join(f"    {kind}_temp_path {svc.workdir / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = svc.workdir / "nginx.conf"
    conf.write_text(f"""\
worker_processes {workers};
daemon off;
pid {svc.workdir / 'nginx.pid'};
error_log {svc.workdir / 'error.log'} warn;
events {{
    worker_connections 16384;
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    default_type application/octet-stream;
{temp}
    server {{
{listens}
        root {www};
    }}
}}
""")
    svc.log_paths.append(svc.workdir / "error.log")
    _spawn(lab, svc, ["nginx", "-e", str(svc.workdir / "error.log"), "-p", str(svc.workdir),
                      "-c", str(conf)], "nginx.stderr")
    wait_listening(lab, svc)
    return svc


def start_iperf3(lab: Lab, port: int = 5201, host: str = INET_V4,
                 workdir: Path | None = None) -> Service:
    """iperf3 server in the inet namespace (one test at a time, as iperf3 does)."""
    svc = Service("iperf3", lab.inet, port, _workdir(lab, "iperf3", workdir))
    _spawn(lab, svc, ["iperf3", "-s", "-B", host, "-p", str(port)], "iperf3.log")
    wait_listening(lab, svc)
    return svc


def start_echo(lab: Lab, port: int = 7007, hosts: Iterable[str] = (INET_V4, INET_V6),
               workdir: Path | None = None) -> Service:
    """The asyncio echo server (echo.py) in the inet namespace."""
    svc = Service("echo", lab.inet, port, _workdir(lab, "echo", workdir))
    argv = [sys.executable, str(ECHO_SCRIPT), "--port", str(port)]
    for host in hosts:
        argv += ["--bind", host]
    _spawn(lab, svc, argv, "echo.log")
    wait_listening(lab, svc)
    return svc


def redsocks_conf(port: int, upstream: Upstream) -> str:
    """redsocks' `base` (quiet, stderr, foreground, iptables) and a `redsocks` section on
    127.0.0.1:port relaying to `upstream`."""
    types = {"socks5": "socks5", "socks4": "socks4", "http": "http-connect"}
    auth = ""
    if upstream.auth:
        auth = f'    login = "{upstream.auth[0]}";\n    password = "{upstream.auth[1]}";\n'
    return f"""\
base {{
    log_debug = off;
    log_info = off;
    log = stderr;
    daemon = off;
    redirector = iptables;
}}
redsocks {{
    local_ip = 127.0.0.1;
    local_port = {port};
    ip = {upstream.host};
    port = {upstream.port};
    type = {types[upstream.scheme]};
{auth}}}
"""


def start_redsocks(lab: Lab, upstream: Upstream, port: int = 12345,
                   workdir: Path | None = None) -> Service:
    """redsocks in the client namespace on 127.0.0.1:port, via `upstream` (IPv4 only).

    Per-connection logging is off, as transocks' access log is in the same
    benchmark; the REDIRECT rule is the caller's (`Lab.iptables_redirect`).
    """
    svc = Service("redsocks", lab.client, port, _workdir(lab, "redsocks", workdir))
    conf = svc.workdir / "redsocks.conf"
    conf.write_text(redsocks_conf(port, upstream))
    _spawn(lab, svc, ["redsocks", "-c", str(conf)], "redsocks.log")
    wait_listening(lab, svc)
    return svc


def start_transocks(lab: Lab, proxy_url: str, port: int = 1081, workers: int = 1,
                    args: Sequence[str] = (), workdir: Path | None = None) -> Service:
    """transocks from this checkout in the client namespace on 127.0.0.1 and [::1].

    Returns once every worker is ready; the REDIRECT rule is the caller's.
    """
    svc = Service("transocks", lab.client, port, _workdir(lab, "transocks", workdir))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    argv = [sys.executable, "-m", "transocks", "--listen", f"127.0.0.1:{port}",
            "--listen", f"[::1]:{port}", "--workers", str(workers), "--proxy-url", proxy_url, *args]
    _spawn(lab, svc, argv, "transocks.log", env=env, cwd=REPO_ROOT)
    wait_listening(lab, svc, ready="workers ready")
    return svc
