"""Upstream proxies (dante, tinyproxy, microsocks, squid, usocksd) in the gw namespace.

Each starter writes its config into a fresh work directory, runs the daemon in
the foreground under `Lab.popen`, and returns only once the proxy accepts TCP
connections from the client namespace (usocksd: once its log says its workers
are ready), so tests never race the startup.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from .netns import (
    CLIENT_NET_V4,
    CLIENT_NET_V6,
    GW_EXT_V4,
    GW_EXT_V6,
    GW_INET_IF,
    GW_V4,
    GW_V6,
    TEST_PORT,
    Lab,
)

Auth = tuple[str, str]

TEST_PORTS = (TEST_PORT,)
STARTUP_TIMEOUT = 15.0
REPO_ROOT = Path(__file__).resolve().parents[2]
USOCKSD_READY = "workers ready"


@dataclass
class Upstream:
    """A running proxy reachable on the gw's client-side addresses."""

    kind: str
    scheme: str
    host: str
    port: int
    host6: str | None
    auth: Auth | None
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log_paths: list[Path] = field(default_factory=list)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """The (first) daemon process."""
        return self.procs[0]

    def _url(self, host: str) -> str:
        netloc = f"[{host}]" if ":" in host else host
        if self.auth:
            user, password = self.auth
            netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{netloc}"
        return f"{self.scheme}://{netloc}:{self.port}"

    @property
    def url(self) -> str:
        """Proxy URL on the IPv4 address, credentials included."""
        return self._url(self.host)

    @property
    def url6(self) -> str | None:
        """Proxy URL on the IPv6 address, if this proxy listens there."""
        return self._url(self.host6) if self.host6 else None

    def log_text(self) -> str:
        """All log output so far, for assertion messages and debugging."""
        return read_logs(self.log_paths)

    def stop(self, lab: Lab) -> None:
        """Stop the daemon processes now rather than at lab close."""
        for proc in self.procs:
            lab.stop(proc)


def read_logs(paths: Sequence[Path]) -> str:
    """The logs of a lab process, each under a header naming its file."""
    texts = []
    for path in paths:
        try:
            texts.append(f"==> {path} <==\n{path.read_text(errors='replace')}")
        except OSError as exc:
            texts.append(f"==> {path} <== unreadable: {exc}")
    return "\n".join(texts)


def _workdir(lab: Lab, kind: str, base: Path | None) -> Path:
    """A fresh config/log dir: under `base` (kept for debugging) or a Lab.tempdir."""
    if base is None:
        return lab.tempdir(kind)
    base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=base))
    # Daemons that drop to nobody may still need to write here.
    path.chmod(0o777)
    return path


def _start(lab: Lab, up: Upstream, argv: Sequence[str], log_name: str,
           env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    log_path = up.workdir / log_name
    with open(log_path, "ab") as log:
        up.procs.append(lab.popen(lab.gw, argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd))
    up.log_paths.append(log_path)


def _wait_ready(lab: Lab, up: Upstream, hosts: Sequence[str]) -> None:
    """Wait until every listener accepts from the client ns, failing fast on exit."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    for host in hosts:
        while True:
            dead = [p for p in up.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{up.kind} exited with {dead[0].returncode}:\n{up.log_text()}")
            try:
                lab.wait_tcp(lab.client, host, up.port, timeout=0.5)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{up.kind} not ready on {host}:{up.port}:\n"
                                       f"{up.log_text()}") from None


def _sha512_crypt(password: str) -> str:
    salt = secrets.token_hex(8)
    res = subprocess.run(["openssl", "passwd", "-6", "-salt", salt, password],
                         capture_output=True, text=True, check=True)
    return res.stdout.strip()


def add_netns_user(lab: Lab, ns: str, user: str, password: str) -> None:
    """Create `user` only in the /etc view of `ns` (passwd + shadow overlays).

    `ip netns exec` bind-mounts /etc/netns/<ns>/<file> over /etc/<file>, so
    daemons started afterwards in that namespace see the extra account while
    the host's own password database stays untouched.
    """
    etc = lab.etc_dir(ns)
    passwd = etc / "passwd"
    shadow = etc / "shadow"
    if not passwd.exists():
        shutil.copyfile("/etc/passwd", passwd)
        passwd.chmod(0o644)
    if not shadow.exists():
        shutil.copyfile("/etc/shadow", shadow)
        shadow.chmod(0o640)
    names = {line.split(":", 1)[0] for line in passwd.read_text().splitlines()}
    if user in names:
        return
    with passwd.open("a") as f:
        f.write(f"{user}:x:64999:65534:transocks test user:/nonexistent:/usr/sbin/nologin\n")
    with shadow.open("a") as f:
        f.write(f"{user}:{_sha512_crypt(password)}:19000:0:99999:7:::\n")


def start_dante(lab: Lab, port: int = 1080, auth: Auth | None = None,
                workdir: Path | None = None, udp: bool = False) -> Upstream:
    """danted on GW_V4 and GW_V6, going out through the gw->inet interface.

    With `auth`, the "username" method checks the namespace-local passwd
    and shadow created by add_netns_user.  With `udp` it also serves UDP
    ASSOCIATE (and relays the replies).
    """
    up = Upstream("dante", "socks5", GW_V4, port, GW_V6, auth,
                  _workdir(lab, f"dante{port}", workdir))
    method = "none"
    if auth:
        add_netns_user(lab, lab.gw, *auth)
        method = "username"
    conf = up.workdir / "danted.conf"
    conf.write_text(f"""\
logoutput: {up.workdir / 'danted.log'}
internal: {GW_V4} port = {port}
internal: {GW_V6} port = {port}
external: {GW_INET_IF}
clientmethod: none
socksmethod: {method}
user.privileged: root
user.unprivileged: nobody
timeout.negotiate: 10
timeout.io: 0
client pass {{
    from: {CLIENT_NET_V4} to: 0/0
    log: error
}}
client pass {{
    from: {CLIENT_NET_V6} to: 0/0
    log: error
}}
socks pass {{
    from: 0/0 to: 0/0
    command: connect{' udpassociate udpreply' if udp else ''}
    log: error connect disconnect
}}
""")
    up.log_paths.append(up.workdir / "danted.log")
    _start(lab, up, ["danted", "-f", str(conf), "-p", str(up.workdir / "danted.pid")],
           "danted.stderr")
    _wait_ready(lab, up, [GW_V4, GW_V6])
    return up


def start_tinyproxy(lab: Lab, port: int = 3128, auth: Auth | None = None,
                    connect_ports: Sequence[int] | None = TEST_PORTS,
                    workdir: Path | None = None) -> Upstream:
    """tinyproxy (HTTP CONNECT) on GW_V4 and GW_V6 from a single instance.

    tinyproxy 1.11 accepts several `Listen` lines, so one process covers both
    families.  `connect_ports=None` allows CONNECT to any port.
    """
    up = Upstream("tinyproxy", "http", GW_V4, port, GW_V6, auth,
                  _workdir(lab, f"tinyproxy{port}", workdir))
    lines = [
        "User nobody",
        "Group nogroup",
        f"Port {port}",
        f"Listen {GW_V4}",
        f"Listen {GW_V6}",
        "Timeout 600",
        f'LogFile "{up.workdir / "tinyproxy.log"}"',
        "LogLevel Info",
        "MaxClients 512",
        f"Allow {CLIENT_NET_V4}",
        f"Allow {CLIENT_NET_V6}",
        "DisableViaHeader Yes",
    ]
    lines += [f"ConnectPort {p}" for p in connect_ports or ()]
    if auth:
        lines.append(f"BasicAuth {auth[0]} {auth[1]}")
    conf = up.workdir / "tinyproxy.conf"
    conf.write_text("\n".join(lines) + "\n")
    log = up.workdir / "tinyproxy.log"
    log.touch()
    log.chmod(0o666)
    up.log_paths.append(log)
    _start(lab, up, ["tinyproxy", "-d", "-c", str(conf)], "tinyproxy.stderr")
    _wait_ready(lab, up, [GW_V4, GW_V6])
    return up


def start_microsocks(lab: Lab, port: int = 1083, auth: Auth | None = None,
                     workdir: Path | None = None) -> Upstream:
    """microsocks on GW_V4 and GW_V6: one process per address (it takes a single -i)."""
    up = Upstream("microsocks", "socks5", GW_V4, port, GW_V6, auth,
                  _workdir(lab, f"microsocks{port}", workdir))
    extra = ["-u", auth[0], "-P", auth[1]] if auth else []
    for host in (GW_V4, GW_V6):
        _start(lab, up, ["microsocks", "-i", host, "-p", str(port), *extra],
               f"microsocks-{'v6' if ':' in host else 'v4'}.log")
    _wait_ready(lab, up, [GW_V4, GW_V6])
    return up


def start_squid(lab: Lab, port: int = 3130) -> Upstream:
    """squid as a second HTTP CONNECT implementation (no auth), both families.

    squid refuses to run as root and opens its logs only after switching to
    the "proxy" user, so its work directory is a Lab.tempdir (pytest's own
    temp dirs are root-only) and is deleted at lab close.
    """
    if shutil.which("squid") is None:
        raise FileNotFoundError("squid is not installed")
    up = Upstream("squid", "http", GW_V4, port, GW_V6, None, lab.tempdir(f"squid{port}"))
    ports = " ".join(str(p) for p in TEST_PORTS)
    conf = up.workdir / "squid.conf"
    conf.write_text(f"""\
http_port {GW_V4}:{port}
http_port [{GW_V6}]:{port}
acl clients src {CLIENT_NET_V4} {CLIENT_NET_V6}
acl test_ports port {ports}
acl CONNECT method CONNECT
http_access deny CONNECT !test_ports
http_access allow clients
http_access deny all
cache deny all
cache_mem 8 MB
cache_dir null /tmp
shutdown_lifetime 0 seconds
pinger_enable off
pid_filename {up.workdir / 'squid.pid'}
access_log stdio:{up.workdir / 'access.log'}
cache_log {up.workdir / 'cache.log'}
cache_store_log none
coredump_dir {up.workdir}
dns_nameservers 127.0.0.1
cache_effective_user proxy
""")
    up.log_paths += [up.workdir / "cache.log", up.workdir / "access.log"]
    _start(lab, up, ["squid", "-N", "-f", str(conf)], "squid.stderr")
    _wait_ready(lab, up, [GW_V4, GW_V6])
    return up



def start_usocksd(lab: Lab, port: int = 1082, workers: int = 1, extra_args: Sequence[str] = (), *,
                  allow_from: Sequence[str] = (CLIENT_NET_V4, CLIENT_NET_V6),
                  egress: Sequence[str] = (GW_EXT_V4, GW_EXT_V6),
                  env: Mapping[str, str] | None = None, workdir: Path | None = None,
                  wait: bool = True, timeout: float = STARTUP_TIMEOUT) -> Upstream:
    """usocksd from this checkout (`python -m transocks.usocksd`) on GW_V4 and GW_V6.

    Clients from `allow_from` are served; outbound connections leave from the
    `egress` addresses, by default the gw's own inet-side address per family,
    which is where dante's go out too (the kernel NAT of a bench lab has an
    address of its own).  Pass `egress=()` to let the kernel choose, e.g.
    when `extra_args` bring their own `--egress-address` pool.  The access
    log goes to the log file (stderr) unless `extra_args` turn it off.
    Readiness is the master's "workers ready" log line rather than a probe
    connection, which would show up in the access log; with `wait=False` the
    caller waits itself (`wait_usocksd`).
    """
    up = Upstream("usocksd", "socks5", GW_V4, port, GW_V6, None,
                  _workdir(lab, f"usocksd{port}", workdir))
    argv = [sys.executable, "-m", "transocks.usocksd", "--listen", f"{GW_V4}:{port}",
            "--listen", f"[{GW_V6}]:{port}", "--workers", str(workers)]
    argv += [f"--allow-from={net}" for net in allow_from]
    argv += [f"--egress-address={addr}" for addr in egress]
    argv += extra_args
    full_env = dict(os.environ)
    full_env.setdefault("USOCKSD_NAME_CHECK_TIMEOUT", "5")  # a loaded test machine (see conftest's daemon)
    full_env.update(env or {})
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p)
    full_env["PYTHONUNBUFFERED"] = "1"
    _start(lab, up, argv, "usocksd.log", env=full_env, cwd=REPO_ROOT)
    if wait:
        wait_usocksd(up, timeout)
    return up


def wait_usocksd(up: Upstream, timeout: float = STARTUP_TIMEOUT) -> None:
    """Wait for usocksd's "workers ready" line, failing fast when it exits."""
    deadline = time.monotonic() + timeout
    while USOCKSD_READY not in up.log_text():
        rc = up.proc.poll()
        if rc is not None or time.monotonic() > deadline:
            raise RuntimeError(f"usocksd not ready (rc={rc}):\n{up.log_text()[-4000:]}")
        time.sleep(0.05)
