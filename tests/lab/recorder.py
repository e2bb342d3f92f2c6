"""A SOCKS5 exit that records what reached it: each CONNECT's destination and the client's first bytes.

Threads in the test process with a listening socket made inside a namespace.  It
answers every CONNECT with success and relays nothing: a test asks it which
connections took this exit, by what destination, carrying which bytes, instead
of trusting the proxy's own log.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass

from .netns import Lab

FIRST_BYTES_LIMIT = 64 * 1024


@dataclass
class Request:
    host: str  # an address, or the name when the request carried one (ATYP 3)
    port: int
    by_name: bool
    first: bytes  # what came after the reply, up to the client's end or FIRST_BYTES_LIMIT


class RecordingSocks5:
    """Listens on (host, port) in `ns`; `requests` lists what it was asked, in order of completion."""

    def __init__(self, lab: Lab, ns: str, host: str, port: int) -> None:
        self.requests: list[Request] = []
        self.url = f"socks5://{host}:{port}" if ":" not in host else f"socks5://[{host}]:{port}"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with lab.netns(ns):
            self.sock = socket.create_server((host, port), family=family, backlog=64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        buf = bytearray()

        def take(n: int) -> bytes:
            while len(buf) < n:
                chunk = conn.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                buf.extend(chunk)
            out = bytes(buf[:n])
            del buf[:n]
            return out

        try:
            _, nmethods = take(2)
            take(nmethods)
            conn.sendall(b"\x05\x00")
            _, cmd, _, atyp = take(4)
            if atyp == 1:
                host = str(ipaddress.IPv4Address(take(4)))
            elif atyp == 4:
                host = str(ipaddress.IPv6Address(take(16)))
            else:
                host = take(take(1)[0]).decode("ascii", "replace")
            port = int.from_bytes(take(2), "big")
            conn.sendall(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
            while len(buf) < FIRST_BYTES_LIMIT and (chunk := conn.recv(65536)):
                buf.extend(chunk)
            self.requests.append(Request(host, port, atyp == 3, bytes(buf)))
        except OSError:
            pass
        finally:
            conn.close()

    def wait(self, count: int, timeout: float = 10.0) -> list[Request]:
        """The requests once there are `count` of them (or what there is after `timeout`)."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.requests)

    def close(self) -> None:
        """Stop listening now: shutdown wakes the accepting thread (a bare close would leave the
        socket listening until its accept returned)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
