"""What metrics cost a connection: the hot path's bookkeeping, the heartbeat's flush, and the
per-connection prometheus_client calls the batching avoids.

    python -m bench.metrics [--connections 200000]
    sudo python -m bench.metrics --lab [--duration 5] [--rounds 3]

A bounded in-process loop (no lab needed).  Metrics off still keeps the plain counts
(`ConnectionStats`, also the status command's); on adds one `Exporter.flush` a second.
With --lab: transocks (one worker) through usocksd to nginx in the namespace lab, wrk
with a new connection per request, metrics off and on in turn: connections a second
and the worker's CPU time per connection (less noisy than the rate on a shared host).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from transocks.runtime import metrics as m


def per_call(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return (time.perf_counter() - t0) / n


def lab_run(duration: float, rounds: int) -> None:
    import psutil

    from tests.lab.netns import INET_V4
    from tests.lab.services import start_nginx, start_transocks
    from tests.lab.upstreams import start_usocksd

    from . import loads
    from .runner import new_lab

    lab = new_lab()
    try:
        start_nginx(lab, {"small.bin": 1024})
        up = start_usocksd(lab, 1284, 1, ["--access-log", "off"])
        url = f"http://{INET_V4}/small.bin"
        lab.iptables_redirect(1081)
        for r in range(rounds):
            for mode, extra in (("off", []), ("on", ["--metrics-listen", "127.0.0.1:19129"])):
                ts = start_transocks(lab, up.url, 1081, 1, ["--access-log", "off", "--control-socket", "",
                                                            *extra])
                try:
                    worker = psutil.Process(ts.procs[0].pid).children()[0]
                    loads.wrk(lab, url, 16, 1, close=True)  # warm-up
                    cpu0 = sum(worker.cpu_times()[:2])
                    res = loads.wrk(lab, url, 16, duration, close=True)
                    cpu = sum(worker.cpu_times()[:2]) - cpu0
                    print(f"round {r + 1} metrics {mode}: {res['rps']:.0f} conn/s, "
                          f"{cpu / max(res['requests'], 1) * 1e6:.1f} us worker CPU per connection, "
                          f"{res['errors']:.0f} errors")
                finally:
                    ts.stop(lab)
    finally:
        lab.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.metrics")
    p.add_argument("--connections", type=int, default=200_000)
    p.add_argument("--lab", action="store_true", help="through a real daemon in the namespace lab (root)")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if args.lab:
        lab_run(args.duration, args.rounds)
        return
    n = args.connections
    os.environ[m.ENV] = tempfile.mkdtemp(prefix="bench-metrics-")
    from prometheus_client import Counter, Histogram, values

    values.ValueClass = values.get_value_class()
    stats = m.ConnectionStats()
    exporter = m.Exporter("bench", stats)

    def bare(k: int) -> None:
        for _ in range(k):
            pass

    def hot(k: int) -> None:
        for _ in range(k):
            stats.active += 1
            stats.total += 1
            stats.opened(0.004)
            stats.active -= 1
            stats.finished("ok", 1000, 20000)

    c = Counter("direct_connections", "", ["outcome"], registry=None)
    b = Counter("direct_bytes", "", ["direction"], registry=None)
    h = Histogram("direct_handshake_seconds", "", buckets=m.HANDSHAKE_BUCKETS, registry=None)

    def direct(k: int) -> None:
        for _ in range(k):
            h.observe(0.004)
            c.labels("ok").inc()
            b.labels("sent").inc(1000)
            b.labels("received").inc(20000)

    def flush(k: int) -> None:
        for i in range(k):
            stats.finished("ok" if i % 2 else "reset", 1, 1)
            stats.opened(0.004)
            exporter.flush()

    loop = per_call(bare, n)
    hot_s = per_call(hot, n) - loop
    direct_s = per_call(direct, n // 10) - loop
    flush_s = per_call(flush, 2000)
    print(f"connections: {n}")
    print(f"hot path (on and off alike): {hot_s * 1e6:.2f} us per connection")
    print(f"one flush (on, once a second): {flush_s * 1e6:.1f} us")
    print(f"prometheus_client calls per connection instead (multiprocess): {direct_s * 1e6:.2f} us")


if __name__ == "__main__":
    main()
