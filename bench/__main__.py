"""`sudo /work/venv/bin/python -m bench` (from the repository root): see bench/README.md."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from . import report
from .runner import (
    LOADS,
    REPO,
    Options,
    build_lab,
    metadata,
    preflight,
    raise_fd_limit,
    run_setup,
)
from .setups import UPSTREAMS, all_setups, with_floors

RESULTS_DIR = REPO / "bench" / "results"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=(
        "Compare kernel NAT, redsocks, the floor (bench.floor) and transocks (--workers 1 and N) through "
        "dante, and redsocks, the floor and transocks --workers 1 through usocksd, under the same loads "
        "in a private network-namespace lab; prints tables and writes JSON."))
    p.add_argument("--duration", type=float, default=5.0, help="seconds per timed load (default 5)")
    p.add_argument("--idle-conns", type=int, default=2000, help="connections held open by the idle load")
    p.add_argument("--rounds", type=int, default=3,
                   help="run every setup this many times, interleaved; the tables show medians and the CPU "
                        "per connection table the spread (default 3)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                   help="N for the second transocks setup (default: the number of CPUs)")
    p.add_argument("--quiet-wait", type=float, default=30.0, metavar="SECONDS",
                   help="before each setup, wait up to this long for other processes to leave the CPUs idle")
    p.add_argument("--setups", default="", help="comma-separated subset, e.g. redsocks,transocks-w1; the floor "
                                                "on the upstream of each transocks setup is added")
    p.add_argument("--upstreams", default=",".join(UPSTREAMS),
                   help=f"comma-separated subset of {','.join(UPSTREAMS)}: the SOCKS5 upstreams whose setups run")
    p.add_argument("--usocksd-workers", type=int, default=os.cpu_count() or 2,
                   help="usocksd's --workers (default: the number of CPUs; one worker saturates a core "
                        "at connection rates dante still serves with its several processes)")
    p.add_argument("--loads", default=",".join(LOADS), help=f"comma-separated subset of {','.join(LOADS)}")
    p.add_argument("--transocks-arg", action="append", default=[], metavar="ARG",
                   help="extra transocks argument (repeatable), e.g. --transocks-arg=--socks5-pipelining=true")
    p.add_argument("--usocksd-arg", action="append", default=[], metavar="ARG",
                   help="extra usocksd argument (repeatable), e.g. --usocksd-arg=--backlog=4096")
    p.add_argument("--profile", action="store_true",
                   help="py-spy record each transocks worker during each load (perturbs the numbers)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<timestamp>.json)")
    args = p.parse_args(argv)
    unknown = [x for x in args.loads.split(",") if x not in LOADS]
    if unknown:
        p.error(f"unknown loads: {', '.join(unknown)}")
    unknown = [x for x in args.upstreams.split(",") if x not in UPSTREAMS]
    if unknown:
        p.error(f"unknown upstreams: {', '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    why = preflight()
    if why:
        print(f"bench: cannot run: {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    raise_fd_limit()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = args.out or RESULTS_DIR / f"{stamp}.json"
    opts = Options(duration=args.duration, idle_conns=args.idle_conns, loads=args.loads.split(","),
                   quiet_wait=args.quiet_wait, usocksd_workers=args.usocksd_workers,
                   usocksd_args=args.usocksd_arg,
                   profile_dir=RESULTS_DIR / f"{stamp}-profile" if args.profile else None,
                   log=lambda msg: print(msg, file=sys.stderr, flush=True))
    setups = all_setups(args.workers, args.transocks_arg)
    if args.setups:
        wanted = args.setups.split(",")
        unknown = set(wanted) - {s.name for s in setups}
        if unknown:
            print(f"bench: unknown setups {', '.join(sorted(unknown))}; have {', '.join(s.name for s in setups)}",
                  file=sys.stderr)
            return 2
        setups = with_floors([s for s in setups if s.name in wanted], setups)
    setups = [s for s in setups if s.upstream is None or s.upstream in args.upstreams.split(",")]
    if not setups:
        print("bench: no setup left (--setups and --upstreams exclude each other)", file=sys.stderr)
        return 2
    # Start only the upstreams some setup uses.
    opts.upstreams = [u for u in UPSTREAMS if any(s.upstream == u for s in setups)]
    rounds: dict[str, list[dict[str, dict[str, float]]]] = {s.name: [] for s in setups}
    started = time.monotonic()
    try:
        env = build_lab(opts)
        with env.lab:
            for n in range(args.rounds):
                for setup in setups:
                    opts.log(f"== {setup.label} (round {n + 1}/{args.rounds})")
                    rounds[setup.name].append(run_setup(env, setup))
    except KeyboardInterrupt:
        print("bench: interrupted; lab removed", file=sys.stderr)
        return 130
    results = {name: report.median(runs) for name, runs in rounds.items()}
    names = [s.name for s in setups]
    doc = {
        "meta": metadata(),
        "settings": {"duration_s": args.duration, "idle_conns": args.idle_conns, "rounds": args.rounds,
                     "loads": opts.loads,
                     "transocks_args": ["--access-log", "off", *args.transocks_arg],
                     "upstreams": opts.upstreams,
                     "usocksd_args": (["--workers", str(opts.usocksd_workers), *opts.usocksd_extra_args()]
                                      if "usocksd" in opts.upstreams else None),
                     "wall_s": round(time.monotonic() - started, 1)},
        "results": results,
        "rounds": rounds,
        "ratios": report.ratios(results),
        "cpu_per_connection": report.cpu_per_connection(rounds),
        "targets": {s: report.targets(results, s) for s in names if report.has_targets(s)},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    meta = doc["meta"]
    print(f"\n{meta['date']}  kernel {meta['kernel']}  {meta['cpus']} CPUs  {meta['cpu_model']}  "
          f"transocks {meta['git']}  ({doc['settings']['wall_s']} s)")
    print(f"ratios: N = x kernel NAT, R = x redsocks (on dante), D = x the same client on dante "
          f"(setups on usocksd), S = x the same setup with sniffing off; transocks and usocksd run with --access-log off"
          f"{', usocksd with --workers ' + str(opts.usocksd_workers) if 'usocksd' in opts.upstreams else ''}; "
          f"{'median of ' + str(args.rounds) + ' rounds' if args.rounds > 1 else 'one round'}\n")
    print(report.table(results, names))
    print("\nCPU: proxy % / upstream % (whole process tree; of one core) / machine busy % (both cores = 100)\n")
    print(report.cpu_table(results, names))
    floor = report.floor_table(doc["cpu_per_connection"], names)
    if floor:
        print(f"\nCPU per new connection (conn load), median (min–max) of {args.rounds} interleaved round(s); "
              f"× floor: each round's total over the floor's on the same upstream in that round"
              f"{'' if args.rounds >= 3 else ' (fewer than 3 rounds: no real spread)'}\n")
        print(floor)
    noisy = report.interference(results)
    if noisy:
        print("\nWARNING: other processes on this machine used CPU during: " + ", ".join(noisy)
              + " (% of both cores); those numbers are not comparable")
    text = report.targets_text(results, names)
    if text:
        print("\ntargets\n" + text)
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
