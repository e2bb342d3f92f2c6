"""The setups under test, each started and stopped in turn on one lab.

NAT is the kernel alone (the client routes through the gw, which
masquerades); the others REDIRECT the client's TCP to a local transparent
proxy that tunnels through a SOCKS5 upstream on the gw: dante, or usocksd
from this checkout.  A setup on usocksd is named after its client plus
"-usocksd" (redsocks-usocksd); on dante it is the client's name alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

import psutil

from tests.lab.netns import INET_NET_V4, Lab, Redirect
from tests.lab.services import REPO_ROOT, Service, start_redsocks, start_transocks, wait_listening
from tests.lab.upstreams import Upstream

REDSOCKS_PORT = 12345
TRANSOCKS_PORT = 1081
FLOOR_PORT = 1083
FLOOR = "floor"  # bench.floor's minimal proxy; on usocksd "floor-usocksd"
UPSTREAMS = ("dante", "usocksd")
NOSNIFF = "-nosniff"  # X-nosniff is setup X with --sniff-ports= (sniffing off)
SHARED = "-shared"  # X-shared is setup X with tcp_migrate_req=0: the workers share each listening socket


@dataclass
class Setup:
    """One way of getting the client's traffic to the Internet."""

    name: str
    label: str
    upstream: str | None = "dante"  # which of the lab's upstreams it tunnels through (None: NAT)
    service: Service | None = None
    redirect: Redirect | None = None

    def start(self, lab: Lab, upstream: Upstream | None) -> None:
        """Start the proxy and its REDIRECT rule (nothing for NAT)."""

    def stop(self, lab: Lab) -> None:
        """Undo `start`, also after a failure half-way through it."""
        if self.redirect is not None:
            self.redirect.remove()
            self.redirect = None
        if self.service is not None:
            self.service.stop(lab)
            self.service = None

    def processes(self) -> list[psutil.Process]:
        """Every process of the proxy (empty for NAT)."""
        return self.service.processes() if self.service else []

    def profile_pids(self) -> list[int]:
        """The processes of the proxy that move bytes (what py-spy should watch)."""
        return [p.pid for p in self.processes()]


class NatSetup(Setup):
    """Kernel NAT only: the masquerade rule is part of the lab."""


class RedsocksSetup(Setup):
    """redsocks 0.5 (Debian) with an IPv4 REDIRECT rule."""

    def start(self, lab: Lab, upstream: Upstream | None) -> None:
        assert upstream is not None
        self.service = start_redsocks(lab, upstream, REDSOCKS_PORT)
        self.redirect = lab.iptables_redirect(REDSOCKS_PORT, v4_dst=INET_NET_V4, v6_dst=None)


class FloorSetup(Setup):
    """bench.floor, the minimal proxy every other setup's CPU per connection is read against,
    with REDIRECT for IPv4 and IPv6 like transocks."""

    def start(self, lab: Lab, upstream: Upstream | None) -> None:
        assert upstream is not None
        self.service = svc = Service("floor", lab.client, FLOOR_PORT, lab.tempdir("floor"))
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "bench.floor", "--listen", f"127.0.0.1:{FLOOR_PORT}",
                "--listen", f"[::1]:{FLOOR_PORT}", "--upstream", f"{upstream.host}:{upstream.port}"]
        log = svc.workdir / "floor.log"
        with open(log, "ab") as out:
            svc.procs.append(lab.popen(lab.client, argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                       cwd=REPO_ROOT))
        svc.log_paths.append(log)
        wait_listening(lab, svc)
        self.redirect = lab.iptables_redirect(FLOOR_PORT)


@dataclass
class TransocksSetup(Setup):
    """transocks from this checkout; access log off so logging is not what is measured,
    except in the `-log` setup, which runs what users run (the default, access log on)."""

    workers: int = 1
    extra_args: list[str] = field(default_factory=list)
    access_log: bool = False
    migrate_req: int = 1  # the client namespace's net.ipv4.tcp_migrate_req: 1 gives each worker its own socket

    def start(self, lab: Lab, upstream: Upstream | None) -> None:
        assert upstream is not None
        lab.sysctl(lab.client, f"net.ipv4.tcp_migrate_req={self.migrate_req}")
        args = [*([] if self.access_log else ["--access-log", "off"]), *self.extra_args]
        self.service = start_transocks(lab, upstream.url, TRANSOCKS_PORT, self.workers, args)
        self.redirect = lab.iptables_redirect(TRANSOCKS_PORT)

    def profile_pids(self) -> list[int]:
        return [p.pid for p in self.processes()[1:]]  # the workers, not the master


def all_setups(workers: int, extra_args: list[str]) -> list[Setup]:
    """NAT, then each client on dante, followed by the same client on usocksd if it has one.

    Clients: redsocks, the floor, transocks with one worker and with `workers` workers;
    on usocksd only redsocks, the floor and transocks with one worker.
    """
    setups: list[Setup] = [NatSetup("nat", "kernel NAT", upstream=None)]
    for up in UPSTREAMS:
        setups.append(RedsocksSetup(_name("redsocks", up), f"redsocks via {up}", upstream=up))
    for up in UPSTREAMS:
        setups.append(FloorSetup(_name(FLOOR, up), f"floor (bench.floor) via {up}", upstream=up))
    for n in dict.fromkeys((1, workers)):
        for up in UPSTREAMS if n == 1 else ("dante",):
            setups.append(TransocksSetup(_name(f"transocks-w{n}", up), f"transocks --workers {n} via {up}",
                                         upstream=up, workers=n, extra_args=extra_args))
            if n > 1:
                setups.append(TransocksSetup(f"transocks-w{n}{SHARED}",
                                             f"transocks --workers {n} via {up}, one listening socket shared by the workers",
                                             upstream=up, workers=n, extra_args=extra_args, migrate_req=0))
            if n == 1:
                setups.append(TransocksSetup(_name("transocks-w1-log", up),
                                             f"transocks --workers 1 via {up}, access log on (the default)",
                                             upstream=up, workers=1, extra_args=extra_args, access_log=True))
            if n == 1 and up == "dante":
                # The same with sniffing off: the `conn` load's port 80 is a default sniff port.
                setups.append(TransocksSetup(f"transocks-w1{NOSNIFF}", "transocks --workers 1 via dante, sniffing off",
                                             workers=1, extra_args=[*extra_args, "--sniff-ports="]))
    return setups


def with_floors(chosen: list[Setup], everything: list[Setup]) -> list[Setup]:
    """`chosen`, plus the floor on the upstream of each transocks setup in it, in `everything`'s order:
    the floor runs beside the product in every round."""
    names = {s.name for s in chosen}
    names |= {_name(FLOOR, s.upstream) for s in chosen if isinstance(s, TransocksSetup) and s.upstream}
    return [s for s in everything if s.name in names]


def _name(client: str, upstream: str) -> str:
    return client if upstream == "dante" else f"{client}-{upstream}"
