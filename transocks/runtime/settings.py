"""Settings of the pre-fork runtime, shared by every daemon built on it."""

from __future__ import annotations

import os

from ..core.config import Setting, choice, optional_str, positive_int, seconds, size
from ..core.netutil import listen_address


def runtime_settings(default_listen: list[str]) -> list[Setting]:
    """The runtime's settings; `default_listen` differs per daemon."""
    return [
        Setting("listen", listen_address, [listen_address(a) for a in default_listen],
                "address to listen on, ADDR:PORT; [::]:PORT is dual stack; repeat for several",
                section="listening", multiple=True, metavar="ADDR:PORT"),
        Setting("backlog", positive_int, 1024, "accept queue length of each listening socket", section="listening", metavar="N"),
        Setting("workers", positive_int, os.cpu_count() or 1, "number of worker processes", section="processes", metavar="N"),
        Setting("max_connections", positive_int, 10000, "connections one worker serves at once; more wait in the accept queue",
                section="processes", metavar="N"),
        Setting("graceful_timeout", seconds, 30.0, "how long a stopping worker may finish its connections (QUIT, HUP, recycling); 0 waits for all of them",
                section="processes", metavar="SECONDS"),
        Setting("worker_timeout", seconds, 30.0, "a worker silent for this long is killed (ABRT, then KILL) and replaced",
                section="processes", metavar="SECONDS"),
        Setting("max_worker_memory", size, 0, "recycle a worker whose RSS exceeds this (successor first); 0 disables",
                section="processes", metavar="BYTES"),
        Setting("pidfile", optional_str, None, "write the master's PID to this file", section="processes", metavar="FILE"),
        Setting("user", optional_str, None, "drop privileges to this user after binding", section="processes", reload=False),
        Setting("group", optional_str, None, "drop privileges to this group after binding", section="processes", reload=False),
        Setting("error_log", str, "-", "error log file; - is stderr", section="logging", metavar="FILE"),
        Setting("log_level", choice("debug", "info", "warning", "error"), "info", "error log level", section="logging", metavar="LEVEL"),
        Setting("access_log", str, "-", "access log file (one line per connection); - is stderr, off disables",
                section="logging", metavar="FILE"),
        Setting("access_log_format", choice("logfmt", "json"), "logfmt", "access log format: logfmt or json", section="logging",
                metavar="FORMAT"),
    ]
