"""Turn raw per-setup metrics into the summary table, ratios and target checks."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

Results = dict[str, dict[str, dict[str, float]]]  # setup -> load -> metric -> value


@dataclass(frozen=True)
class Row:
    label: str
    load: str
    metric: str
    unit: str
    higher_is_better: bool = True


ROWS = (
    Row("iperf3 upload, 1 stream", "iperf1", "gbps", "Gbit/s"),
    Row("iperf3 upload, 8 streams", "iperf8", "gbps", "Gbit/s"),
    Row("new connection per request, 64 conns", "conn", "rps", "req/s"),
    Row("  latency p50", "conn", "p50_ms", "ms", False),
    Row("  latency p99", "conn", "p99_ms", "ms", False),
    Row("  proxy user CPU per connection", "conn", "proxy_user_us_per_req", "µs", False),
    Row("  proxy system CPU per connection", "conn", "proxy_sys_us_per_req", "µs", False),
    Row("  proxy total CPU per connection", "conn", "proxy_us_per_req", "µs", False),
    Row("keep-alive, 64 conns", "ka64", "rps", "req/s"),
    Row("keep-alive, 1 conn", "ka1", "rps", "req/s"),
    Row("  latency p99", "ka1", "p99_ms", "ms", False),
    Row("download large file, 1 conn", "download", "mbytes_per_s", "MB/s"),
    Row("idle: proxy PSS, nothing held", "idle", "idle_pss_mib", "MiB", False),
    Row("idle conns: RSS per conn", "idle", "rss_per_conn_kib", "KiB", False),
    Row("idle conns: fds per conn", "idle", "fds_per_conn", "", False),
    Row("idle conns: total RSS", "idle", "rss_mib", "MiB", False),
    Row("idle conns: upstream PSS per conn", "idle", "upstream_pss_per_conn_kib", "KiB", False),
    Row("idle conns: upstream fds per conn", "idle", "upstream_fds_per_conn", "", False),
)
BASELINES = (("nat", "N"), ("redsocks", "R"))
USOCKSD = "-usocksd"  # X-usocksd is setup X with usocksd instead of dante as its upstream
NOSNIFF = "-nosniff"  # X-nosniff is setup X with sniffing off (bench.setups)
FLOOR = "floor"  # bench.floor's minimal proxy (bench.setups.FLOOR)
CPU_PER_CONN = (("user", "proxy_user_us_per_req"), ("system", "proxy_sys_us_per_req"),
                ("total", "proxy_us_per_req"))
Rounds = dict[str, list[dict[str, dict[str, float]]]]  # setup -> one result per round, in round order


def dante_twin(setup: str) -> str | None:
    """The same client on dante, for a setup on usocksd (transocks-w1-usocksd -> transocks-w1)."""
    return setup.removesuffix(USOCKSD) if setup.endswith(USOCKSD) else None


def baselines(setup: str) -> list[tuple[str, str]]:
    """(baseline setup, letter) pairs a setup is compared with.

    N = kernel NAT, R = redsocks (on dante), and for a setup on usocksd
    D = the same client on dante, which R already is for redsocks-usocksd;
    S = the same setup with sniffing off, where that setup ran.
    NAT itself is compared with nothing.
    """
    if setup == "nat":
        return []
    twin = dante_twin(setup)
    out = [(base, letter) for base, letter in BASELINES if base not in (setup, twin)]
    if twin:
        out.append((twin, "D"))
    if not setup.endswith(NOSNIFF):
        out.append((setup + NOSNIFF, "S"))  # shown only when that setup ran
    return out


def median(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per load and metric, the median over rounds (a failed load counts only if all failed)."""
    out: dict[str, dict[str, float]] = {}
    for load in dict.fromkeys(load for run in runs for load in run):
        samples = [run[load] for run in runs if load in run and "failed" not in run[load]]
        if not samples:
            out[load] = {"failed": 1.0}
            continue
        metrics = dict.fromkeys(m for sample in samples for m in sample)
        out[load] = {m: statistics.median(s[m] for s in samples if m in s) for m in metrics}
    return out


def value(results: Results, setup: str, row: Row) -> float | None:
    return results.get(setup, {}).get(row.load, {}).get(row.metric)


def ratios(results: Results) -> dict[str, dict[str, dict[str, float]]]:
    """setup -> "metric@load" -> {baseline setup: value / baseline} (see `baselines`)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for setup in results:
        for row in ROWS:
            v = value(results, setup, row)
            for base, _ in baselines(setup):
                b = value(results, base, row)
                if v is not None and b:
                    out.setdefault(setup, {}).setdefault(f"{row.metric}@{row.load}", {})[base] = v / b
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def table(results: Results, setups: list[str]) -> str:
    """Values, and for each proxy its ratios: to NAT (N), redsocks (R), the same client on dante (D)."""
    head = ["metric", "unit", *setups]
    lines = [head]
    for row in ROWS:
        if all(value(results, s, row) is None for s in setups):
            continue
        cells = [row.label, row.unit]
        for s in setups:
            v = value(results, s, row)
            text = _fmt(v)
            marks = []
            for base, letter in baselines(s):
                b = value(results, base, row)
                if v is not None and b:
                    marks.append(f"{v / b:.2f}{letter}")
            if marks:
                text += f" ({' '.join(marks)})"
            cells.append(text)
        lines.append(cells)
    return _align(lines)


def cpu_table(results: Results, setups: list[str]) -> str:
    """Proxy CPU %, its upstream's CPU % (of one core) and machine busy % during each load."""
    loads = [r.load for r in ROWS if any("machine_busy_pct" in results.get(s, {}).get(r.load, {}) for s in setups)]
    lines = [["load", *setups]]
    for load in dict.fromkeys(loads):
        cells = [load]
        for s in setups:
            m = results.get(s, {}).get(load, {})
            if "machine_busy_pct" not in m:
                cells.append("-")
                continue
            proxy, upstream = m.get("proxy_cpu_pct"), m.get("upstream_cpu_pct")
            cells.append(f"{_fmt(proxy)} / {_fmt(upstream)} / {m['machine_busy_pct']:.0f}")
        lines.append(cells)
    return _align(lines)


def _align(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def interference(results: Results, limit_pct: float = 5.0) -> list[str]:
    """Loads during which processes outside the lab used the machine noticeably."""
    out = []
    for setup, loads in results.items():
        for load, m in loads.items():
            pct = m.get("foreign_cpu_pct", 0.0)
            if pct >= limit_pct:
                out.append(f"{setup}/{load}: {pct:.0f}%")
    return out


def has_targets(setup: str) -> bool:
    """transocks setups have the issue's targets; setups on usocksd have "usocksd >= dante" ones."""
    return setup.startswith("transocks") or dante_twin(setup) is not None


def targets(results: Results, setup: str) -> list[dict[str, Any]]:
    """The issue's targets for one setup: name, value, goal, met.

    transocks is held against redsocks on the same upstream; a setup on
    usocksd also against the same client on dante (usocksd at least dante's
    rate and throughput).
    """
    def get(load: str, metric: str, of: str = setup) -> float | None:
        return results.get(of, {}).get(load, {}).get(metric)

    twin = dante_twin(setup)
    checks = []
    if setup.startswith("transocks"):
        redsocks = "redsocks" + (USOCKSD if twin else "")
        checks += [
            (f"connection rate >= {redsocks}", get("conn", "rps"), get("conn", "rps", redsocks), ">="),
            (f"keep-alive rate (64) >= {redsocks}", get("ka64", "rps"), get("ka64", "rps", redsocks), ">="),
            (f"8-stream throughput >= {redsocks}", get("iperf8", "gbps"), get("iperf8", "gbps", redsocks), ">="),
            ("1-stream throughput >= 0.6 x NAT", get("iperf1", "gbps"),
             0.6 * nat if (nat := get("iperf1", "gbps", "nat")) else None, ">="),
            (f"new-conn p99 <= {redsocks}", get("conn", "p99_ms"), get("conn", "p99_ms", redsocks), "<="),
            ("idle RSS per conn <= 8 KiB", get("idle", "rss_per_conn_kib"), 8.0, "<="),
            ("idle fds per conn <= 2", get("idle", "fds_per_conn"), 2.0, "<="),
        ]
    if twin:
        checks += [
            ("usocksd: connection rate >= dante", get("conn", "rps"), get("conn", "rps", twin), ">="),
            ("usocksd: keep-alive rate (64) >= dante", get("ka64", "rps"), get("ka64", "rps", twin), ">="),
            ("usocksd: 1-stream throughput >= dante", get("iperf1", "gbps"), get("iperf1", "gbps", twin), ">="),
            ("usocksd: 8-stream throughput >= dante", get("iperf8", "gbps"), get("iperf8", "gbps", twin), ">="),
        ]
    out = []
    for name, v, goal, op in checks:
        met = None
        if v is not None and goal is not None:
            met = v >= goal if op == ">=" else v <= goal
        out.append({"target": name, "value": v, "goal": goal, "met": met})
    return out


def targets_text(results: Results, setups: list[str]) -> str:
    width = max((len(s) for s in setups), default=0)
    lines = []
    for s in setups:
        if not has_targets(s):
            continue
        for t in targets(results, s):
            state = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
            lines.append(f"{s:<{width}} {t['target']:<40} {_fmt(t['value']):>10} vs {_fmt(t['goal']):>10}  {state}")
    return "\n".join(lines)


def floor_of(setup: str) -> str:
    """The floor on the same upstream as `setup`."""
    return FLOOR + USOCKSD if dante_twin(setup) else FLOOR


def _spread(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def cpu_per_connection(rounds: Rounds) -> dict[str, dict[str, dict[str, float]]]:
    """setup -> user / system / total / x_floor -> median, min and max over the rounds of the `conn` load.

    x_floor is paired: each round's total over the floor's total in the same
    round (same upstream), so a machine that slows down between rounds moves
    both sides of each ratio.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    total = CPU_PER_CONN[-1][1]
    for setup, runs in rounds.items():
        conn = [run.get("conn", {}) for run in runs]
        entry = {kind: _spread(xs) for kind, metric in CPU_PER_CONN if (xs := [c[metric] for c in conn if metric in c])}
        if not entry:
            continue
        floor = [run.get("conn", {}) for run in rounds.get(floor_of(setup), [])]
        paired = [c[total] / f[total] for c, f in zip(conn, floor) if total in c and f.get(total)]
        if paired:
            entry["x_floor"] = _spread(paired)
        out[setup] = entry
    return out


def floor_table(cpu: dict[str, dict[str, dict[str, float]]], setups: list[str]) -> str:
    """CPU per new connection, each cell "median (min-max)" over the rounds, and the paired ratio to the floor."""
    lines = [["setup", "user µs", "system µs", "total µs", "× floor"]]
    for setup in setups:
        entry = cpu.get(setup)
        if not entry:
            continue
        cells = [setup]
        for kind in ("user", "system", "total", "x_floor"):
            s = entry.get(kind)
            digits = ".2f" if kind == "x_floor" else ".1f"
            cells.append("-" if s is None else
                         f"{s['median']:{digits}} ({s['min']:{digits}}–{s['max']:{digits}})")
        lines.append(cells)
    return _align(lines) if len(lines) > 1 else ""
