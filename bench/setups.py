"""The setups under test, each started and stopped in turn on one lab.

NAT is the kernel alone (the client routes through the gw, which
masquerades); the others REDIRECT the client's TCP to a local transparent
proxy that tunnels through the same dante on the gw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psutil

from tests.lab.netns import INET_NET_V4, Lab, Redirect
from tests.lab.services import Service, start_redsocks, start_transocks
from tests.lab.upstreams import Upstream

REDSOCKS_PORT = 12345
TRANSOCKS_PORT = 1081


@dataclass
class Setup:
    """One way of getting the client's traffic to the Internet."""

    name: str
    label: str
    service: Service | None = None
    redirect: Redirect | None = None

    def start(self, lab: Lab, upstream: Upstream) -> None:
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
        """The processes that move bytes (what py-spy should watch)."""
        return [p.pid for p in self.processes()]


class NatSetup(Setup):
    """Kernel NAT only: the masquerade rule is part of the lab."""


class RedsocksSetup(Setup):
    """redsocks 0.5 (Debian) with an IPv4 REDIRECT rule."""

    def start(self, lab: Lab, upstream: Upstream) -> None:
        self.service = start_redsocks(lab, upstream, REDSOCKS_PORT)
        self.redirect = lab.iptables_redirect(REDSOCKS_PORT, v4_dst=INET_NET_V4, v6_dst=None)


@dataclass
class TransocksSetup(Setup):
    """transocks from this checkout; access log off so logging is not what is measured."""

    workers: int = 1
    extra_args: list[str] = field(default_factory=list)

    def start(self, lab: Lab, upstream: Upstream) -> None:
        args = ["--access-log", "off", *self.extra_args]
        self.service = start_transocks(lab, upstream.url, TRANSOCKS_PORT, self.workers, args)
        self.redirect = lab.iptables_redirect(TRANSOCKS_PORT)

    def profile_pids(self) -> list[int]:
        return [p.pid for p in self.processes()[1:]]  # the workers, not the master


def all_setups(workers: int, extra_args: list[str]) -> list[Setup]:
    """NAT, redsocks, transocks with one worker and with `workers` workers."""
    setups: list[Setup] = [NatSetup("nat", "kernel NAT"), RedsocksSetup("redsocks", "redsocks")]
    for n in dict.fromkeys((1, workers)):
        setups.append(TransocksSetup(f"transocks-w{n}", f"transocks --workers {n}",
                                     workers=n, extra_args=extra_args))
    return setups
