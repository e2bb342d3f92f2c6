"""`sudo .venv/bin/python -m bench.udp`: UDP through kernel NAT, redsocks' redudp and transocks.

The lab is tests/lab's three namespaces with kernel NAT on the gw, dnsmasq and iperf3 in the
inet namespace and the SOCKS5 upstreams (dante with UDP ASSOCIATE, usocksd) on the gw.  Setups,
interleaved over the rounds, each started, proved and stopped in turn:

  nat                 the kernel alone (the gw masquerades the client network)
  redudp[-usocksd]    redsocks 0.5 `redudp` in the client namespace (TPROXY, IPv4 only) through
                      dante (or usocksd): the C peer (ipt2socks is not packaged in Debian)
  transocks[-usocksd] transocks --udp true --workers 1 --access-log off through dante (or usocksd)

Every proxy setup gets the same TPROXY diversion of the client namespace's own UDP to the inet
networks (tests/lab/udp.tproxy_udp).  Before its loads a setup must prove the path: a query to a
second, logging dnsmasq has to arrive from the address the setup sends from (the gw's NAT
address for nat, the upstreams' egress address for the proxies); a setup that fails its proof is
reported as failed, never measured on the kernel's path by mistake.

Loads (v4, client in this process or iperf3, bounded in count and time):

  rr      DNS queries to dnsmasq from `--ports` sockets (distinct client ports, so as many flows),
          each with one query in flight, up to `--queries` answers or `--seconds`: answers a
          second, p50/p99 ms, queries lost (no answer within a second)
  flows   `--flows` queries each from a fresh socket (a new flow, a new SOCKS5 association for
          a proxy), 32 in flight: new flows a second and the proxy's CPU per new flow
  iperf   `iperf3 -u -b --rate -l 1200` for `--seconds`: Mbit/s received, loss % (the server's
          count), jitter, and the proxy's CPU per datagram

CPU per answer, flow or datagram is the /proc user + system time of the proxy's processes (and,
separately, of its upstream) over the load, as bench.runner counts it for TCP.
"""

from __future__ import annotations

import argparse
import json
import selectors
import shutil
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.lab.dns import Dnsmasq, query, start_dnsmasq
from tests.lab.netns import (
    CLIENT_NET_V6,
    GW_EXT_V4,
    GW_NAT_V4,
    INET2_V4,
    INET2_V6,
    INET_V4,
    INET_V6,
    Lab,
    require_root_and_tools,
)
from tests.lab.services import Service, start_iperf3, start_transocks
from tests.lab.udp import IperfError, iperf3_udp, start_redudp, tproxy_udp
from tests.lab.upstreams import Upstream, start_dante, start_usocksd

from . import report
from .runner import REPO, Foreign, _cpu_seconds, _cpu_split, _tree, metadata, raise_fd_limit
from .setups import NatSetup, Setup

DANTE_PORT = 1080
USOCKSD_PORT = 1082
REDUDP_PORT = 10053
TRANSOCKS_PORT = 1081
IPERF_PORT = 5201
NAME = "bench.example"
QUERY_TIMEOUT = 1.0
FLOWS_IN_FLIGHT = 32
RESULTS_DIR = REPO / "bench" / "results"
UPSTREAMS = ("dante", "usocksd")
# usocksd limits each association to udp_max_rate datagrams a second (1000 by default) so a client
# cannot use the edge to amplify; iperf3's one flow sends ~10,000 a second at 100 Mbit/s.
USOCKSD_ARGS = ["--access-log", "off", "--udp-max-rate", "0"]


class LoadError(RuntimeError):
    """A load could not run or its result made no sense."""


@dataclass
class RedudpSetup(Setup):
    """redsocks' redudp with the TPROXY diversion of the client's IPv4 UDP."""

    def start(self, lab: Lab, upstream: Upstream | None) -> None:
        assert upstream is not None
        self.service = start_redudp(lab, upstream, REDUDP_PORT)
        self.redirect = tproxy_udp(lab, lab.client, REDUDP_PORT, v6_dst=None)


@dataclass
class UdpTransocksSetup(Setup):
    """transocks --udp true, access log off, with the TPROXY diversion of the client's UDP."""

    workers: int = 1
    extra_args: list[str] = field(default_factory=list)

    def start(self, lab: Lab, upstream: Upstream | None) -> None:
        assert upstream is not None
        args = ["--udp", "true", "--access-log", "off", *self.extra_args]
        self.service = start_transocks(lab, upstream.url, TRANSOCKS_PORT, self.workers, args)
        self.redirect = tproxy_udp(lab, lab.client, TRANSOCKS_PORT)

    def profile_pids(self) -> list[int]:
        return [p.pid for p in self.processes()[1:]]


def all_setups(extra_args: list[str]) -> list[Setup]:
    """nat, then redudp and transocks on dante, then the same two on usocksd."""
    out: list[Setup] = [NatSetup("nat", "kernel NAT", upstream=None)]
    for up in UPSTREAMS:
        suffix = "" if up == "dante" else f"-{up}"
        out.append(RedudpSetup(f"redudp{suffix}", f"redsocks redudp via {up}", upstream=up))
        out.append(UdpTransocksSetup(f"transocks{suffix}", f"transocks --udp true via {up}", upstream=up,
                                     extra_args=extra_args))
    return out


def egress_of(setup: Setup) -> str:
    """The address the setup's datagrams must reach the Internet from."""
    return GW_NAT_V4 if setup.upstream is None else GW_EXT_V4


@dataclass
class Env:
    lab: Lab
    load_dns: Dnsmasq  # INET_V4: not logging, what the loads query
    proof_dns: Dnsmasq  # INET2_V4: logs every query's source
    iperf: Service
    upstreams: dict[str, Upstream]
    foreign: Foreign
    args: argparse.Namespace
    log: Callable[[str], None]


# --- loads ------------------------------------------------------------------------------


def _udp_socket(lab: Lab) -> socket.socket:
    with lab.netns(lab.client):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    return sock


def request_response(lab: Lab, server: str, ports: int, count: int, seconds: float) -> dict[str, float]:
    """`ports` sockets, each with one query in flight, until `count` answers or `seconds`."""
    sel = selectors.DefaultSelector()
    socks = [_udp_socket(lab) for _ in range(ports)]
    sent_at: dict[int, tuple[int, float]] = {}  # fd -> (query id, send time)
    latencies: list[float] = []
    lost = late = qid = 0

    def send(sock: socket.socket) -> None:
        nonlocal qid
        qid = (qid + 1) & 0xFFFF
        sock.sendto(query(NAME, "A", qid), (server, 53))
        sent_at[sock.fileno()] = (qid, time.monotonic())

    try:
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
            send(s)
        started = time.monotonic()
        deadline = started + seconds
        next_sweep = started + QUERY_TIMEOUT
        while len(latencies) < count and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.1):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    reply = s.recv(4096)
                except BlockingIOError:
                    continue
                want, t0 = sent_at[s.fileno()]
                if len(reply) < 2 or struct.unpack("!H", reply[:2])[0] != want:
                    late += 1
                    continue
                latencies.append(time.monotonic() - t0)
                send(s)
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + 0.1
                for s in socks:
                    if now - sent_at[s.fileno()][1] > QUERY_TIMEOUT:
                        lost += 1
                        send(s)
        elapsed = time.monotonic() - started
    finally:
        sel.close()
        for s in socks:
            s.close()
    if not latencies:
        raise LoadError(f"no answer to any of {ports + lost} queries")
    latencies.sort()
    return {"requests": float(len(latencies)), "qps": len(latencies) / elapsed,
            "p50_ms": 1e3 * latencies[len(latencies) // 2], "p99_ms": 1e3 * latencies[int(len(latencies) * 0.99)],
            "lost": float(lost), "late": float(late)}


def new_flows(lab: Lab, server: str, flows: int, seconds: float) -> dict[str, float]:
    """`flows` queries each from a fresh socket (a new client port: a new flow), FLOWS_IN_FLIGHT
    at a time, each given QUERY_TIMEOUT to be answered."""
    sel = selectors.DefaultSelector()
    pending: dict[int, tuple[socket.socket, float]] = {}
    started = time.monotonic()
    deadline = started + seconds
    opened = answered = lost = 0
    try:
        while (opened < flows or pending) and time.monotonic() < deadline:
            while opened < flows and len(pending) < FLOWS_IN_FLIGHT:
                s = _udp_socket(lab)
                s.sendto(query(NAME, "A", opened & 0xFFFF), (server, 53))
                sel.register(s, selectors.EVENT_READ)
                pending[s.fileno()] = (s, time.monotonic())
                opened += 1
            for key, _ in sel.select(timeout=0.05):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    s.recv(4096)
                except BlockingIOError:
                    continue
                answered += 1
                sel.unregister(s)
                del pending[s.fileno()]
                s.close()
            now = time.monotonic()
            for fd, (s, t0) in list(pending.items()):
                if now - t0 > QUERY_TIMEOUT:
                    lost += 1
                    sel.unregister(s)
                    del pending[fd]
                    s.close()
        elapsed = time.monotonic() - started
    finally:
        for s, _ in pending.values():
            s.close()
        sel.close()
    if not answered:
        raise LoadError(f"no answer from any of {opened} new flows")
    return {"requests": float(answered), "flows_per_s": answered / elapsed, "lost": float(lost)}


def iperf_load(lab: Lab, rate: str, seconds: float) -> dict[str, float]:
    try:
        got = iperf3_udp(lab, lab.client, INET_V4, IPERF_PORT, rate=rate, seconds=seconds)
    except IperfError as exc:
        raise LoadError(str(exc)) from None
    return {"requests": float(got.packets), "mbps": got.mbps, "lost_pct": got.lost_percent,
            "jitter_ms": got.jitter_ms}


LOADS: dict[str, Callable[[Env], dict[str, float]]] = {
    "rr": lambda env: request_response(env.lab, INET_V4, env.args.ports, env.args.queries, env.args.seconds),
    "flows": lambda env: new_flows(env.lab, INET_V4, env.args.flows, env.args.seconds * 4),
    "iperf": lambda env: iperf_load(env.lab, env.args.rate, env.args.seconds),
}


# --- running ------------------------------------------------------------------------------


def measure(env: Env, setup: Setup, load: str) -> dict[str, float]:
    """One load on one setup with the CPU of the proxy and of its upstream per request."""
    procs = setup.processes()
    upstream = env.upstreams.get(setup.upstream or "")
    foreign0 = env.foreign.cpu_seconds()
    cpu0 = _cpu_split(procs)
    up0 = _cpu_seconds(_tree(upstream.proc.pid)) if upstream else 0.0
    t0 = time.monotonic()
    res = LOADS[load](env)
    elapsed = time.monotonic() - t0
    res["foreign_cpu_pct"] = env.foreign.busy_pct(foreign0, env.foreign.cpu_seconds(), elapsed)
    n = res["requests"]
    if procs:
        user, system = (a - b for a, b in zip(_cpu_split(setup.processes()), cpu0))
        res["proxy_cpu_pct"] = 100.0 * (user + system) / elapsed
        res["proxy_user_us_per_req"] = 1e6 * user / n
        res["proxy_sys_us_per_req"] = 1e6 * system / n
        res["proxy_us_per_req"] = 1e6 * (user + system) / n
    if upstream is not None:
        used = _cpu_seconds(_tree(upstream.proc.pid)) - up0
        res["upstream_cpu_pct"] = 100.0 * used / elapsed
        res["upstream_us_per_req"] = 1e6 * used / n
    return res


def prove(env: Env, setup: Setup) -> None:
    """One query to the logging dnsmasq must arrive from the setup's egress address."""
    before = len(env.proof_dns.queries())
    sock = _udp_socket(env.lab)
    sock.settimeout(5)
    try:
        sock.sendto(query(NAME, "A"), (INET2_V4, 53))
        sock.recv(4096)
    except OSError as exc:
        raise LoadError(f"no answer through {setup.name}: {exc!r}") from None
    finally:
        sock.close()
    seen = [q.source for q in env.proof_dns.wait_queries(before + 1)[before:]]
    if seen != [egress_of(setup)]:
        raise LoadError(f"{setup.name}: the query reached dnsmasq from {seen}, not {egress_of(setup)}")


def run_setup(env: Env, setup: Setup) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    env.foreign.wait_quiet(env.log, max_wait=env.args.quiet_wait)
    try:
        setup.start(env.lab, env.upstreams.get(setup.upstream or ""))
        prove(env, setup)
        for load in env.args.loads.split(","):
            try:
                out[load] = measure(env, setup, load)
            except LoadError as exc:
                env.log(f"  {setup.name}: {load} FAILED: {exc}")
                out[load] = {"failed": 1.0}
            env.log(f"  {setup.name}: {load} " + " ".join(f"{k}={v:.4g}" for k, v in out[load].items()))
    except (LoadError, RuntimeError, TimeoutError) as exc:
        env.log(f"  {setup.name}: FAILED: {exc}")
        out = {load: {"failed": 1.0} for load in env.args.loads.split(",")}
    finally:
        setup.stop(env.lab)
    return out


def build(args: argparse.Namespace, upstreams: list[str], log: Callable[[str], None]) -> Env:
    lab = Lab.create()
    try:
        lab.sysctl(lab.client, "net.ipv4.ip_local_port_range=1024 65000")
        lab.masquerade(to_source=GW_NAT_V4)
        lab.masquerade(sources=(CLIENT_NET_V6,))
        load_dns = start_dnsmasq(lab, {NAME: [INET_V4, INET_V6]}, hosts=(INET_V4, INET_V6), log_queries=False)
        proof_dns = start_dnsmasq(lab, {NAME: [INET2_V4, INET2_V6]}, hosts=(INET2_V4, INET2_V6))
        iperf = start_iperf3(lab, IPERF_PORT)
        ups: dict[str, Upstream] = {}
        if "dante" in upstreams:
            ups["dante"] = start_dante(lab, DANTE_PORT, udp=True)
        if "usocksd" in upstreams:
            ups["usocksd"] = start_usocksd(lab, USOCKSD_PORT, args.usocksd_workers, USOCKSD_ARGS)
    except BaseException:
        lab.close()
        raise
    return Env(lab, load_dns, proof_dns, iperf, ups, Foreign(lab), args, log)


# --- report -------------------------------------------------------------------------------

ROWS = (
    ("DNS answers a second", "rr", "qps", "1/s"),
    ("  latency p50", "rr", "p50_ms", "ms"),
    ("  latency p99", "rr", "p99_ms", "ms"),
    ("  queries lost", "rr", "lost", ""),
    ("  proxy CPU per answer", "rr", "proxy_us_per_req", "µs"),
    ("  upstream CPU per answer", "rr", "upstream_us_per_req", "µs"),
    ("new flows a second", "flows", "flows_per_s", "1/s"),
    ("  flows lost", "flows", "lost", ""),
    ("  proxy CPU per new flow", "flows", "proxy_us_per_req", "µs"),
    ("  upstream CPU per new flow", "flows", "upstream_us_per_req", "µs"),
    ("iperf3 -u received", "iperf", "mbps", "Mbit/s"),
    ("  loss", "iperf", "lost_pct", "%"),
    ("  jitter", "iperf", "jitter_ms", "ms"),
    ("  proxy CPU per datagram", "iperf", "proxy_us_per_req", "µs"),
    ("  upstream CPU per datagram", "iperf", "upstream_us_per_req", "µs"),
)
COMPARED = ("qps", "flows_per_s", "mbps", "proxy_us_per_req", "upstream_us_per_req")


def baselines(setup: str) -> list[tuple[str, str]]:
    """N = kernel NAT, R = redudp on the same upstream (for transocks setups)."""
    if setup == "nat":
        return []
    out = [("nat", "N")]
    if setup.startswith("transocks"):
        out.append((setup.replace("transocks", "redudp", 1), "R"))
    return out


def table(results: report.Results, setups: list[str]) -> str:
    lines = [["metric", "unit", *setups]]
    for label, load, metric, unit in ROWS:
        values = [results.get(s, {}).get(load, {}).get(metric) for s in setups]
        if all(v is None for v in values):
            continue
        cells = [label, unit]
        for s, v in zip(setups, values):
            text = report._fmt(v)
            if metric in COMPARED and v is not None:
                marks = [f"{v / b:.2f}{letter}" for base, letter in baselines(s)
                         if (b := results.get(base, {}).get(load, {}).get(metric))]
                if marks:
                    text += f" ({' '.join(marks)})"
            cells.append(text)
        lines.append(cells)
    return report._align(lines)


def ratios(results: report.Results) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for setup in results:
        for _, load, metric, _ in ROWS:
            v = results[setup].get(load, {}).get(metric)
            for base, _letter in baselines(setup):
                b = results.get(base, {}).get(load, {}).get(metric)
                if metric in COMPARED and v is not None and b:
                    out.setdefault(setup, {}).setdefault(f"{metric}@{load}", {})[base] = v / b
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.udp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians (default 3)")
    p.add_argument("--seconds", type=float, default=5.0, help="longest a load runs (flows: 4x) (default 5)")
    p.add_argument("--queries", type=int, default=50_000, help="rr: stop after this many answers (default 50000)")
    p.add_argument("--ports", type=int, default=64, help="rr: client sockets, one flow each (default 64)")
    p.add_argument("--flows", type=int, default=1000, help="flows: new flows (default 1000)")
    p.add_argument("--rate", default="50M", help="iperf: iperf3 -u -b (default 50M, ~5,200 datagrams/s)")
    p.add_argument("--loads", default=",".join(LOADS), help=f"subset of {','.join(LOADS)}")
    p.add_argument("--setups", default="", help="subset of nat,redudp,transocks,redudp-usocksd,transocks-usocksd")
    p.add_argument("--upstreams", default=",".join(UPSTREAMS), help="subset of dante,usocksd")
    p.add_argument("--usocksd-workers", type=int, default=1, help="usocksd --workers (default 1)")
    p.add_argument("--transocks-arg", action="append", default=[], metavar="ARG", help="extra transocks flag")
    p.add_argument("--quiet-wait", type=float, default=30.0, metavar="SECONDS",
                   help="before each setup wait up to this long for other processes to leave the CPUs idle")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/udp-<timestamp>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [t for t in ("dnsmasq", "iperf3", "redsocks", "danted") if not shutil.which(t)]
    why = require_root_and_tools() or (f"missing tools: {', '.join(missing)}" if missing else None)
    if why:
        print(f"bench.udp: cannot run: {why}", file=sys.stderr)
        return 2
    unknown = set(args.loads.split(",")) - set(LOADS)
    if unknown:
        print(f"bench.udp: unknown loads {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    raise_fd_limit()
    setups = [s for s in all_setups(args.transocks_arg)
              if (not args.setups or s.name in args.setups.split(","))
              and (s.upstream is None or s.upstream in args.upstreams.split(","))]
    upstreams = [u for u in UPSTREAMS if any(s.upstream == u for s in setups)]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rounds: dict[str, list[dict[str, dict[str, float]]]] = {s.name: [] for s in setups}
    started = time.monotonic()
    env = build(args, upstreams, log)
    with env.lab:
        for n in range(args.rounds):
            for setup in setups:
                log(f"== {setup.label} (round {n + 1}/{args.rounds})")
                rounds[setup.name].append(run_setup(env, setup))
    results = {name: report.median(runs) for name, runs in rounds.items()}
    names = [s.name for s in setups]
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = args.out or RESULTS_DIR / f"udp-{stamp}.json"
    doc = {"meta": metadata(), "settings": {k: v for k, v in vars(args).items() if k != "out"}
           | {"usocksd_args": USOCKSD_ARGS, "wall_s": round(time.monotonic() - started, 1)},
           "results": results, "rounds": rounds, "ratios": ratios(results)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    meta = doc["meta"]
    print(f"\n{meta['date']}  kernel {meta['kernel']}  {meta['cpus']} CPUs  transocks {meta['git']}  "
          f"({doc['settings']['wall_s']} s); median of {args.rounds} round(s); N = x kernel NAT, "
          f"R = x redudp on the same upstream\n")
    print(table(results, names))
    noisy = report.interference(results)
    if noisy:
        print("\nWARNING: other processes used CPU during: " + ", ".join(noisy) + " (% of both cores)")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
