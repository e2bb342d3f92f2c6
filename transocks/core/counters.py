"""A worker's live connection counts: kept by the handlers and the relay, read by the runtime."""

from __future__ import annotations


class Counters:
    """Shown in the worker's title and sent to the master in each heartbeat."""

    __slots__ = ("active", "total")

    def __init__(self) -> None:
        self.active = 0
        self.total = 0
