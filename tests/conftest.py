"""Fixtures for the network-namespace lab (see tests/lab/).

Tests that use `lab`, `upstreams`, `squid` or `daemon` (or carry the
`netns` mark) are skipped with the reason when the machine cannot run the lab
(not root, tools missing).  Set TRANSOCKS_LAB_REQUIRED=1 (as CI should) to turn
that skip into a failure so a broken machine can never look green.
TRANSOCKS_LAB_PCAP=DIR records every lab's SYN, FIN and RST segments in its client
namespace to DIR/PREFIX.pcap (tcpdump).
TRANSOCKS_LAB_PREFIX=tskXXXXXX fixes the namespace prefix, e.g. to inspect a
running session with `ip netns exec tskXXXXXX-client ...`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.lab import upstreams as ups
from tests.lab.netns import (
    INET2_V4,
    INET2_V6,
    INET_V4,
    INET_V6,
    TEST_PORT,
    Lab,
    Redirect,
    require_root_and_tools,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVERS_SCRIPT = Path(__file__).resolve().parent / "lab" / "servers.py"
INET_ADDRS = (INET_V4, INET2_V4, INET_V6, INET2_V6)
AUTH = ("tsk", "s3cret")
LAB_FIXTURES = {"lab", "upstreams", "squid", "daemon"}
DAEMON_START_TIMEOUT = 20.0
LOG_TAIL = 4000

LAB_UNAVAILABLE = require_root_and_tools()


def _lab_required() -> bool:
    return os.environ.get("TRANSOCKS_LAB_REQUIRED", "") not in ("", "0")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "netns: needs root and the network-namespace lab (skipped otherwise)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if LAB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.netns)
        if LAB_UNAVAILABLE and not _lab_required() and item.get_closest_marker("netns"):
            item.add_marker(pytest.mark.skip(reason=LAB_UNAVAILABLE))


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def lab_logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory for the session's server and proxy logs."""
    return tmp_path_factory.mktemp("lab-logs")


@pytest.fixture(scope="session")
def lab(lab_logdir: Path) -> Iterator[Lab]:
    """The namespaces with the test servers listening on every inet address."""
    if LAB_UNAVAILABLE:
        if _lab_required():
            pytest.fail(f"TRANSOCKS_LAB_REQUIRED is set but: {LAB_UNAVAILABLE}")
        pytest.skip(LAB_UNAVAILABLE)
    # A SIGTERM (e.g. from `timeout`) must unwind through teardown, not skip it.
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        with Lab.create(os.environ.get("TRANSOCKS_LAB_PREFIX") or None) as the_lab:
            log_path = lab_logdir / "servers.log"
            argv = [sys.executable, str(SERVERS_SCRIPT), "--port", str(TEST_PORT)]
            for addr in INET_ADDRS:
                argv += ["--bind", addr]
            with open(log_path, "ab") as log:
                proc = the_lab.popen(the_lab.inet, argv, stdout=log, stderr=subprocess.STDOUT)
            for addr in INET_ADDRS:
                if proc.poll() is not None:
                    raise RuntimeError(f"servers.py exited: {log_path.read_text()}")
                the_lab.wait_tcp(the_lab.inet, addr, TEST_PORT)
            capture_dir = os.environ.get("TRANSOCKS_LAB_PCAP")
            if capture_dir:
                # Connection openings and endings in the client namespace (loopback and
                # its link), to explain a refused or reset connection after the fact.
                the_lab.popen(the_lab.client, ["tcpdump", "-i", "any", "-nn", "-s", "96", "-w",
                              os.path.join(capture_dir, f"{the_lab.prefix}.pcap"),
                              "tcp[tcpflags] & (tcp-syn|tcp-rst|tcp-fin) != 0"])
                time.sleep(0.5)  # tcpdump attached before the first test connection
            yield the_lab
    finally:
        if previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@dataclass
class Upstreams:
    """The session's running upstream proxies (all in the gw namespace)."""

    dante: ups.Upstream
    dante_auth: ups.Upstream
    tinyproxy: ups.Upstream
    tinyproxy_auth: ups.Upstream
    microsocks: ups.Upstream
    auth: tuple[str, str] = AUTH

    def all(self) -> list[ups.Upstream]:
        """Every proxy, for parametrised smoke checks and failure dumps."""
        return [self.dante, self.dante_auth, self.tinyproxy, self.tinyproxy_auth,
                self.microsocks]


@pytest.fixture(scope="session")
def upstreams(lab: Lab, lab_logdir: Path) -> Upstreams:
    """dante :1080 and :1082 (user tsk/s3cret), tinyproxy :3128 and :3129
    (BasicAuth tsk/s3cret), microsocks :1083; all on GW_V4 and GW_V6."""
    return Upstreams(
        dante=ups.start_dante(lab, 1080, workdir=lab_logdir),
        dante_auth=ups.start_dante(lab, 1082, auth=AUTH, workdir=lab_logdir),
        tinyproxy=ups.start_tinyproxy(lab, 3128, workdir=lab_logdir),
        tinyproxy_auth=ups.start_tinyproxy(lab, 3129, auth=AUTH, workdir=lab_logdir),
        microsocks=ups.start_microsocks(lab, 1083, workdir=lab_logdir),
    )


@pytest.fixture(scope="session")
def squid(lab: Lab) -> ups.Upstream:
    """squid :3130 as a second HTTP CONNECT proxy; skipped when not installed."""
    try:
        return ups.start_squid(lab, 3130)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@dataclass
class Daemon:
    """A transocks process running in the client namespace."""

    lab: Lab
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    argv: list[str]
    redirects: list[Redirect] = field(default_factory=list)
    ns: str = ""  # the namespace it runs in (the client's unless a test says otherwise)

    @property
    def pid(self) -> int:
        """pid of the transocks master (the Popen itself: `ip netns exec` execs)."""
        return self.proc.pid

    def log_text(self) -> str:
        """Everything the daemon printed so far (stdout and stderr)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def send_signal(self, sig: int) -> None:
        """Send a signal without waiting, e.g. SIGHUP for a reload."""
        os.kill(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5) -> int | None:
        """Signal by pid, SIGKILL after `timeout`; returns the exit status."""
        return self.lab.stop(self.proc, sig, timeout)

    def remove_redirects(self) -> None:
        """Drop this daemon's REDIRECT rules (also done at teardown)."""
        for redirect in self.redirects:
            redirect.remove()


DaemonFactory = Callable[..., Daemon]


@pytest.fixture(params=["shared", "per-slot"])
def layout(request: pytest.FixtureRequest, lab: Lab) -> Iterator[str]:
    """The listening-socket layout, which the master picks from the client namespace's
    net.ipv4.tcp_migrate_req: 0 shares one socket per address, 1 gives each worker slot its own."""
    lab.sysctl(lab.client, f"net.ipv4.tcp_migrate_req={int(request.param == 'per-slot')}")
    yield request.param
    lab.sysctl(lab.client, "net.ipv4.tcp_migrate_req=0")


@pytest.fixture
def daemon(lab: Lab, tmp_path: Path) -> Iterator[DaemonFactory]:
    """Factory: ``daemon(["--proxy-url", url], listen_port=1081)`` starts transocks.

    It runs ``python -m transocks --listen 127.0.0.1:PORT --listen [::1]:PORT
    --workers 1 ARGS`` from the repo root inside the client namespace,
    REDIRECTs the client's traffic for the inet networks to PORT and returns
    once 127.0.0.1:PORT accepts.  Everything is stopped and removed at test end.
    `wrap` prefixes the command with an exec-style wrapper such as
    ``["prlimit", "--nofile=40:40"]`` (it must exec, so .pid stays transocks).
    `ns` runs it in another namespace (e.g. the gw, as a router) and `listens`
    replaces the loopback listen addresses.
    """
    started: list[Daemon] = []

    def start(args: Sequence[str], listen_port: int = 1081, *, redirect: bool = True,
              wait: bool = True, workers: int = 1, module: str = "transocks",
              env: dict[str, str] | None = None, wrap: Sequence[str] = (),
              ns: str | None = None, listens: Sequence[str] | None = None) -> Daemon:
        if listens is None:
            listens = (f"127.0.0.1:{listen_port}", f"[::1]:{listen_port}")
        argv = [*wrap, sys.executable, "-m", module, *(f"--listen={a}" for a in listens),
                "--workers", str(workers), *args]
        full_env = dict(os.environ)
        # On a loaded test machine a hosts-file lookup can wait past the 1 s default in a busy
        # thread pool; tests about that timeout set their own.
        full_env.setdefault("TRANSOCKS_NAME_CHECK_TIMEOUT", "5")
        full_env.update(env or {})
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p)
        full_env["PYTHONUNBUFFERED"] = "1"
        log_path = tmp_path / f"transocks-{listen_port}-{len(started)}.log"
        with open(log_path, "ab") as log:
            proc = lab.popen(ns or lab.client, argv, stdout=log, stderr=subprocess.STDOUT,
                             env=full_env, cwd=REPO_ROOT)
        d = Daemon(lab, proc, listen_port, log_path, argv, ns=ns or lab.client)
        started.append(d)
        if redirect:
            d.redirects.append(lab.iptables_redirect(listen_port))
        if wait:
            _wait_daemon(d)
        return d

    try:
        yield start
    finally:
        for d in reversed(started):
            with contextlib.suppress(Exception):
                d.stop()
            d.remove_redirects()
            lab.forget_connections(d.ns)  # also those diverted by rules it applied itself
            # pytest shows teardown output only for failing tests: the log tail.
            text = d.log_text()
            print(f"--- transocks pid {d.pid} rc={d.proc.returncode} {d.log_path} ---\n"
                  f"{text[-LOG_TAIL:]}")


def _wait_daemon(d: Daemon) -> None:
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while True:
        if d.proc.poll() is not None:
            raise RuntimeError(f"transocks exited with {d.proc.returncode} before listening:\n"
                               f"{d.log_text()[-LOG_TAIL:]}")
        try:
            d.lab.wait_tcp(d.ns, "127.0.0.1", d.port, timeout=0.25)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"transocks not listening on 127.0.0.1:{d.port} after "
                    f"{DAEMON_START_TIMEOUT}s:\n{d.log_text()[-LOG_TAIL:]}") from None
