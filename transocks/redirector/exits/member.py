"""A member of a pool and its health: HAProxy's rise/fall counters, per worker."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from ..upstream import Dialer

log = logging.getLogger("transocks")


class Health(enum.Enum):
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class HealthPolicy:
    """HAProxy's counters: `fall` failures in a row take a member out, `rise` successes bring it back."""

    rise: int = 2
    fall: int = 3


class Member:
    """One proxy address of a pool: its dialer, health and this worker's live connections through it."""

    __slots__ = ("active", "dialer", "dials", "fails", "failures", "key", "label", "last_error", "oks", "state")

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

    def __str__(self) -> str:
        return str(self.dialer)

    @property
    def up(self) -> bool:
        return self.state is Health.UP

    def record(self, ok: bool, policy: HealthPolicy, why: str, how: str) -> None:
        """Count one check or dial (`how` says which); log a change of state once."""
        if ok:
            self.fails = 0
            self.oks += 1
            if self.state is Health.DOWN and self.oks >= policy.rise:
                self.state = Health.UP
                log.warning("exit %s is up again (%d good %s in a row)", self.describe(), self.oks, how)
            return
        self.oks = 0
        self.fails += 1
        self.last_error = why
        if self.state is Health.UP and self.fails >= policy.fall:
            self.state = Health.DOWN
            log.warning("exit %s is down after %d failed %s in a row: %s", self.describe(), self.fails, how, why)

    def describe(self) -> str:
        return str(self) if self.label == str(self) else f"{self} ({self.label})"
