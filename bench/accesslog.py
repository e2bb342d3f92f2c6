"""CPU per access-log line as the transocks handler writes it (issue 20, lever f).

`python -m bench.accesslog [--lines N] [--rounds R]`: the handler's `_log` for a
relayed connection (9 fields) into /dev/null, logfmt, with a hub so lines are
batched as in a worker; this process's CPU time per line, each round.
"""

from __future__ import annotations

import argparse
import time

from gevent.hub import get_hub

from transocks.core import logs
from transocks.core.netutil import Endpoint
from transocks.redirector.exits.member import HealthPolicy
from transocks.redirector.exits.registry import DialSettings, Exits
from transocks.redirector.flow import Flow
from transocks.redirector.handler import LoopGuard, TransparentHandler
from transocks.redirector.route import Router
from transocks.redirector.upstream import parse_proxy_url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    logs.setup("transocks", "-", "info", "/dev/null", "logfmt")
    exits = Exits(DialSettings(5, 5), HealthPolicy(2, 3))
    pool = exits.pool("default", [parse_proxy_url("socks5://192.0.2.1:1080")])
    h = TransparentHandler(Router([], pool), LoopGuard([Endpoint("127.0.0.1", 1081)]), 0.0, 5.0)
    conn = Flow(Endpoint("203.0.113.10", 80), Endpoint("192.0.2.2", 41234))
    conn.pool, conn.member, conn.tries = pool, pool.members[0], 1
    get_hub()  # lines are buffered and written per loop turn, as in a worker
    started = time.monotonic()
    for _ in range(args.rounds):
        t = time.process_time()
        for i in range(args.lines):
            h._log(i, conn, started, "ok", "", 81, 352)
        logs.flush()
        print(f"{(time.process_time() - t) / args.lines * 1e6:.2f} us a line")


if __name__ == "__main__":
    main()
