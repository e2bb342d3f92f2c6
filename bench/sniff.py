"""`sudo /work/venv/bin/python -m bench.sniff`: what sniffing the destination's name costs per connection.

One transocks worker in the client namespace relays short connections through
dante to the echo server in the inet namespace.  Each connection sends what a
client sends first (a real TLS 1.3 ClientHello, or an HTTP/1.1 request with a
Host header), half-closes, reads the echo and closes: one whole relay life
cycle.  Three configurations, interleaved over the rounds:

  off        --sniff-ports ""       (sniffing off)
  other      --sniff-ports 443      (sniffing on, the echo port is not a sniff port)
  on         --sniff-ports 7007     (every connection is sniffed)

Reported per configuration and payload: connections per second of a bounded
loop of `--conns` connections from `--clients` threads, and the worker's CPU
time per connection (user + system from /proc), with the ratios to "off".  On a
shared machine both move with the neighbours' load, so the run also times the
sniffing step alone in this process (`--micro-only` runs just that), in CPU time:
the parse, and the whole reading step on a socket pair against the plain receive
the relay would do anyway, with the bytes already queued and with the reader
waiting for them.  Then the worst case a client can choose: a ClientHello as
2,730 one-byte TLS records (16 KiB on the wire, the sniff limit) and a head of
2,700 header lines before its Host, each piece handed to the reading step by a
receive of its own: the CPU one connection costs, and the longest step between
two receives (the event loop is blocked that long).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import gevent

from tests.lab.netns import INET_V4, Lab
from tests.lab.services import start_echo, start_transocks
from tests.lab.tls import start_client
from tests.lab.upstreams import start_dante
from transocks.core import nio
from transocks.redirector import sniff

from .runner import REPO, raise_fd_limit

PORT = 1081
ECHO_PORT = 7007
CONFIGS = {"off": "", "other": "443", "on": str(ECHO_PORT)}


def client_hello(name: str) -> bytes:
    """The first flight OpenSSL sends for `name`."""
    return start_client(name)[3]


PAYLOADS = {
    "tls": client_hello("bench.example"),
    "http": b"GET /index.html HTTP/1.1\r\nHost: bench.example\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n",
}


def _vec(width: int, body: bytes) -> bytes:
    return len(body).to_bytes(width, "big") + body


def padded_hello(name: bytes, size: int) -> bytes:
    """A ClientHello handshake message of `size` bytes: a padding extension, then server_name last."""
    sni = b"\x00\x00" + _vec(2, _vec(2, b"\x00" + _vec(2, name)))
    fixed = b"\x03\x03" + bytes(32) + _vec(1, b"") + _vec(2, b"\x13\x01") + _vec(1, b"\x00")
    pad = size - 4 - len(fixed) - 2 - 4 - len(sni)
    return b"\x01" + _vec(3, fixed + _vec(2, b"\x00\x15" + _vec(2, bytes(pad)) + sni))


RECORDS = sniff.MAX_SNIFF // 6  # one-byte records that fit the sniff limit: 2,730
WORST = {
    "tls": [b"\x16\x03\x01\x00\x01" + bytes([b]) for b in padded_hello(b"bench.example", RECORDS)],
    "http": [b"GET / HTTP/1.1\r\n", *[b"a:b\r\n"] * 2700, b"Host: bench.example\r\n\r\n"],
}


def one_connection(payload: bytes) -> None:
    with socket.create_connection((INET_V4, ECHO_PORT), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        if got != payload:
            raise RuntimeError(f"echo returned {len(got)} of {len(payload)} bytes")


def run_load(lab: Lab, payload: bytes, conns: int, clients: int) -> float:
    """Open `conns` connections from `clients` threads; returns the elapsed seconds."""
    per = conns // clients
    errors: list[BaseException] = []

    def worker() -> None:
        with lab.netns(lab.client):
            try:
                for _ in range(per):
                    one_connection(payload)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} client threads failed: {errors[0]!r}")
    return elapsed


def _per_call(fn: Callable[[], object], n: int) -> float:
    """Median over 5 runs of the microseconds of this process's CPU one call of `fn` takes
    (CPU, not wall time: the neighbours' load on a shared machine moves it less)."""
    runs = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(n):
            fn()
        runs.append((time.process_time() - start) / n * 1e6)
    return statistics.median(runs)


def micro(n: int = 5000) -> dict[str, dict[str, float]]:
    """The sniffing step's own cost, in microseconds per connection."""
    gevent.get_hub().loop.update_now()
    out: dict[str, dict[str, float]] = {}
    a, b = socket.socketpair()
    a.setblocking(False)
    stream = nio.Stream(a)
    try:
        for name, payload in PAYLOADS.items():
            def queued_plain() -> None:
                b.send(payload)
                nio.recv_some(a, sniff.MAX_SNIFF)

            def queued_sniff() -> None:
                b.send(payload)
                sniff.read_first(stream, 0.3)

            def waiting(read: Callable[[], object]) -> Callable[[], None]:
                def run() -> None:
                    gevent.spawn(b.send, payload)  # runs while the reader waits, as a client's bytes arrive
                    read()
                return run

            row = {
                "parse": _per_call(lambda: sniff.sniff(payload), n),
                "queued_plain_recv": _per_call(queued_plain, n),
                "queued_read_first": _per_call(queued_sniff, n),
                "waiting_plain_recv": _per_call(waiting(lambda: nio.recv_some(a, sniff.MAX_SNIFF)), n),
                "waiting_read_first": _per_call(waiting(lambda: sniff.read_first(stream, 0.3)), n),
            }
            row["added_queued"] = row["queued_read_first"] - row["queued_plain_recv"]
            row["added_waiting"] = row["waiting_read_first"] - row["waiting_plain_recv"]
            out[name] = row
    finally:
        a.close()
        b.close()
    return out


def micro_table(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| payload | parse | read_first, bytes queued | plain recv | added | read_first, waiting | "
             "plain recv, waiting | added |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} ({len(PAYLOADS[name])} B) | {r['parse']:.1f} | {r['queued_read_first']:.1f} | "
                     f"{r['queued_plain_recv']:.1f} | {r['added_queued']:.1f} | {r['waiting_read_first']:.1f} | "
                     f"{r['waiting_plain_recv']:.1f} | {r['added_waiting']:.1f} |")
    return "\n".join(lines) + "\n(microseconds of CPU per connection, medians of 5 runs)"


class _Scripted:
    """A client stream that hands the reading step one scripted chunk per receive and
    notes this process's CPU time at each receive."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = iter(chunks)
        self.sock = self
        self.marks: list[float] = []

    def recv(self, limit: int) -> bytes:
        self.marks.append(time.process_time())
        return next(self.chunks, b"")

    recv_reply = recv


def worst(runs: int = 3) -> dict[str, dict[str, float]]:
    """The reading step fed the worst chunkings, one chunk per receive: CPU per connection,
    the longest step between two receives, and the same bytes in one chunk for reference."""
    gevent.get_hub().loop.update_now()
    out: dict[str, dict[str, float]] = {}
    for name, chunks in WORST.items():
        totals, longest = [], []
        for _ in range(runs):
            stream = _Scripted(chunks)
            start = time.process_time()
            got = sniff.read_first(stream, 60.0)  # type: ignore[arg-type]
            end = time.process_time()
            if got.name != "bench.example":
                raise RuntimeError(f"{name}: the worst case gave {got.state} {got.name}")
            marks = [*stream.marks, end]
            totals.append((end - start) * 1e3)
            longest.append(max(b - a for a, b in zip(marks, marks[1:])) * 1e6)
        whole = b"".join(chunks)
        out[name] = {"bytes": len(whole), "receives": len(chunks), "cpu_ms": statistics.median(totals),
                     "longest_step_us": statistics.median(longest),
                     "one_chunk_us": _per_call(lambda: sniff.sniff(whole), 200)}
    return out


def worst_table(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| worst case | bytes | receives | CPU per connection | longest step | same bytes in one chunk |",
             "|---|---:|---:|---:|---:|---:|"]
    labels = {"tls": "ClientHello as 1-byte records", "http": "2,700 header lines before Host"}
    for name, r in rows.items():
        lines.append(f"| {labels[name]} | {r['bytes']:.0f} | {r['receives']:.0f} | {r['cpu_ms']:.1f} ms | "
                     f"{r['longest_step_us']:.0f} us | {r['one_chunk_us']:.0f} us |")
    return "\n".join(lines) + "\n(CPU of this process, medians of 3 runs)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sniff", description=__doc__.split("\n\n")[0])
    p.add_argument("--conns", type=int, default=2000, help="connections per measurement (default 2000)")
    p.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians (default 3)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/sniff-<timestamp>.json)")
    p.add_argument("--micro-only", action="store_true", help="only time the sniffing step in this process (no lab)")
    args = p.parse_args(argv)
    steps = micro()
    print(micro_table(steps), flush=True)
    worst_rows = worst()
    print(worst_table(worst_rows), flush=True)
    if args.micro_only:
        return 0
    raise_fd_limit()
    results: dict[str, dict[str, list[dict[str, float]]]] = {c: {k: [] for k in PAYLOADS} for c in CONFIGS}
    with Lab.create() as lab:
        dante = start_dante(lab, 1080)
        start_echo(lab, ECHO_PORT)
        redirect = lab.iptables_redirect(PORT)
        try:
            for rnd in range(args.rounds):
                for config, ports in CONFIGS.items():
                    svc = start_transocks(lab, dante.url, PORT, 1, ["--access-log", "off", f"--sniff-ports={ports}"])
                    try:
                        worker = svc.processes()[1]
                        run_load(lab, PAYLOADS["http"], min(200, args.conns), args.clients)  # warm up
                        for name, payload in PAYLOADS.items():
                            before = worker.cpu_times()
                            elapsed = run_load(lab, payload, args.conns, args.clients)
                            after = worker.cpu_times()
                            n = args.conns // args.clients * args.clients
                            cpu = (after.user + after.system) - (before.user + before.system)
                            row = {"conns_per_s": n / elapsed, "cpu_us_per_conn": cpu / n * 1e6}
                            results[config][name].append(row)
                            print(f"round {rnd + 1} {config:5} {name:4}: {row['conns_per_s']:7.0f} conn/s "
                                  f"{row['cpu_us_per_conn']:6.0f} us CPU/conn", flush=True)
                    finally:
                        svc.stop(lab)
        finally:
            redirect.remove()
    print()
    print(table(results))
    out = args.out or REPO / "bench" / "results" / f"sniff-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args) | {"out": str(out)}, "results": results, "micro": steps,
                               "worst": worst_rows}, indent=2))
    print(f"\nwritten {out}")
    return 0


def table(results: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    """Medians per configuration and payload, with ratios to sniffing off."""
    def med(config: str, name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[config][name])

    lines = ["| sniffing | payload | conn/s | x off | worker CPU us/conn | x off |",
             "|---|---|---:|---:|---:|---:|"]
    for config in CONFIGS:
        for name in PAYLOADS:
            rate, cpu = med(config, name, "conns_per_s"), med(config, name, "cpu_us_per_conn")
            lines.append(f"| {config} | {name} | {rate:.0f} | {rate / med('off', name, 'conns_per_s'):.2f} "
                         f"| {cpu:.0f} | {cpu / med('off', name, 'cpu_us_per_conn'):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
