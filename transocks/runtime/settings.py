"""Settings of the pre-fork runtime, shared by every daemon built on it."""

from __future__ import annotations

import os

from ..core.config import Setting, choice, optional_str, positive_int, seconds, size
from ..core.netutil import DEFAULT_USER_TIMEOUT, Endpoint, listen_address


def optional_listen(text: str) -> Endpoint | None:
    """An ADDR:PORT to listen on, or empty/off for none."""
    text = text.strip()
    return None if text.lower() in ("", "off", "none") else listen_address(text)


def runtime_settings(default_listen: list[str], name: str = "transocks") -> list[Setting]:
    """The runtime's settings; `default_listen` and the daemon's `name` (in paths) differ per daemon."""
    return [
        Setting("listen", listen_address, [listen_address(a) for a in default_listen],
                "address to listen on, ADDR:PORT; [::]:PORT is dual stack; repeat for several",
                section="listening", multiple=True, metavar="ADDR:PORT", required=True),
        Setting("backlog", positive_int, 1024, "accept queue length of each listening socket; changes only with a restart",
                section="listening", metavar="N", reload=False),
        Setting("tcp_user_timeout", seconds, DEFAULT_USER_TIMEOUT,
                "reset a connection whose sent data stays unacknowledged this long (TCP_USER_TIMEOUT, both sockets "
                "of a relay): a peer that vanished mid-transfer is let go; 0 leaves it to the kernel (~15 min)",
                section="listening", metavar="SECONDS"),
        Setting("workers", positive_int, os.cpu_count() or 1, "number of worker processes", section="processes", metavar="N"),
        Setting("max_connections", positive_int, 10000, "connections one worker serves at once; more wait in the accept queue",
                section="processes", metavar="N"),
        Setting("graceful_timeout", seconds, 30.0, "how long a stopping worker may finish its connections (QUIT, HUP, recycling); 0 waits for all of them",
                section="processes", metavar="SECONDS"),
        Setting("worker_timeout", seconds, 30.0, "a worker silent for this long is killed (ABRT, then KILL) and replaced",
                section="processes", metavar="SECONDS"),
        Setting("max_worker_memory", size, 0, "recycle a worker whose RSS exceeds this (successor first); 0 disables",
                section="processes", metavar="BYTES"),
        Setting("pidfile", optional_str, None, "write the master's PID to this file; changes only with a restart",
                section="processes", metavar="FILE", reload=False),
        Setting("user", optional_str, None, "drop privileges to this user after binding; changes only with a restart", section="processes", reload=False),
        Setting("group", optional_str, None, "drop privileges to this group after binding; changes only with a restart", section="processes", reload=False),
        Setting("control_socket", optional_str, f"/run/{name}/control.sock",
                f"Unix socket (mode 0600) where the master answers `{name} status`; empty disables; "
                "changes only with a restart", section="operation", metavar="PATH", reload=False),
        Setting("metrics_listen", optional_listen, None,
                "serve Prometheus metrics at http://ADDR:PORT/metrics (all workers summed), e.g. 127.0.0.1:9120; "
                "off by default; changes only with a restart", section="operation", metavar="ADDR:PORT", reload=False),
        Setting("error_log", str, "-", "error log file; - is stderr", section="logging", metavar="FILE"),
        Setting("log_level", choice("debug", "info", "warning", "error"), "info", "error log level", section="logging", metavar="LEVEL"),
        Setting("access_log", str, "-", "access log file (one line per connection); - is stderr, off disables",
                section="logging", metavar="FILE"),
        Setting("access_log_format", choice("logfmt", "json"), "logfmt", "access log format: logfmt or json", section="logging",
                metavar="FORMAT"),
    ]
