"""What a daemon tells the runtime: its name, settings and connection handler."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..core.counters import Counters
from ..core.netutil import Endpoint
from .listeners import PrepareListener


class DatagramService(Protocol):
    """What a worker runs on its slot's UDP sockets (an app's `serve_datagrams`): flows on callbacks."""

    def stop(self, on_idle: Callable[[], None]) -> None:
        """Graceful stop: read no more datagrams, close this worker's copies of the sockets, let the
        flows in progress end on their own; `on_idle()` once none is left (maybe before this returns)."""

    def abort(self, detail: str) -> int:
        """End every flow now (TERM, graceful timeout), each with its log line; returns how many."""


class App(Protocol):
    """A daemon, as the runtime sees it.

    Optional, for an app that takes UDP (the runtime looks them up with getattr):
    `listen_datagram(cfg) -> list[Endpoint]` (addresses of UDP sockets, one per
    worker slot; fixed sockets like the listeners), `prepare_datagram(cfg) ->
    PrepareListener` (their options before bind), `serve_datagrams(cfg, sockets,
    counters) -> DatagramService` (in the worker, after make_handler), and
    `worker_capabilities(cfg) -> tuple[int, ...]` (capabilities the workers keep
    that they would otherwise drop, see `capabilities`).
    """

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
