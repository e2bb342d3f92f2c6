"""Listeners that record what reached them: plain listeners (what reached which address, from
whom) and a SOCKS5 exit (which connections took it, by what destination, carrying which bytes).

Security tests decide by these records, never by a daemon's own log: a connection
that was refused at the edge leaves no record; one that left directly from the
client namespace shows the client's address as its peer, one through an edge the
gw's.  Each connection is recorded the moment it is accepted, then gets one read
and a reply ``seen <peer ip>`` (so a client that gets it knows it reached the
server) and a clean close.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .netns import Lab

READ_TIMEOUT = 3.0
FIRST_BYTES_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Hit:
    """One accepted connection: the address and port it reached, and its peer."""

    host: str
    port: int
    peer: str


class Recorder:
    """Listeners on `endpoints` (host, port) in `ns`, each keeping a `Hit` per accepted connection."""

    def __init__(self, lab: Lab, ns: str, endpoints: Sequence[tuple[str, int]]) -> None:
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        try:
            for host, port in endpoints:
                with lab.netns(ns):
                    family = socket.AF_INET6 if ":" in host else socket.AF_INET
                    sock = socket.create_server((host, port), family=family, backlog=64)
                self._socks.append(sock)
                threading.Thread(target=self._accept, args=(sock, host, port), daemon=True).start()
        except BaseException:
            self.close()
            raise

    def _accept(self, sock: socket.socket, host: str, port: int) -> None:
        while True:
            try:
                conn, peer = sock.accept()
            except OSError:
                return
            with self._lock:
                self.hits.append(Hit(host, port, peer[0]))
            threading.Thread(target=self._serve, args=(conn, peer[0]), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket, peer: str) -> None:
        with contextlib.suppress(OSError), conn:
            conn.settimeout(READ_TIMEOUT)
            conn.recv(65536)
            conn.sendall(f"seen {peer}\n".encode())
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass

    def at(self, host: str, port: int | None = None) -> list[Hit]:
        """The connections that reached `host` (and `port`, if given) so far."""
        with self._lock:
            return [h for h in self.hits if h.host == host and port in (None, h.port)]

    def close(self) -> None:
        """Stop listening (shutdown wakes the blocked accept: close alone would leave it holding the port)."""
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@contextlib.contextmanager
def recording(lab: Lab, ns: str, endpoints: Sequence[tuple[str, int]]) -> Iterator[Recorder]:
    """A Recorder for the block's duration."""
    recorder = Recorder(lab, ns, endpoints)
    try:
        yield recorder
    finally:
        recorder.close()


class SynCount:
    """The SYNs that reached `host`:`port` in `ns`, counted by an iptables INPUT rule: what reached
    a server that keeps no record of its own (openssl s_server)."""

    def __init__(self, lab: Lab, ns: str, host: str, port: int) -> None:
        self._lab, self._ns = lab, ns
        self._tool = "ip6tables" if ":" in host else "iptables"
        self._comment = f"{lab.prefix}-syns-{host}-{port}"
        self._spec = ["INPUT", "-d", host, "-p", "tcp", "--dport", str(port), "--syn",
                      "-m", "comment", "--comment", self._comment]
        lab.run(ns, [self._tool, "-w", "-A", *self._spec])

    def count(self) -> int:
        out = self._lab.run(self._ns, [self._tool, "-w", "-L", "INPUT", "-v", "-x", "-n"]).stdout
        return sum(int(ln.split()[0]) for ln in out.splitlines() if self._comment in ln)

    def close(self) -> None:
        self._lab.run(self._ns, [self._tool, "-w", "-D", *self._spec], check=False)


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
