"""Instructions and syscalls per new connection through one transocks worker, the whole path.

`python -m bench` reads CPU per connection from /proc, paired against the floor;
on a shared machine a lever worth a few percent drowns in its spread.  This runs
the bench's lab (client, gw, inet namespaces; dante or usocksd on the gw, nginx
in inet), transocks with one worker behind a REDIRECT rule, and a bounded load of
short HTTP connections (`Connection: close`, 1 KiB answer) from the client
namespace, so every piece of a real connection is counted: accept, original
destination, loop guard, sniffing (on the default ports), routing, the dial and
handshake, the relay, metrics, the access log.

`--count` runs the proxy under valgrind's callgrind twice and reads the
worker's instructions, written as it exits: one daemon serves a warm-up and
then n connections, the other the warm-up alone, both held for the same time
from the warm-up to TERM, so start-up, stop and per-second work cancel out of
the difference (callgrind cannot be asked for a dump of a forked worker).
Deterministic to about ±0.5 %, whatever else the machine runs; it counts user
space only, the part of the CPU per connection where transocks and the floor
differ.  `--strace` attaches `strace -f -c` to the worker instead and prints
its syscalls per connection; `--profile` samples it with py-spy and ranks
functions (kernel time inside a call counts for its caller).  Compare trees,
not absolute numbers: the figures include the worker's share of loop turns.
`--config floor` measures bench.floor the same way.

    python -m bench.conn_cost --count                       # lean: access log and sniffing off
    python -m bench.conn_cost --count --config defaults     # what users run
    python -m bench.conn_cost --strace --concurrency 16
    python -m bench.conn_cost --profile --concurrency 16    # py-spy (pip install py-spy)
    python -m bench.conn_cost --calls                       # calls per connection of each function
    python -m bench.conn_cost --count --upstream usocksd --transocks-arg=--socks5-pipelining=false

Needs root (namespaces), valgrind for --count, strace for --strace.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from tests.lab.netns import INET_V4, Lab, require_root_and_tools
from tests.lab.services import Service, _spawn, start_nginx, wait_listening
from tests.lab.upstreams import Upstream, start_dante, start_usocksd

from .runner import DANTE_PORT, HTTP_NAME, HTTP_PORT, REPO, SMALL, USOCKSD_PORT, new_lab

PORT = 1081
CONFIGS = {
    "lean": ["--access-log", "off", "--sniff-ports="],  # the bench's transocks-w1-nosniff
    "nolog": ["--access-log", "off"],  # transocks-w1: sniffing on (port 80 is a default sniff port)
    "defaults": [],  # transocks-w1-log: what users run
    "floor": ["floor"],  # bench.floor instead of transocks: the target
}
FLOOR = CONFIGS["floor"]
VALGRIND_STARTUP = 600.0  # seconds: CPython and gevent start ~50x slower under callgrind

# The client: `n` connections over `k` threads, each a request and its whole answer; prints failures.
CLIENT = r"""
import socket, sys, threading
n, k, host, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])  # argv[5]: Host
req = b"GET /small.bin HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % sys.argv[5].encode()
failed = []
def run(count):
    for _ in range(count):
        try:
            s = socket.create_connection((host, port), timeout=60)
            s.sendall(req)
            got = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
            s.close()
            head, _, body = got.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200") or len(body) != 1024:
                failed.append(got[:40])
        except OSError as exc:
            failed.append(repr(exc))
threads = [threading.Thread(target=run, args=(n // k + (i < n % k),)) for i in range(k)]
for t in threads: t.start()
for t in threads: t.join()
print(len(failed), failed[:3])
"""


def load(lab: Lab, n: int, k: int) -> float:
    """Run n connections, k at a time, through the REDIRECT rule; returns the seconds taken."""
    started = time.monotonic()
    out = lab.run(lab.client, [sys.executable, "-c", CLIENT, str(n), str(k), INET_V4, str(HTTP_PORT), HTTP_NAME],
                  timeout=3600).stdout
    if not out.startswith("0 "):
        raise SystemExit(f"connections failed: {out.strip()}")
    return time.monotonic() - started


def start_proxy(lab: Lab, upstream: Upstream, args: list[str], prefix: list[str],
                extra_env: dict[str, str] | None = None) -> Service:
    """transocks --workers 1 (or, with FLOOR in args, bench.floor) in the client namespace,
    under `prefix` (valgrind) if given."""
    svc = Service("proxy", lab.client, PORT, lab.tempdir("proxy"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    if args == FLOOR:
        argv = [*prefix, sys.executable, "-m", "bench.floor", "--listen", f"127.0.0.1:{PORT}",
                "--upstream", f"{upstream.host}:{upstream.port}"]
    else:
        argv = [*prefix, sys.executable, "-m", "transocks", "--listen", f"127.0.0.1:{PORT}", "--workers", "1",
                "--proxy-url", upstream.url, *args]
    _spawn(lab, svc, argv, "proxy.log", env=env, cwd=REPO)
    wait_listening(lab, svc, timeout=VALGRIND_STARTUP if prefix else 30.0,
                   ready=None if args == FLOOR else "workers ready")
    return svc


@contextlib.contextmanager
def serving(lab: Lab, upstream: Upstream, args: list[str], prefix: list[str] | None = None,
            extra_env: dict[str, str] | None = None) -> Iterator[int]:
    """The proxy started behind the REDIRECT rule, for the block; yields the pid that serves."""
    svc = start_proxy(lab, upstream, args, prefix or [], extra_env)
    redirect = lab.iptables_redirect(PORT)
    try:
        yield worker_pid(svc, args)
    finally:
        redirect.remove()
        svc.stop(lab)


def sampled(lab: Lab, tool: list[str], n: int, k: int) -> None:
    """n connections while `tool` (strace, py-spy) watches; it writes its file at SIGINT."""
    watcher = subprocess.Popen(tool, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached
    load(lab, n, k)
    watcher.send_signal(signal.SIGINT)
    watcher.wait(timeout=60)


def worker_pid(svc: Service, args: list[str]) -> int:
    """The process that serves the connections: transocks' one worker, or the floor itself."""
    if args == FLOOR:
        return svc.pid
    children = psutil.Process(svc.pid).children()
    if len(children) != 1:
        raise SystemExit(f"expected one worker, found {len(children)}")
    return children[0].pid


def written_at_exit(path: Path, timeout: float = 120.0) -> Path:
    """`path`, once the stopped worker has written it (callgrind's file, the call counts)."""
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return path


def instructions(path: Path) -> int:
    """Ir of a callgrind output file."""
    m = re.search(r"^(?:summary|totals): (\d+)", path.read_text(errors="replace"), re.M)
    if m is None:
        raise SystemExit(f"no instruction count in {path}")
    return int(m.group(1))


def run_counted(lab: Lab, upstream: Upstream, args: list[str], n: int, k: int, warm: int,
                hold: float, keep: Path | None) -> tuple[int, float]:
    """One daemon under callgrind: a warm-up, n connections, then idle until `hold` seconds have
    passed since the warm-up, and TERM.  Returns the worker's instructions (written as it exits)
    and the seconds its n connections took."""
    workdir = lab.tempdir("callgrind")
    prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={workdir}/cg.%p"]
    with serving(lab, upstream, args, prefix) as pid:
        load(lab, warm, k)
        began = time.monotonic()
        seconds = load(lab, n, k) if n else 0.0
        time.sleep(max(0.0, hold - (time.monotonic() - began)))
    path = written_at_exit(workdir / f"cg.{pid}")
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, keep / f"cg.{'more' if n else 'fewer'}")
    return instructions(path), seconds


def count(lab: Lab, upstream: Upstream, args: list[str], n: int, k: int, warm: int, keep: Path | None) -> None:
    """Two daemons, one serving n more connections than the other over the same time from
    ready to TERM: start-up, stop and per-second work cancel out of the difference."""
    more, seconds = run_counted(lab, upstream, args, n, k, warm, 0.0, keep)
    fewer, _ = run_counted(lab, upstream, args, 0, k, warm, seconds, keep)
    print(f"instructions per connection: {(more - fewer) / n:,.0f} ({n} connections, {k} at a time, "
          f"{seconds:.1f} s under callgrind; worker totals {more:,} and {fewer:,})")


def strace(lab: Lab, upstream: Upstream, args: list[str], n: int, k: int, warm: int) -> None:
    out = lab.tempdir("strace") / "strace.txt"
    with serving(lab, upstream, args) as pid:
        load(lab, warm, k)
        sampled(lab, ["strace", "-f", "-c", "-o", str(out), "-p", str(pid)], n, k)
    per_loop_turn = {"epoll_wait", "getpid"}
    total = counted = 0.0
    rows = []
    for line in out.read_text().splitlines():
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
            calls = int(f[3])
            errors = int(f[4]) if len(f) == 6 else 0
            name = f[-1]
            rows.append((name, calls / n, errors / n))
            total += calls / n
            if name not in per_loop_turn:
                counted += (calls - (errors if name == "accept4" else 0)) / n
    for name, calls, errors in sorted(rows, key=lambda r: -r[1]):
        print(f"{name:16} {calls:7.2f}" + (f"  failing {errors:.2f}" if errors else ""))
    print(f"syscalls per connection: {counted:.1f} (without epoll_wait, getpid and failing accept4; all: {total:.1f}; "
          f"{n} connections, {k} at a time)")


def profile(lab: Lab, upstream: Upstream, args: list[str], n: int, k: int, warm: int) -> None:
    """py-spy on the worker during the load: the functions with the most samples, by their own
    time and with their callees (a sampling profile perturbs and varies; rank, do not count)."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = lab.tempdir("profile") / "raw.txt"
    with serving(lab, upstream, args) as pid:
        load(lab, warm, k)
        sampled(lab, [pyspy, "record", "--pid", str(pid), "--rate", "1000", "--nonblocking",
                      "--format", "raw", "-o", str(out)], n, k)
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        weight = int(samples)
        frames = [re.sub(r":\d+\)$", ")", f).replace(str(REPO) + "/", "") for f in stack.split(";")]
        if frames and frames[-1].startswith("run (gevent/_gevent_c_hub_loop") :
            continue
        total += weight
        own[frames[-1]] = own.get(frames[-1], 0) + weight
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + weight
    print(f"{total} samples")
    for title, table in (("own", own), ("with callees", inclusive)):
        print(f"-- {title}")
        for f, w in sorted(table.items(), key=lambda kv: -kv[1])[:30]:
            print(f"{100 * w / total:6.1f} %  {f}")


# Loaded by every Python process of the proxy (PYTHONPATH): a forked worker counts the calls
# of each function (Python and C) until it exits, and writes them down as it does.
CALL_COUNTER = r"""
import collections, os, sys

def _count_calls():
    counts = collections.Counter()
    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            counts[f"{code.co_name} ({code.co_filename}:{code.co_firstlineno})"] += 1
        elif event == "c_call":
            counts[f"{getattr(arg, '__qualname__', arg)} (C)"] += 1
    real_exit = os._exit
    def exit_counted(code):
        sys.setprofile(None)
        with open(os.path.join(os.environ["CALLS_DIR"], f"calls.{os.getpid()}"), "w") as f:
            f.writelines(f"{n}\t{name}\n" for name, n in counts.items())
        real_exit(code)
    os._exit = exit_counted
    sys.setprofile(profile)

os.register_at_fork(after_in_child=_count_calls)
"""


def calls(lab: Lab, upstream: Upstream, args: list[str], n: int, k: int, warm: int) -> None:
    """Python and C function calls per connection in the worker (sys.setprofile): exact counts,
    two runs like --count (one with n more connections), the difference ranked."""
    counted = []
    for more in (n, 0):
        workdir = lab.tempdir("calls")
        (workdir / "sitecustomize.py").write_text(CALL_COUNTER)
        env = {"CALLS_DIR": str(workdir), "PYTHONPATH": f"{workdir}{os.pathsep}{REPO}"}
        with serving(lab, upstream, args, extra_env=env) as pid:
            load(lab, warm, k)
            if more:
                load(lab, more, k)
        path = written_at_exit(workdir / f"calls.{pid}")
        table: dict[str, int] = {}
        for line in path.read_text().splitlines():
            times, _, name = line.partition("\t")
            table[name.replace(str(REPO) + "/", "")] = int(times)
        counted.append(table)
    more_t, fewer_t = counted
    per = {name: (more_t.get(name, 0) - fewer_t.get(name, 0)) / n for name in more_t}
    print(f"calls per connection: {sum(per.values()):.1f} (Python {sum(v for k, v in per.items() if not k.endswith('(C)')):.1f})")
    for name, v in sorted(per.items(), key=lambda kv: -kv[1]):
        if v >= 0.05:
            print(f"{v:7.2f}  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.conn_cost", description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--count", action="store_true", help="instructions per connection under callgrind")
    mode.add_argument("--strace", action="store_true", help="syscalls per connection (strace -f -c)")
    mode.add_argument("--profile", action="store_true", help="py-spy's top functions during the load")
    mode.add_argument("--calls", action="store_true", help="function calls per connection, exact (sys.setprofile)")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="lean",
                    help="transocks with lean: access log and sniffing off; nolog: sniffing on; defaults: both on; "
                         "or floor: bench.floor (the minimal proxy the bench compares with)")
    ap.add_argument("--upstream", choices=("dante", "usocksd"), default="dante")
    ap.add_argument("--connections", type=int, default=None, help="connections measured (300 with --count, 1000 with --strace)")
    ap.add_argument("--concurrency", type=int, default=1, help="connections at a time")
    ap.add_argument("--warmup", type=int, default=100, help="connections before the measured ones")
    ap.add_argument("--keep", type=Path, metavar="DIR",
                    help="--count: copy the worker's two callgrind files here (cg.more, cg.fewer) for callgrind_annotate")
    ap.add_argument("--transocks-arg", action="append", default=[], metavar="ARG", help="extra transocks flag")
    opts = ap.parse_args()
    problem = require_root_and_tools()
    if problem:
        raise SystemExit(problem)
    tool = "valgrind" if opts.count else "strace" if opts.strace else None
    if tool is not None and shutil.which(tool) is None:
        raise SystemExit(f"needs {tool} (apt-get install -y {tool})")
    n = opts.connections or (300 if opts.count or opts.calls else 1000 if opts.strace else 5000)
    args = CONFIGS[opts.config] if opts.config == "floor" else [*CONFIGS[opts.config], *opts.transocks_arg]
    lab = new_lab()
    try:
        if opts.upstream == "dante":
            upstream = start_dante(lab, DANTE_PORT)
        else:
            upstream = start_usocksd(lab, USOCKSD_PORT, 1, ["--access-log", "off"])
        start_nginx(lab, {SMALL: 1024}, HTTP_PORT)
        print(f"config {opts.config} ({' '.join(args) or 'defaults'}) via {opts.upstream}", flush=True)
        if opts.count:
            count(lab, upstream, args, n, opts.concurrency, opts.warmup, opts.keep)
        elif opts.calls:
            calls(lab, upstream, args, n, opts.concurrency, opts.warmup)
        elif opts.strace:
            strace(lab, upstream, args, n, opts.concurrency, opts.warmup)
        else:
            profile(lab, upstream, args, n, opts.concurrency, opts.warmup)
    finally:
        lab.close()


if __name__ == "__main__":
    main()
