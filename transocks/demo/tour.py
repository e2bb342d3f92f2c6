"""What `transocks demo` starts and shows, step by step, in the sandbox's namespaces.

inet: a web server (python's http.server) on WEB_V4:80.  edge: two usocksd
edges, each refusing the name DENIED by its destination rules and leaving from
an egress address of its own.  client: transocks with both edges in its
default pool, sending the name it reads from the Host header (send_domain),
and its rules applied by `transocks rules --apply` there (REDIRECT in that
namespace's nat OUTPUT).  A step passes on what reached which server, read from
the client's result and the web server's log, with the daemons' access-log
lines shown beside it.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .sandbox import EDGE_V4, EGRESS_V4, WEB_V4, Sandbox, SandboxError, wait_for

ALLOWED = "www.example"
DENIED = "blocked.example"
NAMES = {ALLOWED: WEB_V4, DENIED: WEB_V4}
EDGE_PORT = 1080
LISTEN_PORT = 1081
START_TIMEOUT = 30.0
LOG_TIMEOUT = 10.0
FETCH_TIMEOUT = 15
PAGE = f"hello from the web server at {WEB_V4}, the demo's Internet"
READY = "workers ready"
CHAIN_ORDER = ["transocks", "edge 1", "edge 2", "web server"]  # how the logs are shown
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])

# The client when curl is missing: urllib without any proxy, the body then the status on the last line.
PY_FETCH = """\
import sys, urllib.request
try:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(sys.argv[1], timeout=%d) as r:
        sys.stdout.write(r.read().decode("utf-8", "replace") + "\\n" + str(r.status))
except Exception as exc:
    sys.stderr.write("%%s: %%s\\n" %% (type(exc).__name__, exc))
    sys.exit(1)
""" % FETCH_TIMEOUT


class StepFailed(Exception):
    """A step did not show what it should; the message says what was seen instead."""


class Log:
    """One log file; `new()` gives the complete lines written since the last call."""

    def __init__(self, label: str, path: Path, access_only: bool = True) -> None:
        self.label = label
        self.path = path
        self.access_only = access_only  # the daemons' error log lines share the file: keep time=... lines
        self.offset = 0
        self.pending: list[str] = []

    def _read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].decode("utf-8", "replace").splitlines():
            if not self.access_only or line.startswith("time="):
                self.pending.append(line)

    def peek(self) -> list[str]:
        self._read()
        return list(self.pending)

    def new(self) -> list[str]:
        self._read()
        lines, self.pending = self.pending, []
        return lines


@dataclass(frozen=True)
class Edge:
    addr: str  # where it listens (port EDGE_PORT)
    egress: str  # where its connections come from, as the web server sees them


@dataclass(frozen=True)
class Fetch:
    ok: bool
    status: str
    text: str  # the body's first line, or the client's error


class Tour:
    """Builds the chain in `sandbox` and runs the steps; `say` prints one line."""

    def __init__(self, sandbox: Sandbox, say: Callable[[str], None], pause: float = 0.0) -> None:
        self.sb = sandbox
        self.say = say
        self.pause = pause  # seconds after each step, for a reader
        self.logs: dict[str, Log] = {}
        self.edges: dict[str, Edge] = {}  # the edges still running, by label
        self.curl = shutil.which("curl")

    # --- setting up -----------------------------------------------------------------------------

    def daemon_env(self) -> dict[str, str]:
        """The demo's configuration files only: the caller's TRANSOCKS_*/USOCKSD_* settings stay out."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSOCKS_", "USOCKSD_"))}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def write(self, name: str, lines: list[str]) -> Path:
        assert self.sb.workdir is not None
        path = self.sb.workdir / name
        path.write_text("\n".join(lines) + "\n")
        return path

    def start_and_wait(self, name: str, ns: str, argv: list[str], log: Path, ready: str) -> int:
        proc = self.sb.start(name, ns, argv, log, env=self.daemon_env())
        wait_for(f"{name} did not start", lambda: ready in log.read_text(errors="replace"), START_TIMEOUT,
                 proc, log)
        return proc.pid

    def setup(self) -> None:
        sb = self.sb
        sb.build()
        assert sb.workdir is not None
        work = sb.workdir
        self.say(f"  namespaces  {sb.client} (client: curl, transocks), {sb.edge} (two usocksd edges), "
                 f"{sb.inet} (the Internet: a web server)")
        self.say(f"  work dir    {work} (configuration files and logs)")
        for ns in (sb.client, sb.edge):
            sb.hosts(ns, NAMES)
        self.say(f"  names       {', '.join(f'{n} -> {a}' for n, a in NAMES.items())} "
                 f"(hosts files in /etc/netns/{sb.prefix}-*/)")

        www = work / "www"
        www.mkdir()
        (www / "index.html").write_text(PAGE + "\n")
        log = work / "web.log"
        pid = self.start_and_wait("web server", sb.inet, [sys.executable, "-u", "-m", "http.server", "80",
                                                          "--bind", WEB_V4, "--directory", str(www)],
                                  log, "Serving HTTP")
        self.logs["web server"] = Log("web server", log, access_only=False)
        self.logs["web server"].new()  # its start line
        self.say(f"  started     web server on {WEB_V4}:80, python http.server (pid {pid})")

        urls = []
        for i, (addr, egress) in enumerate(zip(EDGE_V4, EGRESS_V4), 1):
            label = f"edge {i}"
            log = work / f"edge{i}.log"
            conf = self.write(f"edge{i}.conf", [
                f"# usocksd, {label} of the demo", f"listen = {addr}:{EDGE_PORT}", "workers = 1",
                "allow_from = 192.0.2.0/24", f"deny_dest = .{DENIED}", f"egress_address = {egress}",
                f"control_socket = {work / f'edge{i}.sock'}", f"error_log = {log}", f"access_log = {log}"])
            pid = self.start_and_wait(label, sb.edge, [sys.executable, "-m", "transocks.usocksd", "-c", str(conf)],
                                      log, READY)
            self.logs[label] = Log(label, log)
            self.edges[label] = Edge(addr, egress)
            urls.append(f"socks5://{addr}:{EDGE_PORT}")
            self.say(f"  started     {label}: usocksd on {addr}:{EDGE_PORT}, deny_dest .{DENIED}, "
                     f"leaving from {egress} (pid {pid})")

        log = work / "transocks.log"
        conf = self.write("transocks.conf", [
            "# transocks in the demo's client namespace",
            f"listen = 127.0.0.1:{LISTEN_PORT}, [::1]:{LISTEN_PORT}", "workers = 1",
            *(f"proxy_url = {url}" for url in urls), "send_domain = true", "health_interval = 0",
            f"control_socket = {work / 'transocks.sock'}", f"error_log = {log}", f"access_log = {log}"])
        pid = self.start_and_wait("transocks", sb.client, [sys.executable, "-m", "transocks", "-c", str(conf)],
                                  log, READY)
        self.logs["transocks"] = Log("transocks", log)
        self.say(f"  started     transocks on 127.0.0.1:{LISTEN_PORT}, both edges in its default pool, "
                 f"send_domain on (pid {pid})")
        res = sb.run_in(sb.client, [sys.executable, "-m", "transocks", "rules", "--apply", "-c", str(conf)],
                        env=self.daemon_env())
        if res.returncode != 0:
            raise SandboxError(f"transocks rules --apply failed ({res.returncode}): {res.stderr.strip()}")
        applied = [ln for ln in res.stderr.splitlines() if "applied" in ln]
        self.say(f"  rules       `transocks rules --apply -c {conf.name}` in {sb.client}: "
                 f"{applied[-1].removeprefix('transocks rules: ') if applied else 'applied'}")

    # --- the steps ------------------------------------------------------------------------------

    def fetch(self, url: str) -> Fetch:
        """One GET from the client namespace, with no proxy setting of any kind."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C"}
        if self.curl:
            argv = [self.curl, "-sS", "--max-time", str(FETCH_TIMEOUT), "-w", "\n%{http_code}", url]
            self.say(f"  $ curl -sS {url}")
        else:
            argv = [sys.executable, "-c", PY_FETCH, url]
            self.say(f"  $ python3 -c <urllib GET> {url}    (curl is not installed)")
        res = self.sb.run_in(self.sb.client, argv, timeout=FETCH_TIMEOUT + 5, env=env)
        body, _, status = res.stdout.rpartition("\n")
        if res.returncode == 0:
            return Fetch(True, status, body.splitlines()[0] if body else "")
        return Fetch(False, status, res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}")

    def show_logs(self, until: Callable[[dict[str, list[str]]], bool]) -> dict[str, list[str]]:
        """Wait until the new lines satisfy `until` (lines are written as connections end), show them."""
        try:
            wait_for("the expected log lines", lambda: until({k: log.peek() for k, log in self.logs.items()}),
                     LOG_TIMEOUT)
        except SandboxError:
            pass  # shown as they are; the step's check says what is missing
        new = {label: self.logs[label].new() for label in sorted(self.logs, key=CHAIN_ORDER.index)}
        width = max(len(label) for label in new) + 1
        for label, lines in new.items():
            shown = lines or ["(no new lines)"]
            for i, line in enumerate(shown):
                self.say(f"    {(label + ':') if i == 0 else '':<{width}} {line}")
        return new

    def step(self, number: int, title: str, why: str) -> None:
        self.say("")
        self.say(f"Step {number}/3: {title}")
        self.say(f"  {why}")

    def served_by(self, lines: list[str], name: str) -> str:
        """The edge whose address the transocks line for `name` names as upstream."""
        for line in lines:
            m = re.search(r"\bupstream=socks5://(\S+)", line)
            if name in line and "outcome=ok" in line and m:
                for label, edge in self.edges.items():
                    if m.group(1) == f"{edge.addr}:{EDGE_PORT}":
                        return label
        raise StepFailed(f"no transocks line says which edge served {name}: {lines}")

    def step_served(self) -> str:
        self.step(1, "a transparent connection is served",
                  "curl knows no proxy: the REDIRECT rule hands its connection to transocks, which reads "
                  "the Host header and hands the name with the connection to an edge, whose rules decide by it.")
        got = self.fetch(f"http://{ALLOWED}/")
        self.say(f"  -> {'HTTP ' + got.status + ': ' + got.text if got.ok else 'failed: ' + got.text}")
        new = self.show_logs(lambda n: bool(n["transocks"] and n["web server"]
                                            and any(n[e] for e in self.edges)))
        if not (got.ok and got.status == "200" and got.text == PAGE):
            raise StepFailed(f"the client did not get the page: {got}")
        if not any("GET / " in ln for ln in new["web server"]):
            raise StepFailed("the web server logged no request")
        edge = self.served_by(new["transocks"], ALLOWED)
        self.say(f"  ok: served, through {edge}")
        return edge

    def step_denied(self) -> None:
        self.step(2, "the denied name is refused",
                  f"{DENIED} has the same address, but the edges refuse that name (deny_dest .{DENIED}): "
                  f"transocks resets the client and nothing reaches the web server.")
        got = self.fetch(f"http://{DENIED}/")
        self.say(f"  -> {'HTTP ' + got.status + ': ' + got.text if got.ok else 'failed: ' + got.text}")
        new = self.show_logs(lambda n: bool(n["transocks"] and any(n[e] for e in self.edges)))
        if got.ok:
            raise StepFailed(f"the client was served: {got}")
        if new["web server"]:
            raise StepFailed(f"the web server was reached: {new['web server']}")
        refused = [ln for e in self.edges for ln in new[e] if DENIED in ln and "outcome=ok" not in ln]
        if not refused:
            raise StepFailed("no edge logged refusing the name")
        self.say("  ok: refused by name at the edge, the web server saw nothing")

    def step_failover(self, serving: str) -> None:
        other = next(label for label in self.edges if label != serving)
        self.step(3, f"{serving} stops, traffic goes on through {other}",
                  f"{serving} (the one that served step 1) gets SIGTERM; transocks' next dial there is refused "
                  f"and it tries the pool's other member.")
        pid = self.sb.procs[serving].pid
        status = self.sb.stop(serving)
        del self.edges[serving]
        self.say(f"  {serving} (pid {pid}) stopped, exit status {status}")
        got = self.fetch(f"http://{ALLOWED}/")
        self.say(f"  -> {'HTTP ' + got.status + ': ' + got.text if got.ok else 'failed: ' + got.text}")
        new = self.show_logs(lambda n: bool(n["transocks"] and n["web server"] and n[other]))
        if not (got.ok and got.status == "200" and got.text == PAGE):
            raise StepFailed(f"the client did not get the page: {got}")
        if not any(ln.startswith(self.edges[other].egress + " ") for ln in new["web server"]):
            raise StepFailed(f"the web server saw no request from {other}'s address")
        if self.served_by(new["transocks"], ALLOWED) != other:
            raise StepFailed(f"not served through {other}")
        self.say(f"  ok: served, through {other}")

    def run(self) -> None:
        self.setup()
        serving = self.step_served()
        time.sleep(self.pause)
        self.step_denied()
        time.sleep(self.pause)
        self.step_failover(serving)
