"""Logins under a distributed wrong-password flood: a good client's uncached logins while 100
source addresses send new wrong passwords as fast as usocksd answers.

    sudo .venv/bin/python -m bench.logins [--seconds 20] [--per-source 2] [--users 60] [--fail-limit 10]

usocksd (one worker, scrypt ln=14 hashes, negotiation_timeout 3 s) in the gw namespace; the
flood from 100 extra addresses of the client namespace, `--per-source` connections each; the
good client logs in as a different user each time (so no login is in the cache), one every
0.1 s, from the client's own address, starting 2 s into the flood.  Prints the good logins'
p50/p99/max (connect to status, seconds), how many failed, the flood's answers a second, and the
worker's RSS before and at its peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from tests.lab.logins import LoginFlood, PeakRSS, flood_addresses, good_logins, percentile
from tests.lab.netns import CLIENT_V4, require_root_and_tools
from tests.lab.upstreams import start_usocksd
from transocks.usocksd.credentials import hash_password

from .runner import new_lab

PORT = 1286
MiB = 1 << 20


def run(seconds: float, per_source: int, nusers: int, fail_limit: int) -> dict[str, float]:
    users = {f"user{n}": f"pass-{n}" for n in range(nusers)}
    lab = new_lab()
    try:
        auth = Path(tempfile.mkdtemp(prefix="bench-logins-")) / "users"
        auth.write_text("".join(f"{u}:{hash_password(p)}\n" for u, p in {**users, "alice": "wonder"}.items()))
        auth.chmod(0o644)
        up = start_usocksd(lab, PORT, 1, ["--auth-file", str(auth), "--negotiation-timeout", "3",
                                          "--auth-fail-limit", str(fail_limit), "--access-log", "off"], egress=())
        worker = psutil.Process(up.proc.pid).children(recursive=True)[-1]
        rss_before = worker.memory_info().rss
        with flood_addresses(lab) as sources, PeakRSS(worker) as rss:
            with LoginFlood(lab, PORT, sources, per_source, seconds) as flood:
                time.sleep(2.0)
                started = time.monotonic()
                got: list[float] = []
                until = started + seconds - 3.0  # while the flood still runs
                t = threading.Thread(target=lambda: got.extend(good_logins(lab, PORT, users, CLIENT_V4,
                                                                           until=until)))
                t.start()
                t.join(seconds + 60)
                elapsed = time.monotonic() - started
                answered = flood.refused
        finite = [v for v in got if v != float("inf")]
        return {"good_logins": len(got), "good_failed": len(got) - len(finite),
                "good_p50_s": percentile(got, 0.5), "good_p99_s": percentile(got, 0.99), "good_max_s": max(got),
                "flood_answers_per_s": answered / (elapsed + 2.0), "flood_errors": flood.errors,
                "worker_rss_before_mib": rss_before / MiB, "worker_rss_peak_mib": rss.peak / MiB}
    finally:
        lab.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.logins", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="flood duration bound")
    ap.add_argument("--per-source", type=int, default=2, help="flooding connections per source address")
    ap.add_argument("--users", type=int, default=60, help="good logins (one per user: all uncached)")
    ap.add_argument("--fail-limit", type=int, default=10, help="usocksd's auth_fail_limit")
    args = ap.parse_args(argv)
    require_root_and_tools()
    result = run(args.seconds, args.per_source, args.users, args.fail_limit)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
