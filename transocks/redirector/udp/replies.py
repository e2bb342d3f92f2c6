"""Transparent reply sockets: one per remote endpoint per worker, shared by its sessions.

Why shared: every client of one DNS server gets its answers from the same
address and port, and a socket bound there serves them all (sendto names
the client).  Why counted: a socket no session uses is closed at once, so
descriptors follow the live sessions and go back to baseline when they end.
"""

from __future__ import annotations

import socket

from ...core.netutil import Endpoint
from .kernel import reply_socket


class ReplySockets:
    def __init__(self) -> None:
        self.held: dict[Endpoint, list] = {}  # source -> [socket, sessions using it]

    def __len__(self) -> int:
        return len(self.held)

    def acquire(self, source: Endpoint) -> socket.socket:
        """The socket sending from `source` (made on first use); OSError when it cannot be made."""
        entry = self.held.get(source)
        if entry is None:
            entry = self.held[source] = [reply_socket(source), 0]
        entry[1] += 1
        return entry[0]

    def release(self, source: Endpoint) -> None:
        entry = self.held.get(source)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self.held[source]
            entry[0].close()

    def close(self) -> None:
        for sock, _ in self.held.values():
            sock.close()
        self.held.clear()
