"""A member of a pool and its health: HAProxy's rise/fall counters, per worker.

TCP and UDP each have a state: a SOCKS5 server may serve CONNECT and refuse UDP
ASSOCIATE (dante without a udpassociate rule), so a member can be out for UDP
flows while TCP connections still go through it; a member down for TCP is out
for both (nothing reaches its ASSOCIATE either).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from ..upstream import Dialer
from .config import ASSOCIATING_SCHEME, UDP_SCHEMES

log = logging.getLogger("transocks")


class Health(enum.Enum):
    UP = "up"
    DOWN = "down"


# Bound once: in CPython 3.11 each `Health.X` is a descriptor call (~0.2 us), a few per opening.
UP, DOWN = Health.UP, Health.DOWN


class UdpHealth(enum.Enum):
    """A member's state for UDP flows, beside its TCP `Health`."""

    NONE = "none"  # its scheme has no UDP (http, socks4): UDP flows skip it, nothing checks it
    UP = "up"  # direct/reject, or SOCKS5 whose UDP ASSOCIATE works (until a check says otherwise)
    DOWN = "down"  # SOCKS5 whose UDP ASSOCIATE failed `fall` checks in a row


@dataclass(frozen=True)
class HealthPolicy:
    """HAProxy's counters: `fall` failures in a row take a member out, `rise` successes bring it back."""

    rise: int = 2
    fall: int = 3


def _count(ok: bool, up: bool, oks: int, fails: int, policy: HealthPolicy) -> tuple[int, int, bool]:
    """One result in the counters: (good in a row, failed in a row, whether the state turns)."""
    if ok:
        oks += 1
        return oks, 0, not up and oks >= policy.rise
    fails += 1
    return 0, fails, up and fails >= policy.fall


class Member:
    """One proxy address of a pool: its dialer, health and this worker's live connections through it."""

    __slots__ = ("active", "dialer", "dials", "fails", "failures", "key", "label", "last_error", "oks", "state",
                 "udp", "udp_error", "udp_fails", "udp_oks")

    def __init__(self, dialer: Dialer, label: str) -> None:
        self.dialer = dialer
        self.label = label  # the configured URL when its name was resolved to this address
        self.key = str(dialer).encode()  # the sticky hash seed: the same in every worker and after restarts
        self.state = Health.UP  # until a check or a dial says otherwise: no start-up delay
        self.fails = 0
        self.oks = 0
        self.active = 0
        self.dials = 0  # tunnels this worker tried through it, and those that failed at the member
        self.failures = 0
        self.last_error = ""
        self.udp = UdpHealth.UP if dialer.url.scheme in UDP_SCHEMES else UdpHealth.NONE
        self.udp_fails = 0
        self.udp_oks = 0
        self.udp_error = ""

    def __str__(self) -> str:
        return str(self.dialer)

    @property
    def up(self) -> bool:
        return self.state is UP

    @property
    def associates(self) -> bool:
        """Whether its UDP goes through a UDP ASSOCIATE (SOCKS5), which checks cover."""
        return self.dialer.url.scheme == ASSOCIATING_SCHEME

    def carries(self, proto: str) -> bool:
        """Whether flows of `proto` ("tcp" or "udp") may go through it at all."""
        return proto == "tcp" or self.udp is not UdpHealth.NONE

    def usable(self, proto: str) -> bool:
        """Healthy for flows of `proto`."""
        if proto == "tcp":
            return self.state is UP
        return self.state is UP and self.udp is UdpHealth.UP

    def record(self, ok: bool, policy: HealthPolicy, why: str, how: str) -> None:
        """Count one check or dial (`how` says which); log a change of state once."""
        if ok and self.state is UP:  # the usual result, which changes no state: `_count` in short
            self.oks += 1
            self.fails = 0
            return
        self.oks, self.fails, turns = _count(ok, self.up, self.oks, self.fails, policy)
        if not ok:
            self.last_error = why
        if not turns:
            return
        if ok:
            self.state = UP
            log.warning("exit %s is up again (%d good %s in a row)", self.describe(), self.oks, how)
        else:
            self.state = DOWN
            log.warning("exit %s is down after %d failed %s in a row: %s", self.describe(), self.fails, how, why)

    def record_udp(self, ok: bool, policy: HealthPolicy, why: str, how: str) -> None:
        """Count one UDP ASSOCIATE (a check's or a flow's); log a change of its UDP state once."""
        if self.udp is UdpHealth.NONE:
            return
        self.udp_oks, self.udp_fails, turns = _count(ok, self.udp is UdpHealth.UP, self.udp_oks, self.udp_fails,
                                                     policy)
        if not ok:
            self.udp_error = why
        if not turns:
            return
        if ok:
            self.udp = UdpHealth.UP
            log.warning("exit %s carries UDP again (%d good %s in a row)", self.describe(), self.udp_oks, how)
        else:
            self.udp = UdpHealth.DOWN
            log.warning("exit %s is out for UDP after %d failed %s in a row: %s", self.describe(), self.udp_fails,
                        how, why)

    def describe(self) -> str:
        return str(self) if self.label == str(self) else f"{self} ({self.label})"
