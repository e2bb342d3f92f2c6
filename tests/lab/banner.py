"""A server-first service (like SMTP, FTP, IMAP): a banner on connect, then an echo.

Threads in the test process with listening sockets made inside a namespace;
the client waits for the banner before it sends, as an SMTP client does.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence

from .netns import Lab

BANNER = b"220 banner.example ESMTP lab\r\n"


class BannerServer:
    """Listens on (host, port) pairs in `ns`; counts accepted connections."""

    def __init__(self, lab: Lab, ns: str, binds: Sequence[tuple[str, int]]) -> None:
        self.accepted = 0
        self.socks: list[socket.socket] = []
        for host, port in binds:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with lab.netns(ns):
                s = socket.create_server((host, port), family=family, backlog=64)
            self.socks.append(s)
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            conn.sendall(BANNER)
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        for s in self.socks:
            s.close()
