"""The master's request/response sockets (the control socket, /metrics) and `status`.

Both are served on the master's own selector loop, one short exchange per
connection: read a request until it is complete, write one answer, close.
No thread: the master forks workers, and a thread holding a lock (logging's,
prometheus_client's) at the moment of a fork leaves that lock held forever in
the child.  No gevent either (see `master`).  Answers are small (a status, a
scrape of a few hundred lines) and built in well under a millisecond, so the
loop is not held up; a slow or silent client costs a buffered socket until
its deadline.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import selectors
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..core.config import ConfigError
from ..core.netutil import Endpoint

log = logging.getLogger("transocks")

REQUEST_LIMIT = 8192
SESSION_TIMEOUT = 5.0
MAX_SESSIONS = 32
STATUS_REQUEST = b"status\n"


class Served:
    """What the master's selector calls back (key.data)."""

    def on_event(self, mask: int) -> None:
        raise NotImplementedError


class Server(Served):
    """A listening socket; each accepted client gets one `answer(request)`."""

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector,
                 complete: Callable[[bytes], bool], answer: Callable[[bytes], bytes]) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.selector = selector
        self.complete = complete
        self.answer = answer
        self.sessions: set[_Session] = set()
        selector.register(sock, selectors.EVENT_READ, self)

    def on_event(self, mask: int) -> None:
        """Accept; when every session is taken, the oldest one still reading its request
        makes room.  Clients that trickle a byte a second (slowloris) would otherwise
        hold every session for its whole deadline and refuse the scraper; a real
        request comes whole right behind its connection, and is answered at once."""
        for _ in range(MAX_SESSIONS):
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if len(self.sessions) >= MAX_SESSIONS:
                reading = [s for s in self.sessions if not s.out]
                if not reading:
                    conn.close()
                    continue
                min(reading, key=lambda s: s.deadline).close()
            conn.setblocking(False)
            s = _Session(self, conn)
            self.sessions.add(s)
            self.selector.register(conn, selectors.EVENT_READ, s)
            s.on_event(selectors.EVENT_READ)  # the request is usually here already

    def expire(self, now: float) -> None:
        for s in [s for s in self.sessions if now > s.deadline]:
            s.close()

    def close(self) -> None:
        for s in list(self.sessions):
            s.close()
        self.selector.unregister(self.sock)
        self.sock.close()

    def abandon(self) -> None:
        """In a forked worker: close the copies without touching the (closed) selector."""
        for s in self.sessions:
            s.conn.close()
        self.sock.close()


class _Session(Served):
    def __init__(self, server: Server, conn: socket.socket) -> None:
        self.server = server
        self.conn = conn
        self.inbuf = b""
        self.out = b""
        self.deadline = time.monotonic() + SESSION_TIMEOUT

    def on_event(self, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ and not self.out:
                data = self.conn.recv(4096)
                self.inbuf += data
                if not data or len(self.inbuf) > REQUEST_LIMIT or self.server.complete(self.inbuf):
                    self.out = self._answer() if data or self.inbuf else b""
                    if not self.out:
                        self.close()
                        return
                    self.server.selector.modify(self.conn, selectors.EVENT_WRITE, self)
            if self.out:
                n = self.conn.send(self.out)
                self.out = self.out[n:]
                if not self.out:
                    self.close()
        except BlockingIOError:
            pass
        except OSError:
            self.close()

    def _answer(self) -> bytes:
        """The server's answer; a failure to build one is logged and ends this exchange only."""
        try:
            return self.server.answer(self.inbuf)
        except Exception:
            log.exception("cannot answer on %s", self.server.sock.getsockname() or "control socket")
            return b""

    def close(self) -> None:
        if self in self.server.sessions:
            self.server.sessions.discard(self)
            self.server.selector.unregister(self.conn)
            self.conn.close()


# --- the control socket ---------------------------------------------------------


def bind_control(path: str, owner: tuple[int, int] | None) -> tuple[socket.socket, tuple[int, int]]:
    """A Unix socket at `path`, mode 0600, owned by the user the master becomes.

    A socket left there (a crash, or the old master of an upgrade) is
    replaced; the returned identity (inode and change time: a freed inode
    is soon reused) lets the master remove only its own at exit.
    """
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    if owner is not None:
        os.chown(path, owner[0], owner[1])
    sock.listen(16)
    return sock, _identity(path)


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_ctime_ns


def unlink_control(path: str, identity: tuple[int, int]) -> None:
    try:
        if _identity(path) == identity:
            os.unlink(path)
    except OSError:
        pass


def bind_tcp(ep: Endpoint) -> socket.socket:
    family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # An upgrade's new master binds it while the old one still serves it.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((ep.host, ep.port))
    sock.listen(16)
    return sock


def http_complete(buf: bytes) -> bool:
    return b"\r\n\r\n" in buf or b"\n\n" in buf


def http_answer(scrape: Callable[[], bytes]) -> Callable[[bytes], bytes]:
    """GET /metrics: the scrape; anything else: 404 (or 405)."""

    def answer(request: bytes) -> bytes:
        line = request.split(b"\n", 1)[0].strip().split()
        if len(line) < 2:
            return _http(400, b"bad request\n")
        method, target = line[0], line[1].split(b"?", 1)[0]
        if target != b"/metrics":
            return _http(404, b"only /metrics here\n")
        if method not in (b"GET", b"HEAD"):
            return _http(405, b"GET /metrics\n")
        body = scrape()
        return _http(200, b"" if method == b"HEAD" else body, "text/plain; version=0.0.4; charset=utf-8")

    return answer


def _http(code: int, body: bytes, ctype: str = "text/plain") -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}[code]
    head = f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


# --- `transocks status` / `usocksd status` --------------------------------------------


class StatusError(Exception):
    """The daemon could not be asked; the message says why and what to do."""


def query(path: str, timeout: float = 5.0) -> dict[str, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise StatusError(f"no daemon running (nothing answers at {path}; is control_socket the daemon's?)") \
                from None
        except PermissionError:
            raise StatusError(f"permission denied on {path} (mode 0600, owner {_owner(path)}): run as root or "
                              "as the daemon's user") from None
        sock.sendall(STATUS_REQUEST)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise StatusError(f"the daemon at {path} did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise StatusError(f"cannot ask the daemon at {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        return json.loads(data)
    except ValueError:
        raise StatusError(f"the daemon at {path} gave an unreadable answer") from None


def _owner(path: str) -> str:
    try:
        uid = os.stat(path).st_uid
        return pwd.getpwuid(uid).pw_name
    except (OSError, KeyError):
        return "?"


def status_command(prog: str, argv: Sequence[str], load_config: Callable[[Sequence[str]], Any],
                   default_path: str) -> int:
    """`PROG status [--json] [SETTINGS]`: what the running master says about its workers."""
    parser = argparse.ArgumentParser(prog=f"{prog} status", allow_abbrev=False,
                                     description=f"Ask the running {prog} master (over control_socket) about its "
                                                 "workers and upstream members.",
                                     epilog="Settings are read as the daemon reads them (-c FILE, env, flags): "
                                            "--control-socket finds the daemon.")
    parser.add_argument("--json", action="store_true", help="print the master's answer as JSON")
    parser.add_argument("--control-socket", metavar="PATH", help=f"the daemon's control socket (default: the "
                        f"configuration's control_socket, else {default_path})")
    args, rest = parser.parse_known_args(list(argv))
    path = args.control_socket
    if path is None:
        try:
            path = load_config(rest).control_socket
        except (ConfigError, SystemExit):
            path = default_path  # status needs only the socket: an incomplete configuration still finds it
    if not path:
        print(f"{prog} status: control_socket is off in this configuration", file=sys.stderr)
        return 1
    try:
        status = query(path)
    except StatusError as exc:
        print(f"{prog} status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0


def format_status(s: dict[str, Any]) -> str:
    lines = [f"master {s['master']}  generation {s['generation']}  up {_age(s['uptime'])}  "
             f"workers {len(s['workers'])}  connections {s['active']} now, {s['total']} served by these workers"]
    lines.append(f"{'PID':>8} {'GEN':>4} {'SLOT':>4} {'STATE':<9} {'AGE':>8} {'CONNS':>6} {'TOTAL':>8} "
                 f"{'RSS':>8} {'FDS':>5}")
    for w in s["workers"]:
        rss = f"{w['rss'] / 1048576:.1f}M" if w["rss"] is not None else "-"
        fds = w["fds"] if w["fds"] is not None else "-"
        lines.append(f"{w['pid']:>8} {w['generation']:>4} {w['slot']:>4} {w['state']:<9} {_age(w['age']):>8} "
                     f"{w['active']:>6} {w['total']:>8} {rss:>8} {fds:>5}")
    if s.get("members"):
        lines.append("")
        lines.append(f"{'POOL':<12} {'MEMBER':<40} {'HEALTH':<14} {'CONNS':>6} {'DIALS':>8} {'FAILED':>7}  LAST ERROR")
        for m in s["members"]:
            lines.append(f"{m['pool']:<12} {m['member']:<40} {m['health']:<14} {m['active']:>6} {m['dials']:>8} "
                         f"{m['failures']:>7}  {m['last_error'] or '-'}")
    return "\n".join(lines)


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def merge_members(reports: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every worker's view of the members as one: counts summed, health "up" when all see it up."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for report in reports:
        for m in report:
            key = (m["pool"], m["member"])
            out = merged.setdefault(key, {"pool": m["pool"], "member": m["member"], "up": 0, "seen": 0,
                                          "active": 0, "dials": 0, "failures": 0, "last_error": ""})
            out["seen"] += 1
            out["up"] += 1 if m["up"] else 0
            for k in ("active", "dials", "failures"):
                out[k] += m[k]
            out["last_error"] = m["last_error"] or out["last_error"]
    for out in merged.values():
        up, seen = out.pop("up"), out.pop("seen")
        out["health"] = "up" if up == seen else "down" if up == 0 else f"up in {up}/{seen}"
    return list(merged.values())
