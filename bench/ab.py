"""Paired A/B of two transocks trees in one lab: CPU per new connection, alternating.

`sudo python -m bench.ab TREE_A TREE_B [--rounds N] [--duration S] [-- transocks flags]`:
both trees (e.g. `git archive` of two commits) run one worker each in the client
namespace, via dante; each round the REDIRECT rule points at one, then the other (the
order alternates), for `wrk -c64` Connection: close on a 1 KiB file.  Prints each turn's
worker CPU (user, system) per request from /proc, the medians, and B/A of the totals per
round: two trees measured seconds apart, so slow drifts of a shared machine's load touch
both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from tests.lab.netns import INET_V4, Lab
from tests.lab.services import Service, _spawn, _workdir, start_nginx, wait_listening
from tests.lab.upstreams import start_dante

from .loads import wrk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs=2, help="two source trees (each with transocks/ at its top)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("extra", nargs="*", help="transocks flags for both, after --")
    args = ap.parse_args()
    trees = dict(zip("AB", (os.path.abspath(t) for t in args.trees)))
    lab = Lab.create()
    try:
        dante = start_dante(lab, 1080)
        start_nginx(lab, {"small.bin": 1024}, 80)
        url = f"http://{INET_V4}:80/small.bin"
        svcs = {}
        for i, (k, tree) in enumerate(trees.items()):
            port = 1091 + i
            svc = Service("transocks", lab.client, port, _workdir(lab, f"transocks-{k}", None))
            env = dict(os.environ, PYTHONPATH=tree, PYTHONUNBUFFERED="1")
            argv = [sys.executable, "-m", "transocks", "--listen", f"127.0.0.1:{port}", "--workers", "1",
                    "--proxy-url", dante.url, *args.extra]
            _spawn(lab, svc, argv, "transocks.log", env=env, cwd=tree)  # type: ignore[arg-type]
            wait_listening(lab, svc, ready="workers ready")
            svcs[k] = (svc, port)
            redirect = lab.iptables_redirect(port, v6_dst=None)  # warm-up: imports, greenlet pool
            wrk(lab, url, 64, 1.0, close=True)
            redirect.remove()
        res: dict[str, list[tuple[float, float]]] = {k: [] for k in trees}
        for r in range(args.rounds):
            for k in ("AB" if r % 2 == 0 else "BA"):
                svc, port = svcs[k]
                redirect = lab.iptables_redirect(port, v6_dst=None)
                procs = svc.processes()[1:]
                before = [p.cpu_times() for p in procs]
                out = wrk(lab, url, 64, args.duration, close=True)
                after = [p.cpu_times() for p in procs]
                redirect.remove()
                n = out["requests"]
                user = sum(b.user - a.user for a, b in zip(before, after)) / n * 1e6
                system = sum(b.system - a.system for a, b in zip(before, after)) / n * 1e6
                res[k].append((user, system))
                print(f"round {r} {k}: user {user:.1f} system {system:.1f} total {user + system:.1f} us/conn, "
                      f"{out['rps']:.0f} req/s, errors {out.get('errors', 0):g}", flush=True)
        for k, tree in trees.items():
            totals = [u + s for u, s in res[k]]
            print(f"{k} {tree}: user {statistics.median(u for u, _ in res[k]):.1f} "
                  f"system {statistics.median(s for _, s in res[k]):.1f} "
                  f"total {statistics.median(totals):.1f} ({min(totals):.0f}-{max(totals):.0f})")
        ratios = [sum(b) / sum(a) for a, b in zip(res["A"], res["B"])]
        print(f"B/A total per round: median {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
    finally:
        lab.close()


if __name__ == "__main__":
    main()
