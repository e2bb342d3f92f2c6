"""Instructions per short relayed connection: a deterministic A/B for the relay alone.

`python -m bench` reads CPU per connection from /proc; on a shared machine its
round-to-round spread (10-30 %) hides a lever worth 1-3 %.  This runs the
relay (`transocks.core.relay.Relay`) on socket pairs in one hub, 64
connections at a time, each an HTTP-like exchange: the client's request (or
the same bytes as early bytes, as after sniffing, with `--early`), the
server's 1 KiB response, the server's close, the client's close.  With
`--count` it runs itself twice under valgrind's callgrind and prints the
instructions per connection, (Ir(60 batches) - Ir(10 batches)) / (50 * 64),
which do not depend on what else the machine runs (to ±0.3 %).  The figure
includes this script's own socket work, the same for every tree: compare
trees, not absolute numbers.

    python -m bench.relay_cost --count            # needs valgrind
    python -m bench.relay_cost --count --early --half-close 0
    python -m bench.relay_cost --batches 200      # CPU us per connection, noisy
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

import gevent
from gevent.hub import get_hub

from transocks.core.relay import Relay

K = 64
REQUEST = b"GET /small.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n" + b"x" * 1024


def _wait_recv(sock: socket.socket) -> bytes:
    while True:
        try:
            return sock.recv(4096)
        except BlockingIOError:
            gevent.sleep(0)


def batch(half_close: float, early: bool, results: list[Any]) -> float:
    """K connections through K relays; the process CPU seconds they took."""
    chains = []
    for _ in range(K):
        outer_client, client_side = socket.socketpair()
        upstream_side, outer_server = socket.socketpair()
        for s in (outer_client, client_side, upstream_side, outer_server):
            s.setblocking(False)
        chains.append((outer_client, client_side, upstream_side, outer_server))
    loop = get_hub().loop
    started = time.process_time()
    for outer_client, client_side, upstream_side, _ in chains:
        if not early:
            outer_client.send(REQUEST)
        watchers = (loop.io(client_side.fileno(), 1), loop.io(upstream_side.fileno(), 1))
        r = Relay(client_side, upstream_side, 0.0, half_close, REQUEST if early else b"", b"", watchers)
        r.closes = True

        def done(r: Relay) -> None:
            results.append(r.result)
            for s in r.socks:
                s.close()

        r.start(done)
    gevent.sleep(0)
    for _, _, _, outer_server in chains:
        _wait_recv(outer_server)
        outer_server.send(RESPONSE)
        outer_server.close()
    gevent.sleep(0)
    for outer_client, _, _, _ in chains:
        while _wait_recv(outer_client):
            pass
        outer_client.close()
    while len(results) % K:
        gevent.sleep(0)
    return time.process_time() - started


def run(batches: int, half_close: float, early: bool) -> float:
    """CPU us per connection over `batches` batches, after 10 to warm up."""
    results: list[Any] = []
    for _ in range(10):
        batch(half_close, early, results)
    spent = sum(batch(half_close, early, results) for _ in range(batches))
    if any(r.outcome != "ok" for r in results):
        raise SystemExit(f"relay outcomes: {sorted({r.outcome for r in results})}")
    return spent / (batches * K) * 1e6


def callgrind_per_unit(module: str, argv: list[str]) -> float:
    """Instructions per unit (connection, opening) of `python -m module --batches N argv`
    under callgrind: (Ir(60 batches) - Ir(10 batches)) / (50 * K), the bench's micro A/B."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--count needs valgrind (apt-get install -y valgrind)")
    return (_callgrind(module, 60, argv) - _callgrind(module, 10, argv)) / (50 * K)


def _callgrind(module: str, batches: int, argv: list[str]) -> int:
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
           sys.executable, "-m", module, "--batches", str(batches), *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    match = re.search(r"Collected : (\d+)", out)
    if match is None:
        raise SystemExit(f"no instruction count from callgrind:\n{out[-2000:]}")
    return int(match.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.relay_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=150, help="batches of 64 connections (besides 10 to warm up)")
    ap.add_argument("--half-close", type=float, default=60.0, help="the relays' half_close_timeout (0: no timer)")
    ap.add_argument("--early", action="store_true", help="the request as early bytes (as after sniffing)")
    ap.add_argument("--count", action="store_true", help="instructions per connection under callgrind")
    args = ap.parse_args()
    if not args.count:
        print(f"{run(args.batches, args.half_close, args.early):.2f} us CPU per connection")
        return
    argv = ["--half-close", str(args.half_close), *(["--early"] if args.early else [])]
    per_conn = callgrind_per_unit("bench.relay_cost", argv)
    print(f"{per_conn:.0f} instructions per connection")


if __name__ == "__main__":
    main()
