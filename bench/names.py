"""`python -m bench.names`: what checking a sniffed name against the destination costs.

Three figures, in this process, no network:

  hit        NameCheck.check for a name already looked up (the cost every connection
             to a known name pays: one dict lookup and a clock read)
  miss       a name checked against an address it does not have, within RETRY_MISS
             (what a forger's connection pays after the first)
  cold       the first connection to a name: a lookup through gevent's resolver
             (libc's getaddrinfo in a thread) of `localhost`, which the hosts file
             answers without a DNS query: the floor of the first connection's extra
             latency; a real resolver adds its own round trip

Median of `--rounds` rounds with the spread (min-max).
"""

from __future__ import annotations

import argparse
import statistics
import time

import gevent

from transocks.core.namecheck import NameCheck, system_resolver


def _per_call(fn, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n * 1e6


def measure(rounds: int, calls: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"hit": [], "miss": [], "cold": []}
    for _ in range(rounds):
        check = NameCheck(60, 1, lambda name: ["203.0.113.10", "2001:db8::10"])
        check.check("www.example", "203.0.113.10")
        out["hit"].append(_per_call(lambda: check.check("www.example", "203.0.113.10"), calls))
        out["miss"].append(_per_call(lambda: check.check("www.example", "198.51.100.7"), calls))
        cold = []
        for i in range(20):
            fresh = NameCheck(60, 2, system_resolver)
            started = time.perf_counter()
            fresh.check("localhost", "127.0.0.1")
            cold.append((time.perf_counter() - started) * 1e6)
            gevent.sleep(0)
        out["cold"].append(statistics.median(cold))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200_000)
    args = ap.parse_args()
    results = measure(args.rounds, args.calls)
    print(f"{'figure':<6} {'median us':>10} {'min-max us':>18}")
    for name, values in results.items():
        print(f"{name:<6} {statistics.median(values):>10.2f} {min(values):>8.2f}-{max(values):<8.2f}")


if __name__ == "__main__":
    main()
