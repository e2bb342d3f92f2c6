"""Client threads a test runs as a bounded load: started on entry, asked to stop and joined on exit."""

from __future__ import annotations

import threading
from typing import TypeVar

Load = TypeVar("Load", bound="ThreadedLoad")


class ThreadedLoad:
    """A subclass makes `threads` (their loops watch `stop`); `join_timeout` bounds the exit."""

    join_timeout = 30.0

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def __enter__(self: Load) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(self.join_timeout)
