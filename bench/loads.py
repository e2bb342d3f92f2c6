"""The loads: iperf3, wrk and held idle connections, run from the client namespace.

Each load returns a flat dict of metrics.  Load generators are the Debian
binaries, run to completion with a hard timeout; the idle load is done here
with non-blocking sockets so 2000 connections need no threads.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psutil

from tests.lab.netns import Lab

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_BYTES = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


class LoadError(RuntimeError):
    """A load generator failed or its output made no sense."""


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise LoadError(f"unparsable wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, float]:
    """requests/s, transfer MB/s, latency percentiles (ms) and error counts from wrk."""
    res: dict[str, float] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise LoadError(f"no Requests/sec in wrk output:\n{out}")
    res["rps"] = float(m.group(1))
    m = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB|TB)", out)
    if m:
        res["mbytes_per_s"] = float(m.group(1)) * _BYTES[m.group(2)] / 1e6
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.MULTILINE):
        res[f"p{pct}_ms"] = _ms(value)
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = float(m.group(1)) if m else 0.0
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(g) for g in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    res["errors"] = float(errors)
    return res


def wrk(lab: Lab, url: str, connections: int, duration: float, close: bool = False,
        threads: int = 1) -> dict[str, float]:
    """wrk --latency from the client namespace; `close` sends Connection: close."""
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration:g}s",
            "--latency", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    res = lab.run(lab.client, [*argv, url], check=False, timeout=duration + 30)
    if res.returncode != 0:
        raise LoadError(f"wrk failed ({res.returncode}): {res.stderr or res.stdout}")
    return parse_wrk(res.stdout)


def iperf3(lab: Lab, host: str, port: int, duration: float, streams: int = 1,
           omit: float = 1.0) -> dict[str, float]:
    """iperf3 upload (client -> Internet); Gbit/s as received by the server."""
    argv = ["iperf3", "-c", host, "-p", str(port), "-t", f"{duration:g}", "-O", f"{omit:g}",
            "-P", str(streams), "-J"]
    res = lab.run(lab.client, argv, check=False, timeout=duration + omit + 30)
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise LoadError(f"iperf3 failed ({res.returncode}): {res.stderr or res.stdout}") from None
    if data.get("error") or res.returncode != 0:
        raise LoadError(f"iperf3 failed: {data.get('error') or res.stderr}")
    end = data["end"]
    return {"gbps": end["sum_received"]["bits_per_second"] / 1e9,
            "retransmits": float(end.get("sum_sent", {}).get("retransmits", 0))}


@dataclass
class Footprint:
    """Summed RSS, PSS and open fds of a set of processes."""

    rss: int
    fds: int
    pss: int = 0

    @classmethod
    def of(cls, procs: Sequence[psutil.Process], pss: bool = False) -> Footprint:
        """PSS (slower: smaps) is the fair sum for forking servers like dante, whose
        children share most of their pages; RSS would count those once per child."""
        total = cls(0, 0)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                total.rss += p.memory_info().rss
                total.fds += p.num_fds()
                if pss:
                    total.pss += p.memory_full_info().pss
        return total


def _open_batch(sel: selectors.BaseSelector, host: str, port: int, n: int,
                deadline: float) -> list[socket.socket]:
    """Connect n sockets and wait until each has its first byte echoed back."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    for _ in range(n):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            raise LoadError(f"connect {host}:{port}: {errno.errorcode.get(err, err)}")
        sel.register(s, selectors.EVENT_WRITE)
        socks.append(s)
    waiting = len(socks)
    while waiting:
        if time.monotonic() > deadline:
            raise LoadError(f"{waiting} connections not established in time")
        for key, events in sel.select(timeout=0.5):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            if events & selectors.EVENT_WRITE:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise LoadError(f"connect {host}:{port}: {errno.errorcode.get(err, err)}")
                s.send(b"x")
                sel.modify(s, selectors.EVENT_READ)
            elif s.recv(1) == b"x":
                sel.unregister(s)
                waiting -= 1
            else:
                raise LoadError("held connection closed before its echo")
    return socks


def _echo_all(sel: selectors.BaseSelector, socks: list[socket.socket], deadline: float) -> int:
    """Send one byte on every socket; count the echoes that come back."""
    for s in socks:
        s.send(b"y")
        sel.register(s, selectors.EVENT_READ)
    ok = 0
    pending = len(socks)
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            if s.recv(1) == b"y":
                ok += 1
            sel.unregister(s)
            pending -= 1
    for key in list(sel.get_map().values()):
        sel.unregister(key.fileobj)
    return ok


def hold_idle(lab: Lab, host: str, port: int, count: int,
              procs: Callable[[], Sequence[psutil.Process]],
              upstream: Callable[[], Sequence[psutil.Process]] | None = None, batch: int = 200,
              settle: float = 1.0, timeout: float = 60.0) -> dict[str, float]:
    """Hold `count` echoed connections open and weigh what the proxy holds for them.

    RSS and fds are summed over `procs()` (every proxy process) just before
    and while the connections are held; the difference per connection is
    the cost of an idle connection.  Every connection is proven end to end by
    an echo when opened and again after the measurement.  The `upstream`
    processes (whole tree, PSS) are weighed the same way.
    """
    deadline = time.monotonic() + timeout
    before = Footprint.of(procs(), pss=True)
    up_before = Footprint.of(upstream(), pss=True) if upstream else None
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    try:
        while len(socks) < count:
            with lab.netns(lab.client):
                socks += _open_batch(sel, host, port, min(batch, count - len(socks)), deadline)
        time.sleep(settle)
        held = Footprint.of(procs())
        up_held = Footprint.of(upstream(), pss=True) if upstream else None
        alive = _echo_all(sel, socks, deadline)
    finally:
        for s in socks:
            s.close()
        sel.close()
    res = {"held": float(count), "alive_after": float(alive)}
    if held.rss or before.rss:
        res.update(idle_pss_mib=before.pss / (1 << 20),
                   rss_mib=held.rss / (1 << 20),
                   rss_per_conn_kib=(held.rss - before.rss) / count / 1024,
                   fds_per_conn=(held.fds - before.fds) / count)
    if up_before is not None and up_held is not None:
        res.update(upstream_pss_per_conn_kib=(up_held.pss - up_before.pss) / count / 1024,
                   upstream_fds_per_conn=(up_held.fds - up_before.fds) / count)
    return res
