"""Error log and access log: stderr or files, logfmt or JSON, reopened on USR1."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

ACCESS_LOGGER = "transocks.access"
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


def _logfmt_value(value: Any) -> str:
    s = str(value)
    if s == "" or any(c in s for c in ' ="\\') or any(ord(c) < 32 for c in s):
        return json.dumps(s)
    return s


class _AccessFormatter(logging.Formatter):
    def __init__(self, style: str) -> None:
        super().__init__()
        self.json = style == "json"

    def format(self, record: logging.LogRecord) -> str:
        fields = {"time": _utc(record.created)}
        fields.update(record.args if isinstance(record.args, dict) else {})
        if self.json:
            return json.dumps(fields, separators=(",", ":"))
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in fields.items())


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

    access = logging.getLogger(ACCESS_LOGGER)
    for h in list(access.handlers):
        access.removeHandler(h)
    access.propagate = False
    if access_log in ("off", "none", ""):
        access.disabled = True
        return
    access.disabled = False
    access.setLevel(logging.INFO)
    ah = _ReopenableHandler(access_log)
    ah.setFormatter(_AccessFormatter(access_format))
    access.addHandler(ah)
    _handlers.append(ah)


def reopen() -> None:
    """USR1: reopen every log file (after logrotate moved them)."""
    for h in _handlers:
        h.reopen()


def access(fields: dict[str, Any]) -> None:
    """Write one access-log line; fields keep their order."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not logger.disabled:
        logger.info("", fields)
