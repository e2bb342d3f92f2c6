"""What a daemon tells the runtime: its name, settings and connection handler."""

from __future__ import annotations

import socket
from typing import Any, Callable, Protocol, Sequence

from ..netutil import Endpoint


class App(Protocol):
    name: str

    def load_config(self, argv: Sequence[str]) -> Any:
        """Parse argv/env/file; raise config.ConfigError on a bad configuration."""

    def setup_logging(self, cfg: Any) -> None:
        """Configure the error and access logs from cfg."""

    def listen(self, cfg: Any) -> list[Endpoint]:
        """Addresses to bind."""

    def make_handler(self, cfg: Any) -> tuple[Callable[[socket.socket, tuple], None], Any]:
        """In the worker after fork: (handler(conn, peer), counters with .active/.total)."""
