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

    def create(self, pid: int, owner: tuple[int, int] | None = None) -> None:
        """Write `pid`; `owner` (uid, gid) is who the master becomes after dropping
        privileges, so that it can still empty the file at exit."""
        old = self._read()
        if old and old != pid and psutil.pid_exists(old):
            raise PidfileError(f"pidfile {self.path} names running process {old}")
        tmp = f"{self.path}.{pid}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{pid}\n")
            if owner is not None:
                os.fchown(f.fileno(), *owner)
        os.replace(tmp, self.path)
        self.pid = pid

    def rename(self, path: str) -> None:
        """Move the file (an upgrade's old master keeps it as .oldbin)."""
        os.replace(self.path, path)
        self.path = path

    def unlink(self) -> None:
        """Remove the file if it is still ours.  A master that dropped privileges
        may not remove it from a root-owned directory: it empties it instead, so
        a later process reusing the pid cannot block the next start."""
        if self.pid is None or self._read() != self.pid:
            return
        try:
            os.unlink(self.path)
        except PermissionError:
            try:
                with open(self.path, "w"):
                    pass
            except OSError:
                pass
        except OSError:
            pass

    def _read(self) -> int | None:
        try:
            with open(self.path) as f:
                return int(f.read().strip() or 0) or None
        except (OSError, ValueError):
            return None
