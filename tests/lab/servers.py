"""Line-protocol test server for the "Internet" namespace, plus client helpers.

Run as ``python servers.py --bind ADDR [--bind ADDR ...] --port P``.  Each
connection carries one command line ending in "\\n":

  GET <n> [seed]   server sends n bytes of pattern(n, seed), then a clean FIN
  PUT <n>          client sends n bytes; reply "<sha256hex> <count>\\n"
  ECHO             client sends data until it half-closes; only then the
                   reply "<sha256hex> <count>\\n" comes (proves FIN relaying)
  HOLD             connection idles until the peer closes
  RESET            server sends "partial\\n", then closes with RST
  PEER             reply "<ip> <port>\\n" of the address the server saw

For curl, "GET /<path> HTTP/1.x" is answered as HTTP/1.1 with
"Connection: close": /bytes/<n>[/<seed>] serves pattern(n, seed), /peer the
PEER line, anything else a short greeting.

The payload is deterministic so a receiver can verify any size without the
data ever being stored; the helpers below are pure stdlib so tests can use
them on sockets they connected through any proxy.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Iterator

BLOCK = 65536
MAX_LINE = 256
COMMAND_TIMEOUT = 30.0
IO_TIMEOUT = 120.0
HOLD_TIMEOUT = 3600.0
RESET_DELAY = 0.2

log = logging.getLogger("lab.servers")


def _block(seed: str, index: int) -> bytes:
    return hashlib.shake_256(f"{seed}:{index}".encode()).digest(BLOCK)


def iter_pattern(n: int, seed: str | int = 0) -> Iterator[bytes]:
    """Yield pattern(n, seed) in chunks of at most BLOCK bytes."""
    seed = str(seed)
    index = 0
    left = n
    while left > 0:
        chunk = _block(seed, index)[:left]
        left -= len(chunk)
        index += 1
        yield chunk


def pattern(n: int, seed: str | int = 0) -> bytes:
    """n deterministic pseudo-random bytes; any prefix of a longer run matches."""
    return b"".join(iter_pattern(n, seed))


@functools.lru_cache(maxsize=64)
def expected_sha(n: int, seed: str | int = 0) -> str:
    """sha256 hex of pattern(n, seed), computed without holding it in memory."""
    digest = hashlib.sha256()
    for chunk in iter_pattern(n, seed):
        digest.update(chunk)
    return digest.hexdigest()


def recv_all(sock: socket.socket, limit: int | None = None) -> bytes:
    """Read until EOF (or `limit` bytes) and return the data."""
    parts: list[bytes] = []
    total = 0
    while limit is None or total < limit:
        data = sock.recv(BLOCK if limit is None else min(BLOCK, limit - total))
        if not data:
            break
        parts.append(data)
        total += len(data)
    return b"".join(parts)


def hash_until_eof(sock: socket.socket) -> tuple[str, int]:
    """Consume the stream to EOF, returning (sha256hex, byte count)."""
    digest = hashlib.sha256()
    count = 0
    while True:
        data = sock.recv(BLOCK)
        if not data:
            return digest.hexdigest(), count
        digest.update(data)
        count += len(data)


def _parse_reply(raw: bytes) -> tuple[str, int]:
    sha, count = raw.decode().split()
    return sha, int(count)


def get(sock: socket.socket, n: int, seed: str | int = 0) -> tuple[str, int]:
    """Request n bytes; returns (sha256hex, count) of what arrived before EOF."""
    sock.sendall(f"GET {n} {seed}\n".encode())
    return hash_until_eof(sock)


def put(sock: socket.socket, data: bytes) -> tuple[str, int]:
    """Upload `data`; returns the server's (sha256hex, count) of what it got."""
    sock.sendall(f"PUT {len(data)}\n".encode() + data)
    return _parse_reply(recv_all(sock))


def put_pattern(sock: socket.socket, n: int, seed: str | int = 0) -> tuple[str, int]:
    """Upload pattern(n, seed) in chunks; compare the reply with expected_sha."""
    sock.sendall(f"PUT {n}\n".encode())
    for chunk in iter_pattern(n, seed):
        sock.sendall(chunk)
    return _parse_reply(recv_all(sock))


def echo(sock: socket.socket, data: bytes) -> tuple[str, int]:
    """Send `data`, half-close, and return the reply only sent after our FIN."""
    sock.sendall(b"ECHO\n" + data)
    sock.shutdown(socket.SHUT_WR)
    return _parse_reply(recv_all(sock))


def peer(sock: socket.socket) -> tuple[str, int]:
    """Ask which (ip, port) the server saw for this connection."""
    sock.sendall(b"PEER\n")
    ip, port = recv_all(sock).decode().split()
    return ip, int(port)


def hold(sock: socket.socket) -> None:
    """Start an idle connection; the server keeps it until we close it."""
    sock.sendall(b"HOLD\n")


def reset(sock: socket.socket) -> tuple[bytes, OSError | None]:
    """Trigger a server-side RST; returns (data received, error if any)."""
    sock.sendall(b"RESET\n")
    parts: list[bytes] = []
    try:
        while True:
            data = sock.recv(BLOCK)
            if not data:
                return b"".join(parts), None
            parts.append(data)
    except OSError as exc:
        return b"".join(parts), exc


def sha256(data: bytes) -> str:
    """Hex sha256, the digest used in every reply."""
    return hashlib.sha256(data).hexdigest()


class Handler(socketserver.BaseRequestHandler):
    """One command per connection; see the module docstring."""

    request: socket.socket

    def handle(self) -> None:
        sock = self.request
        peer_addr = self.client_address
        try:
            sock.settimeout(COMMAND_TIMEOUT)
            line, rest = self._read_line(sock)
            sock.settimeout(IO_TIMEOUT)
            words = line.decode("ascii", "replace").split()
            command = words[0].upper() if words else ""
            log.info("%s:%s %s", peer_addr[0], peer_addr[1], line.decode("ascii", "replace"))
            if command == "GET" and words[1:2] and words[1].startswith("/"):
                self.do_http(sock, words[1], rest)
                return
            method = getattr(self, f"do_{command}", None)
            if method is None:
                sock.sendall(b"ERR unknown command\n")
                return
            method(sock, words[1:], rest)
        except (OSError, ValueError) as exc:
            log.warning("%s:%s error: %r", peer_addr[0], peer_addr[1], exc)

    @staticmethod
    def _read_line(sock: socket.socket) -> tuple[bytes, bytes]:
        buf = b""
        while b"\n" not in buf:
            if len(buf) > MAX_LINE:
                raise ValueError("command line too long")
            data = sock.recv(MAX_LINE)
            if not data:
                raise ValueError(f"EOF before command line ({buf!r})")
            buf += data
        line, _, rest = buf.partition(b"\n")
        return line.rstrip(b"\r"), rest

    def do_http(self, sock: socket.socket, path: str, rest: bytes) -> None:
        while b"\r\n\r\n" not in b"\r\n" + rest and b"\n\n" not in b"\n" + rest:
            if len(rest) > 16 * MAX_LINE:
                raise ValueError("HTTP request headers too long")
            data = sock.recv(MAX_LINE)
            if not data:
                raise ValueError("EOF inside HTTP request headers")
            rest += data
        parts = path.strip("/").split("/")
        if parts[0] == "bytes" and len(parts) in (2, 3):
            n = int(parts[1])
            body: Iterator[bytes] = iter_pattern(n, parts[2] if len(parts) == 3 else "0")
        elif parts[0] == "peer":
            line = f"{self.client_address[0]} {self.client_address[1]}\n".encode()
            n, body = len(line), iter([line])
        else:
            n, body = len(b"transocks lab\n"), iter([b"transocks lab\n"])
        sock.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     f"Content-Length: {n}\r\nConnection: close\r\n\r\n".encode())
        for chunk in body:
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        self._drain(sock)

    def do_GET(self, sock: socket.socket, args: list[str], rest: bytes) -> None:
        n = int(args[0])
        seed = args[1] if len(args) > 1 else "0"
        for chunk in iter_pattern(n, seed):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        self._drain(sock)

    def do_PUT(self, sock: socket.socket, args: list[str], rest: bytes) -> None:
        n = int(args[0])
        digest = hashlib.sha256(rest[:n])
        count = len(rest[:n])
        while count < n:
            data = sock.recv(min(BLOCK, n - count))
            if not data:
                break
            digest.update(data)
            count += len(data)
        sock.sendall(f"{digest.hexdigest()} {count}\n".encode())
        sock.shutdown(socket.SHUT_WR)
        self._drain(sock)

    def do_ECHO(self, sock: socket.socket, args: list[str], rest: bytes) -> None:
        digest = hashlib.sha256(rest)
        count = len(rest)
        while True:
            data = sock.recv(BLOCK)
            if not data:
                break
            digest.update(data)
            count += len(data)
        sock.sendall(f"{digest.hexdigest()} {count}\n".encode())
        sock.shutdown(socket.SHUT_WR)

    def do_HOLD(self, sock: socket.socket, args: list[str], rest: bytes) -> None:
        sock.settimeout(HOLD_TIMEOUT)
        self._drain(sock)

    def do_RESET(self, sock: socket.socket, args: list[str], rest: bytes) -> None:
        sock.sendall(b"partial\n")
        time.sleep(RESET_DELAY)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # Close here: socketserver would shutdown(SHUT_WR) first and send a FIN.
        sock.close()

    def do_PEER(self, sock: socket.socket, args: list[str], rest: bytes) -> None:
        ip, port = self.client_address[:2]
        sock.sendall(f"{ip} {port}\n".encode())
        sock.shutdown(socket.SHUT_WR)
        self._drain(sock)

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        """Wait for the peer's FIN so our close never turns into an RST."""
        while sock.recv(BLOCK):
            pass


class Server(socketserver.ThreadingTCPServer):
    """Threaded listener with a backlog large enough for concurrency tests."""

    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, host: str, port: int) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        log.exception("unhandled error for %s", client_address)


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; the lab runs this inside the inet namespace."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", action="append", required=True, help="address (repeatable)")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s servers[%(process)d] %(levelname)s %(message)s")
    threading.stack_size(512 * 1024)
    servers = [Server(host, args.port) for host in args.bind]
    threads = [threading.Thread(target=s.serve_forever, name=f"serve-{host}", daemon=True)
               for s, host in zip(servers, args.bind, strict=True)]
    for thread in threads:
        thread.start()
    log.info("listening on %s port %d", ", ".join(args.bind), args.port)
    try:
        while all(t.is_alive() for t in threads):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        # No shutdown(): it waits out each serve_forever poll interval in
        # turn; closing the listeners and exiting (daemon threads) is enough.
        for server in servers:
            server.server_close()
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.exit(main())
