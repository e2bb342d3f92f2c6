"""What a daemon tells the runtime: its name, settings and connection handler."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..core.counters import Counters
from ..core.netutil import Endpoint
from .listeners import PrepareListener


class App(Protocol):
    name: str

    def config(self) -> Any:
        """The daemon's core.config.Config (settings and commands), not yet loaded."""

    def load_config(self, argv: Sequence[str]) -> Any:
        """Parse argv/env/file; raise config.ConfigError on a bad configuration."""

    def setup_logging(self, cfg: Any) -> None:
        """Configure the error and access logs from cfg."""

    def listen(self, cfg: Any) -> list[Endpoint]:
        """Addresses to bind."""

    def prepare_listener(self, cfg: Any) -> PrepareListener | None:
        """Options the listening sockets need before bind; fixed for the master's lifetime."""

    def make_handler(self, cfg: Any) -> tuple[Callable[[socket.socket, tuple], None], Counters]:
        """In the worker after fork: the connection handler and the counters it keeps."""
