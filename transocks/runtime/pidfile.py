"""A pidfile that refuses to start over a live daemon and is removed on exit."""

from __future__ import annotations

import os

import psutil


class PidfileError(Exception):
    pass


class Pidfile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.pid: int | None = None

    def create(self, pid: int) -> None:
        old = self._read()
        if old and old != pid and psutil.pid_exists(old):
            raise PidfileError(f"pidfile {self.path} names running process {old}")
        tmp = f"{self.path}.{pid}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{pid}\n")
        os.replace(tmp, self.path)
        self.pid = pid

    def unlink(self) -> None:
        if self.pid is not None and self._read() == self.pid:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _read(self) -> int | None:
        try:
            with open(self.path) as f:
                return int(f.read().strip() or 0) or None
        except (OSError, ValueError):
            return None
