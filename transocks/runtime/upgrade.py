"""USR2: upgrade in place by re-executing the installed program as a new master.

The old master forks and execs the command line it was started with (so the
newly installed package is what runs), handing over its listening sockets by
descriptor number in the environment, as gunicorn does.  The sockets, not new
ones, are what the new master's workers accept on: their queues are never
closed, so nothing is lost in between.  The new master writes the pidfile
(the old one renamed it to ``.oldbin``, as nginx does) and, once its workers
serve, says "ready" through a pipe; the old master then tells systemd
MAINPID=<new>, drains its own workers like a QUIT and exits.  The new master
takes the control socket only then, so that `status` reaches whichever serves.
If the new master exits (or stays silent for UPGRADE_TIMEOUT) first, the old
one takes its pidfile back and keeps serving, control socket and all.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import sys
import time
from typing import Any

from ..core.netutil import listen_address
from .listeners import Groups

log = logging.getLogger("transocks")

ENV_SOCKETS = "TRANSOCKS_UPGRADE_SOCKETS"  # "fd=addr,fd=addr": an address once per socket of its group
ENV_DATAGRAMS = "TRANSOCKS_UPGRADE_DATAGRAMS"  # the same for the UDP sockets
ENV_PIPE = "TRANSOCKS_UPGRADE_PIPE"  # fd the new master writes "ready" to
ENV_FROM = "TRANSOCKS_UPGRADE_FROM"  # the old master's pid
UPGRADE_TIMEOUT = 60.0
OLDBIN = ".oldbin"


class UpgradeState(enum.Enum):
    STARTING = "starting"  # new master forked, not ready yet
    HANDED_OVER = "handed over"  # it serves; this master drains and exits
    FAILED = "failed"  # it died or timed out; this master keeps serving


class Upgrade:
    """The old master's side: one new master being started."""

    def __init__(self, pid: int, pipe_r: int) -> None:
        self.pid = pid
        self.pipe_r = pipe_r
        self.started = time.monotonic()
        self.state = UpgradeState.STARTING

    @classmethod
    def spawn(cls, sockets: Groups, env_extra: dict[str, str], cwd: str, datagrams: Groups | None = None) -> Upgrade:
        """Fork and exec the original command line with the sockets inherited."""
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.fork()
        except OSError:
            os.close(r)
            os.close(w)
            raise
        if pid == 0:
            try:
                os.close(r)
                os.set_inheritable(w, True)
                datagrams = datagrams or {}
                for group in [*sockets.values(), *datagrams.values()]:
                    for s in group:
                        s.set_inheritable(True)
                env = dict(os.environ, **env_extra)
                env[ENV_SOCKETS] = _spec(sockets)
                env[ENV_DATAGRAMS] = _spec(datagrams)
                env[ENV_PIPE] = str(w)
                env[ENV_FROM] = str(os.getppid())
                if "WATCHDOG_USEC" in env:
                    env["WATCHDOG_PID"] = str(os.getpid())  # exec keeps the pid
                signal_mask_clear()
                os.chdir(cwd)
                argv = [sys.executable, *sys.orig_argv[1:]]
                os.execve(sys.executable, argv, env)
            except BaseException as exc:  # noqa: BLE001 - nothing may return into the old master's code
                try:
                    os.write(2, f"upgrade: cannot exec {sys.executable}: {exc}\n".encode())
                finally:
                    os._exit(127)
        os.close(w)
        return cls(pid, r)

    def read(self) -> bool:
        """The pipe is readable: True when the new master said it serves."""
        try:
            data = os.read(self.pipe_r, 64)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        return data.startswith(b"ready")

    def close(self) -> None:
        if self.pipe_r >= 0:
            os.close(self.pipe_r)
            self.pipe_r = -1


def signal_mask_clear() -> None:
    """exec keeps blocked signals: the new master must start with none."""
    import signal

    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _spec(groups: Groups) -> str:
    return ",".join(f"{s.fileno()}={ep}" for ep, group in groups.items() for s in group)


def _adopt(spec: str) -> Groups:
    sockets: Groups = {}
    for item in filter(None, spec.split(",")):
        fd, _, addr = item.partition("=")
        s = socket.socket(fileno=int(fd))
        s.setblocking(False)
        s.set_inheritable(True)
        sockets.setdefault(listen_address(addr), []).append(s)
    return sockets


def inherited_datagrams() -> Groups:
    """The new master's side: the UDP sockets by address, from the environment."""
    return _adopt(os.environ.pop(ENV_DATAGRAMS, ""))


def inherited() -> tuple[Groups, int | None, int | None]:
    """The new master's side: (sockets by address, ready pipe fd, old master pid), from the environment."""
    sockets = _adopt(os.environ.pop(ENV_SOCKETS, ""))
    pipe = os.environ.pop(ENV_PIPE, "")
    old = os.environ.pop(ENV_FROM, "")
    pipe_fd = int(pipe) if pipe.isdigit() else None
    if pipe_fd is not None:
        os.set_inheritable(pipe_fd, False)
    return sockets, pipe_fd, int(old) if old.isdigit() else None


def announce_ready(pipe_fd: int) -> None:
    try:
        os.write(pipe_fd, b"ready")
    except OSError as exc:
        log.warning("upgrade: cannot tell the old master we serve: %s", exc)
    finally:
        os.close(pipe_fd)


def notify_socket_env(addr: str | None) -> dict[str, Any]:
    """NOTIFY_SOCKET as systemd gave it (the Notifier removed it from the environment)."""
    if not addr:
        return {}
    return {"NOTIFY_SOCKET": "@" + addr[1:] if addr.startswith("\0") else addr}
