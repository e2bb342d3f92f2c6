"""Failover under load: new connections through a pool of two usocksd members while one is
stopped and brought back, as ratios to the same load with both members up.

    sudo /work/venv/bin/python -m bench.failover [--duration 5] [--connections 16]

Each phase is one wrk run (HTTP with `Connection: close`, so every request is a new
transparent connection, a 1 KiB file from nginx) against transocks with two members,
round-robin, checks every 0.5 s:

  both up      baseline
  stopping     member A is stopped one second into the run (in-flight tunnels through it are cut)
  one down     A stays down (the pool knows it: nothing is tried through it)
  back         A restarted and marked up again
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from tests.lab.netns import INET_V4, require_root_and_tools
from tests.lab.services import start_nginx, start_transocks
from tests.lab.upstreams import start_usocksd

from . import loads
from .runner import new_lab

PORT = 1081
MEMBER_PORTS = (1284, 1285)
FILE = "small.bin"
PHASES = ("both up", "stopping", "one down", "back")


def wait_line(path: Path, needle: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{needle!r} not in {path}")
        time.sleep(0.05)


def run(duration: float, connections: int, workers: int) -> dict[str, dict[str, float]]:
    lab = new_lab()
    try:
        start_nginx(lab, {FILE: 1024})
        a, b = (start_usocksd(lab, p, 1, ["--access-log", "off"]) for p in MEMBER_PORTS)
        ts = start_transocks(lab, a.url, PORT, workers,
                             ["--proxy-url", b.url, "--balance", "round-robin", "--access-log", "off",
                              "--health-interval", "0.5", "--health-timeout", "0.5", "--fall", "2", "--rise", "2"])
        lab.iptables_redirect(PORT)
        log = ts.log_paths[0]
        url = f"http://{INET_V4}/{FILE}"
        wrk = lambda: loads.wrk(lab, url, connections, duration, close=True)
        results: dict[str, dict[str, float]] = {}
        loads.wrk(lab, url, connections, 1, close=True)  # warm-up
        results["both up"] = wrk()
        timer = threading.Timer(1.0, a.stop, (lab,))
        timer.start()
        results["stopping"] = wrk()
        timer.join()
        wait_line(log, f"exit {a.url} is down")
        results["one down"] = wrk()
        start_usocksd(lab, MEMBER_PORTS[0], 1, ["--access-log", "off"])
        wait_line(log, f"exit {a.url} is up again")
        results["back"] = wrk()
        return results
    finally:
        lab.close()


def table(results: dict[str, dict[str, float]]) -> str:
    base = results["both up"]["rps"] or 1.0
    rows = [["phase", "conn/s", "ratio", "p99 ms", "errors", "requests"]]
    for phase in PHASES:
        r = results[phase]
        rows.append([phase, f"{r['rps']:.0f}", f"{r['rps'] / base:.2f}", f"{r.get('p99_ms', 0):.1f}",
                     f"{r['errors']:.0f}", f"{r['requests']:.0f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--workers", type=int, default=1, help="transocks workers")
    parser.add_argument("--out", type=Path, help="JSON path")
    args = parser.parse_args(argv)
    missing = require_root_and_tools()
    if missing:
        print(f"bench.failover: {missing}", file=sys.stderr)
        return 2
    results = run(args.duration, args.connections, args.workers)
    print(table(results))
    out = args.out or Path(__file__).parent / "results" / f"failover-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"options": vars(args) | {"out": str(out)}, "results": results}, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
