"""Instructions per opening: a deterministic A/B for the dial alone (pool, member, Dial, SOCKS5).

Like `bench.relay_cost` for the relay: 64 openings at a time go through a
pool of one SOCKS5 member (`Pool.begin`: balance pick, `Opening`, `Dial`,
the handshake, member accounting) to a SOCKS5 server in this process on
127.0.0.1 that answers as dante does (method reply, then the CONNECT reply,
each after its request) or, with `--pipelined`, as usocksd does; each tunnel
is closed once open.  With `--count` it runs itself twice under valgrind's
callgrind and prints (Ir(60 batches) - Ir(10 batches)) / (50 * 64), which
does not depend on what else the machine runs.  The server's share is the
same for every tree: compare trees, not absolute numbers.

    python -m bench.dial_cost --count            # needs valgrind
    python -m bench.dial_cost --count --pipelined
"""

from __future__ import annotations

import argparse
import socket
import time
from typing import Any

import gevent
from gevent.hub import get_hub

from transocks.core.config import AUTO
from transocks.core.netutil import Endpoint
from transocks.redirector.exits.member import HealthPolicy
from transocks.redirector.exits.registry import DialSettings, Exits
from transocks.redirector.flow import Flow
from transocks.redirector.upstream import parse_proxy_url

from .relay_cost import callgrind_per_unit

K = 64
DEST = Endpoint("203.0.113.10", 80)
WIRE = b"\x01" + bytes([203, 0, 113, 10]) + b"\x00\x50"
PEER = Endpoint("192.0.2.2", 40000)
REPLY = b"\x05\x00\x00\x01" + bytes([192, 0, 2, 1]) + b"\x04\x38"


class Server:
    """A SOCKS5 server on raw watchers: method reply after the greeting, CONNECT reply after
    the request (or both at once for a pipelined greeting + request)."""

    def __init__(self, pipelined: bool) -> None:
        self.method = 0x8A if pipelined else 0x00  # PIPELINED as usocksd answers (AUTO learns it), or NO_AUTH as dante
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(1024)
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        loop = get_hub().loop
        self.watcher = loop.io(self.lsock.fileno(), 1)
        self.watcher.start(self._accept)
        self.loop = loop

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.lsock.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            w = self.loop.io(conn.fileno(), 1)
            w.start(self._read, conn, w, [])

    def _read(self, conn: socket.socket, w: Any, state: list[int]) -> None:
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        if not data:
            w.close()
            conn.close()
            return
        if not state:  # the greeting, maybe with the request behind it
            state.append(1)
            n = 2 + data[1]
            out = bytes([5, self.method])
            if len(data) > n:
                out += REPLY
            conn.send(out)
        else:
            conn.send(REPLY)


def batch(pool: Any, done: list[Any]) -> float:
    started = time.process_time()
    want = len(done) + K

    def opened(opening: Any, context: Any) -> None:
        done.append(opening.error)
        if opening.error is None:
            opening.stream().close()

    for _ in range(K):
        conn = Flow(DEST, PEER, 1081)
        conn.wire = WIRE
        conn.pool = pool
        pool.begin(conn, opened)
    while len(done) < want:
        gevent.sleep(0.001)
    return time.process_time() - started


def run(batches: int, pipelined: bool) -> float:
    server = Server(pipelined)
    exits = Exits(DialSettings(5.0, 10.0, socks5_pipelining=AUTO), HealthPolicy(2, 3))
    pool = exits.pool("default", [parse_proxy_url(f"socks5://127.0.0.1:{server.port}")])
    done: list[Any] = []
    for _ in range(10):
        batch(pool, done)
    spent = sum(batch(pool, done) for _ in range(batches))
    errors = [e for e in done if e is not None]
    if errors:
        raise SystemExit(f"{len(errors)} openings failed: {errors[0]}")
    return spent / (batches * K) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.dial_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=150, help="batches of 64 openings (besides 10 to warm up)")
    ap.add_argument("--pipelined", action="store_true", help="a member that pipelines (usocksd)")
    ap.add_argument("--count", action="store_true", help="instructions per opening under callgrind")
    args = ap.parse_args()
    if not args.count:
        print(f"{run(args.batches, args.pipelined):.2f} us CPU per opening")
        return
    per_conn = callgrind_per_unit("bench.dial_cost", ["--pipelined"] if args.pipelined else [])
    print(f"{per_conn:.0f} instructions per opening")


if __name__ == "__main__":
    main()
