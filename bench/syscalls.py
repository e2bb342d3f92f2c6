"""Syscalls per connection of one transocks worker: `strace -c -f` during a bounded load.

A count does not depend on what else the machine runs, so it can judge a lever
of one syscall where the bench's CPU figures cannot.  In a private lab (the
bench's namespaces, dante, nginx with a 100-byte file) one worker of this
checkout, lean (`--access-log off --sniff-ports=`, and any `--transocks-arg`),
serves first N fetches one at a time from a Python client in the client
namespace, then `wrk -c16` (Connection: close) for a few seconds, each under
its own strace.  Printed per connection: every syscall with its failures, and
the total without what a loop turn costs whatever it serves (`epoll_wait`,
gevent's fork check `getpid`, the failing `accept4` that ends a batch).

    sudo .venv/bin/python -m bench.syscalls                  # about 30 s
    sudo .venv/bin/python -m bench.syscalls --upstream usocksd --fetches 300
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.loads import wrk
from tests.lab.netns import INET_V4, Lab
from tests.lab.services import start_nginx, start_transocks
from tests.lab.upstreams import start_dante, start_usocksd

PORT = 1081
HTTP_PORT = 80
FILE = "small.bin"
PER_TURN = ("epoll_wait", "getpid")  # and accept4's failures: a loop turn's, not a connection's
_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(\d+)?\s*(\w+)$")


def fetch(n: int) -> None:
    """n HTTP/1.0 fetches through the REDIRECT rule, one at a time (run in the client namespace)."""
    request = f"GET /{FILE} HTTP/1.0\r\nHost: {INET_V4}\r\n\r\n".encode()
    for _ in range(n):
        with socket.create_connection((INET_V4, HTTP_PORT), timeout=10) as s:
            s.sendall(request)
            while s.recv(65536):
                pass


def traced(pid: int, out: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", str(out)], stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached
    return proc


def counts(path: Path) -> dict[str, tuple[int, int]]:
    """syscall -> (calls, errors) from strace -c's table."""
    out = {}
    for line in path.read_text().splitlines():
        m = _ROW.match(line)
        if m and m.group(3) != "total":
            out[m.group(3)] = (int(m.group(1)), int(m.group(2) or 0))
    return out


def report(title: str, table: dict[str, tuple[int, int]], conns: int) -> None:
    print(f"\n{title}: {conns} connections")
    total = 0.0
    for name, (calls, errors) in sorted(table.items(), key=lambda kv: -kv[1][0]):
        per, failing = calls / conns, errors / conns
        turn = name in PER_TURN
        counted = 0.0 if turn else per - failing if name == "accept4" else per
        total += counted
        mark = "  (per loop turn)" if turn else "  (failing: per loop turn)" if name == "accept4" and errors else ""
        print(f"  {name:16} {per:6.2f}" + (f"  failing {failing:.2f}" if errors else "") + mark)
    print(f"  {'per connection':16} {total:6.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.syscalls", description=__doc__.splitlines()[0])
    ap.add_argument("--fetches", type=int, default=400, help="sequential fetches (default 400)")
    ap.add_argument("--seconds", type=int, default=3, help="seconds of wrk -c16 (default 3; 0: none)")
    ap.add_argument("--upstream", choices=("dante", "usocksd"), default="dante")
    ap.add_argument("--transocks-arg", action="append", default=[], metavar="ARG")
    opts = ap.parse_args(argv)
    with Lab.create() as lab:
        up = start_dante(lab) if opts.upstream == "dante" else start_usocksd(lab, extra_args=["--access-log", "off"])
        start_nginx(lab, {FILE: 100}, HTTP_PORT)
        svc = start_transocks(lab, up.url, PORT, 1, ["--access-log", "off", "--sniff-ports=", *opts.transocks_arg])
        lab.iptables_redirect(PORT)
        worker = svc.processes()[1].pid
        with lab.netns(lab.client):
            fetch(20)  # warm: imports, first-connection caches
        tmp = lab.tempdir("strace")
        seq = tmp / "sequential.txt"
        proc = traced(worker, seq)
        with lab.netns(lab.client):
            fetch(opts.fetches)
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        report("sequential (one at a time)", counts(seq), opts.fetches)
        if opts.seconds:
            conc = tmp / "concurrent.txt"
            proc = traced(worker, conc)
            result = wrk(lab, f"http://{INET_V4}:{HTTP_PORT}/{FILE}", 16, opts.seconds, close=True)
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
            report("concurrent (wrk -c16, Connection: close)", counts(conc), int(result["requests"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
