"""Error log and access log: stderr or files, logfmt or JSON, reopened on USR1.

The error log goes through the logging module (and writes out the access log's
pending lines before each of its own, so both read in order where they share
stderr).  The access log, one line per connection and on by default, does not: a `Logger.info` builds a LogRecord,
walks handlers, takes a lock and flushes a line-buffered file, 50-120 µs of
user CPU per connection in the bench, a large share of a short connection.
`AccessLog` formats the line itself with a timestamp cached per second,
appends it to a buffer and writes the buffer out with one write(2) at the end
of the event-loop turn (a hub callback), when it grows large, on USR1 and at
exit.  A timer of a few hundred milliseconds would batch a little more, but
lines then arrive late for `tail -f` and for anything that reads the log right
after a connection ends; under load one loop turn already ends many
connections, so the end-of-turn flush batches where batching pays.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

ACCESS_LOGGER = "transocks.access"
FLUSH_SIZE = 64 * 1024  # bytes that make a write at once
_handlers: list[_ReopenableHandler] = []


class _ReopenableHandler(logging.StreamHandler):
    """Writes to stderr ("-") or appends to a file that logrotate may move away."""

    def __init__(self, target: str) -> None:
        self.target = target
        super().__init__(self._open())

    def _open(self) -> Any:
        if self.target == "-":
            return sys.stderr
        return open(self.target, "a", encoding="utf-8", buffering=1)

    def emit(self, record: logging.LogRecord) -> None:
        flush()  # access-log lines written before this one come first, in the file and on a shared stderr
        super().emit(record)

    def reopen(self) -> None:
        if self.target == "-":
            return
        self.acquire()
        try:
            old = self.stream
            self.stream = self._open()
            old.close()
        finally:
            self.release()


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


class _ErrorFormatter(logging.Formatter):
    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc(record.created)} {self.prog}[{record.process}] {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


_NEEDS_QUOTES = re.compile(r'[\x00-\x20="\\]')  # controls, space, '=', '"', backslash


def logfmt_value(value: Any) -> str:
    """The value as is, or JSON-quoted when it is empty or holds what would break the line
    (one regex search: the per-character scan it replaced was most of a line's cost)."""
    s = str(value)
    if not s or _NEEDS_QUOTES.search(s):
        return json.dumps(s)
    return s


_logfmt_value = logfmt_value  # the name it had


class _Clock:
    """The access log's timestamp: the strftime part is made once a second."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second = -1
        self.text = ""

    def now(self) -> str:
        ts = time.time()
        second = int(ts)
        if second != self.second:
            self.second = second
            self.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.text}.{int(ts % 1 * 1000):03d}Z"


class AccessLog:
    """One line per connection, buffered; same format and fields as ever.

    The buffer is written with one `os.write` at the end of the hub's loop
    turn in which its first line was added, or at once when it reaches
    FLUSH_SIZE.  Without a running hub (tests, commands) every line is
    written at once.
    """

    def __init__(self, target: str, style: str) -> None:
        self.target = target
        self.json = style == "json"
        self.clock = _Clock()
        self.pending: list[bytes] = []
        self.size = 0
        self.fd = -1
        self.scheduled = False
        self.open()

    def open(self) -> None:
        if self.target == "-":
            self.fd = sys.stderr.fileno()
        else:
            self.fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def reopen(self) -> None:
        """USR1: write what waits, then continue in a new file of the same name.

        If the new file cannot be opened the old one stays in use and the error
        is raised for the caller to log.
        """
        self.flush()
        if self.target == "-":
            return
        old = self.fd
        self.open()
        os.close(old)

    def write(self, fields: dict[str, Any]) -> None:
        stamp = self.clock.now()
        if self.json:
            line = json.dumps({"time": stamp, **fields}, separators=(",", ":"))
        else:
            line = f"time={stamp} " + " ".join([f"{k}={logfmt_value(v)}" for k, v in fields.items()])
        self._append(line)

    def write_logfmt(self, body: str) -> None:
        """A logfmt line whose fields the caller rendered (see `rendered`)."""
        self._append(f"time={self.clock.now()} {body}")

    def _append(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "backslashreplace")
        self.pending.append(data)
        self.size += len(data)
        if self.size >= FLUSH_SIZE or not self._schedule():
            self.flush()

    def _schedule(self) -> bool:
        """Make sure a flush runs at the end of this loop turn; False without a hub."""
        if self.scheduled:
            return True
        hub = _running_hub()
        if hub is None:
            return False
        hub.loop.run_callback(self.flush)
        self.scheduled = True
        return True

    def flush(self) -> None:
        self.scheduled = False
        if not self.pending:
            return
        pending = self.pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)  # one line a turn: no join
        pending.clear()
        self.size = 0
        try:
            written = os.write(self.fd, data)
            if written < len(data):  # a full pipe or a signal: the rest, without copying it
                view = memoryview(data)[written:]
                while view:
                    view = view[os.write(self.fd, view):]
        except BlockingIOError:
            pass  # a non-blocking stderr pipe that is full: drop the rest rather than block the hub
        except OSError as exc:
            logging.getLogger("transocks").error("cannot write the access log %s: %s", self.target, exc)

    def close(self) -> None:
        self.flush()
        if self.target != "-" and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


def _running_hub() -> Any:
    """The gevent hub of this thread if one exists, without creating one."""
    gevent_hub = sys.modules.get("gevent.hub")
    if gevent_hub is None:
        return None
    return gevent_hub._get_hub()  # None when this thread has no hub yet


_access_log: AccessLog | None = None


def setup(prog: str, error_log: str = "-", level: str = "info", access_log: str = "-", access_format: str = "logfmt") -> None:
    """(Re)configure both logs; safe to call again after a reload."""
    for h in _handlers:
        h.close()
    _handlers.clear()
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = _ReopenableHandler(error_log)
    handler.setFormatter(_ErrorFormatter(prog))
    root.addHandler(handler)
    root.setLevel(level.upper())
    _handlers.append(handler)

    global _access_log
    if _access_log is not None:
        _access_log.close()
        _access_log = None
    access = logging.getLogger(ACCESS_LOGGER)  # its `disabled` tells handlers whether to build fields
    access.propagate = False
    access.disabled = access_log in ("off", "none", "")
    if not access.disabled:
        _access_log = AccessLog(access_log, access_format)


def reopen() -> None:
    """USR1: reopen every log file (after logrotate moved them).

    Every file is tried; the first failure is raised afterwards for the caller
    to log (a file that cannot be reopened stays on its old descriptor).
    """
    failure: OSError | None = None
    for reopenable in [*_handlers, *([_access_log] if _access_log else [])]:
        try:
            reopenable.reopen()
        except OSError as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


def capture_access(sink: Callable[[dict[str, Any]], None] | None) -> None:
    """Send access-log records to `sink` instead of the file (tests); None restores the file."""
    global _sink
    _sink = sink


_sink: Callable[[dict[str, Any]], None] | None = None


def flush() -> None:
    """Write out buffered access-log lines; called before a process exits."""
    if _access_log is not None:
        _access_log.flush()


atexit.register(flush)


def rendered() -> bool:
    """True when access-log lines go out as logfmt text: a caller on a hot path may then
    render its line itself with one format string (`access_logfmt`), values through
    `logfmt_value`, instead of handing over a dict (`access`) for JSON or a test's sink."""
    return _sink is None and _access_log is not None and not _access_log.json


def access_logfmt(body: str) -> None:
    """Write one access-log line rendered by the caller ("k=v k=v", no time): `rendered()` said so."""
    if _access_log is not None:
        _access_log.write_logfmt(body)


def access(fields: dict[str, Any]) -> None:
    """Write one access-log line; fields keep their order."""
    if _sink is not None:
        _sink(fields)
    elif _access_log is not None:
        _access_log.write(fields)
