"""systemd notify protocol (sd_notify) without a library: one datagram per state."""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """Sends READY=1, RELOADING=1, STOPPING=1, STATUS=, WATCHDOG=1 when NOTIFY_SOCKET is set."""

    def __init__(self) -> None:
        addr = os.environ.get("NOTIFY_SOCKET")
        if addr and addr.startswith("@"):
            addr = "\0" + addr[1:]
        self.addr = addr
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_interval = 0.0
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._last_watchdog = 0.0
        # Workers must not talk to systemd as if they were the main process.
        os.environ.pop("NOTIFY_SOCKET", None)

    @property
    def enabled(self) -> bool:
        return bool(self.addr)

    def send(self, *lines: str) -> None:
        if not self.addr:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto("\n".join(lines).encode(), self.addr)
        except OSError:
            pass

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        if self.watchdog_interval and time.monotonic() - self._last_watchdog >= self.watchdog_interval:
            self._last_watchdog = time.monotonic()
            self.send("WATCHDOG=1")
