"""What a daemon tells the runtime: its name, settings and connection handler."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..netutil import Endpoint


class Counters:
    """A worker's live connection counts, shown in its title and sent to the master."""

    __slots__ = ("active", "total")

    def __init__(self) -> None:
        self.active = 0
        self.total = 0


class App(Protocol):
    name: str

    def load_config(self, argv: Sequence[str]) -> Any:
        """Parse argv/env/file; raise config.ConfigError on a bad configuration."""

    def setup_logging(self, cfg: Any) -> None:
        """Configure the error and access logs from cfg."""

    def listen(self, cfg: Any) -> list[Endpoint]:
        """Addresses to bind."""

    def transparent(self, cfg: Any) -> bool:
        """Whether the listening sockets take TPROXY-diverted connections (IP_TRANSPARENT)."""

    def make_handler(self, cfg: Any) -> tuple[Callable[[socket.socket, tuple], None], Counters]:
        """In the worker after fork: the connection handler and the counters it keeps."""
