"""The master: binds, forks workers, supervises them, reloads without dropping a connection.

It uses no gevent (gevent's fork and child watchers would fight our waitpid):
signals are queued by tiny handlers and woken through set_wakeup_fd, and the
main loop selects on that pipe and on the workers' control sockets.

Signals: HUP reload, TERM/INT quick stop, QUIT graceful stop, TTIN/TTOU one
worker more/fewer, USR1 reopen logs, CHLD reap (and replace).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import resource
import selectors
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

from ..core import logs
from ..core.config import ConfigError
from ..core.netutil import Endpoint
from . import worker as worker_mod
from .app import App
from .listeners import Listeners
from .notify import Notifier
from .pidfile import Pidfile, PidfileError
from .proctitle import set_title

log = logging.getLogger("transocks")

SIGNALS = {
    signal.SIGHUP: "reload",
    signal.SIGTERM: "stop",
    signal.SIGINT: "stop",
    signal.SIGQUIT: "graceful_stop",
    signal.SIGTTIN: "incr",
    signal.SIGTTOU: "decr",
    signal.SIGUSR1: "reopen",
    signal.SIGCHLD: "reap",
}
MAX_BOOT_FAILURES = 5
KILL_GRACE = 5.0
WATCH_INTERVAL = 2.0


@dataclass
class WorkerInfo:
    pid: int
    slot: int
    gen: int
    ctrl: socket.socket
    started: float
    last_beat: float
    ready: bool = False
    retiring: bool = False
    replaced: bool = False
    abort_sent: float = 0.0
    active: int = 0
    total: int = 0
    successor_of: int | None = None
    listeners: list[Endpoint] = field(default_factory=list)


class Master:
    def __init__(self, app: App, cfg: Any, argv: Sequence[str]) -> None:
        self.app = app
        self.cfg = cfg
        self.argv = list(argv)
        self.gen = 1
        self.nworkers = cfg.workers
        self.workers: dict[int, WorkerInfo] = {}
        self.listeners = Listeners(app.prepare_listener(cfg))
        self.draining: list[tuple[socket.socket, int]] = []  # removed sockets, closed when gen is gone
        self.signals: list[int] = []
        self.selector = selectors.DefaultSelector()
        self.notifier = Notifier()
        self.pidfile: Pidfile | None = None
        self.boot_failures = 0
        self.respawn_at = 0.0
        self.stopping: str | None = None
        self.stop_deadline = 0.0
        self.reloading = False
        self.prev_cfg: Any = None
        self.ready_announced = False
        self._last_title = 0.0
        self._last_watch = 0.0
        self.exit_code = 0

    def _listen(self, cfg: Any) -> list[socket.socket]:
        """Bind what cfg asks for; returns the sockets it no longer wants."""
        return self.listeners.update(self.app.listen(cfg), cfg.backlog)

    # --- start-up -----------------------------------------------------------

    def run(self) -> int:
        raise_nofile_limit()
        try:
            self._listen(self.cfg)
        except OSError as exc:
            log.error("cannot listen: %s", exc)
            return 1
        if self.cfg.pidfile:
            self.pidfile = Pidfile(self.cfg.pidfile)
            try:
                self.pidfile.create(os.getpid())
            except (PidfileError, OSError) as exc:
                log.error("%s", exc)
                self.listeners.close()
                return 1
        preload_worker_modules()
        try:
            drop_privileges(self.cfg.user, self.cfg.group)
        except (KeyError, PermissionError) as exc:
            log.error("cannot drop privileges: %s", exc)
            return 1
        self._install_signals()
        addrs = " ".join(str(ep) for ep in self.listeners.sockets)
        log.info("master %d listening on %s, %d workers", os.getpid(), addrs, self.nworkers)
        try:
            self._loop()
        finally:
            self.listeners.close()
            if self.pidfile:
                self.pidfile.unlink()
        log.info("master %d exiting", os.getpid())
        return self.exit_code

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)

    # --- main loop ----------------------------------------------------------

    def _loop(self) -> None:
        first = True
        while True:
            if not first:
                self._wait()
            first = False
            while self.signals:
                sig = self.signals.pop(0)
                getattr(self, "handle_" + SIGNALS[sig])()
            self._reap()
            if self.stopping:
                if not self.workers:
                    return
                if time.monotonic() > self.stop_deadline:
                    self._kill_all(signal.SIGKILL)
                continue
            if self.exit_code:
                self.stopping = "halt"
                self.stop_deadline = time.monotonic() + KILL_GRACE
                self._kill_all(signal.SIGTERM)
                continue
            self._manage_workers()
            self._check_timeouts()
            self._watch_resources()
            self._finish_reload()
            self._refresh_title()
            self.notifier.watchdog()

    def _wait(self) -> None:
        timeout = 0.25 if (self.stopping or self.reloading or self.respawn_at) else 1.0
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            else:
                self._read_ctrl(key.data)

    def _read_ctrl(self, w: WorkerInfo) -> None:
        while True:
            try:
                msg = w.ctrl.recv(256).decode(errors="replace")
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not msg:
                return
            w.last_beat = time.monotonic()
            if msg == "ready":
                self._worker_ready(w)
            elif msg.startswith("hb "):
                parts = msg.split()
                if len(parts) == 3:
                    w.active, w.total = int(parts[1]), int(parts[2])

    def _worker_ready(self, w: WorkerInfo) -> None:
        w.ready = True
        self.boot_failures = 0
        if w.successor_of is not None:
            old = self.workers.get(w.successor_of)
            if old is not None and not old.retiring:
                self._retire(old)
        if not self.ready_announced and self._all_ready():
            self.ready_announced = True
            self.notifier.ready(self._status())
            log.info("%d workers ready (generation %d)", self.nworkers, self.gen)

    def _current(self) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if w.gen == self.gen and not (w.retiring or w.replaced)]

    def _all_ready(self) -> bool:
        current = self._current()
        return len(current) >= self.nworkers and all(w.ready for w in current)

    # --- workers --------------------------------------------------------------

    def _manage_workers(self) -> None:
        current = self._current()
        if len(current) > self.nworkers:
            for w in sorted(current, key=lambda w: -w.slot)[: len(current) - self.nworkers]:
                self._retire(w)
            return
        if len(current) < self.nworkers:
            now = time.monotonic()
            if now < self.respawn_at:
                return
            self.respawn_at = 0.0
            used = {w.slot for w in current}
            for slot in range(1, self.nworkers + 1):
                if slot not in used:
                    self._spawn(slot)

    def _spawn(self, slot: int, successor_of: int | None = None) -> WorkerInfo | None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        parent.setblocking(False)
        child.setblocking(False)
        listeners = self.listeners.for_worker()
        try:
            pid = os.fork()
        except OSError as exc:
            log.error("fork failed: %s", exc)
            parent.close()
            child.close()
            self.respawn_at = time.monotonic() + 1.0
            return None
        if pid == 0:
            parent.close()
            self.selector.close()
            for w in self.workers.values():
                w.ctrl.close()
            for s, _ in self.draining:
                s.close()
            worker_mod.boot(self.app, self.cfg, slot, self.nworkers, self.gen, listeners, child, os.getppid())
        child.close()
        now = time.monotonic()
        w = WorkerInfo(pid, slot, self.gen, parent, now, now, successor_of=successor_of, listeners=[ep for ep, _ in listeners])
        self.workers[pid] = w
        self.selector.register(parent, selectors.EVENT_READ, w)
        log.debug("spawned worker %d (slot %d, generation %d)", pid, slot, self.gen)
        return w

    def _retire(self, w: WorkerInfo) -> None:
        """Graceful stop of one worker: it stops accepting and finishes its connections."""
        w.retiring = True
        w.abort_sent = 0.0
        w.last_beat = time.monotonic()
        self._signal(w, signal.SIGQUIT)

    def _replace(self, w: WorkerInfo, why: str) -> None:
        """Start a successor for w's slot; w is retired once the successor is ready."""
        if w.retiring or any(o.successor_of == w.pid for o in self.workers.values()):
            return
        log.warning("recycling worker %d: %s", w.pid, why)
        w.replaced = True
        self._spawn(w.slot, successor_of=w.pid)

    def _signal(self, w: WorkerInfo, sig: int) -> None:
        try:
            os.kill(w.pid, sig)
        except ProcessLookupError:
            pass

    def _kill_all(self, sig: int) -> None:
        for w in list(self.workers.values()):
            self._signal(w, sig)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            self.selector.unregister(w.ctrl)
            w.ctrl.close()
            self._worker_exited(w, status)

    def _worker_exited(self, w: WorkerInfo, status: int) -> None:
        how = describe_status(status)
        if w.retiring or self.stopping:
            log.info("worker %d (slot %d) exited: %s", w.pid, w.slot, how)
            return
        log.error("worker %d (slot %d, generation %d) died: %s", w.pid, w.slot, w.gen, how)
        if not w.ready:
            self.boot_failures += 1
            if self.boot_failures >= MAX_BOOT_FAILURES:
                if self.reloading and self.prev_cfg is not None and self._old_workers():
                    self._abandon_reload("workers of the new generation failed to boot")
                    return
                log.critical("workers failed to boot %d times in a row; exiting", self.boot_failures)
                self.exit_code = 3
                return
        delay = min(0.1 * (2 ** max(0, self.boot_failures - 1)), 10.0) if self.boot_failures else 0.0
        if delay:
            self.respawn_at = time.monotonic() + delay
        for other in self.workers.values():
            if other.successor_of == w.pid:
                other.successor_of = None

    def _check_timeouts(self) -> None:
        timeout = self.cfg.worker_timeout
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.abort_sent:
                if now - w.abort_sent > KILL_GRACE:
                    self._signal(w, signal.SIGKILL)
                continue
            if w.retiring:
                limit = (self.cfg.graceful_timeout or 0) + max(timeout, KILL_GRACE)
                if self.cfg.graceful_timeout and now - w.last_beat > limit:
                    log.error("retiring worker %d did not exit; killing it", w.pid)
                    self._signal(w, signal.SIGKILL)
                    w.abort_sent = now
                continue
            if timeout and now - w.last_beat > timeout:
                log.error("worker %d silent for %.0fs; aborting it", w.pid, now - w.last_beat)
                self._signal(w, signal.SIGABRT)
                w.abort_sent = now
                w.retiring = True

    def _watch_resources(self) -> None:
        now = time.monotonic()
        if now - self._last_watch < WATCH_INTERVAL:
            return
        self._last_watch = now
        max_rss = self.cfg.max_worker_memory
        for w in list(self.workers.values()):
            if w.retiring or w.replaced or not w.ready or w.gen != self.gen:
                continue
            try:
                p = psutil.Process(w.pid)
                rss = p.memory_info().rss
                fds = p.num_fds()
                soft = p.rlimit(psutil.RLIMIT_NOFILE)[0]
            except (psutil.Error, OSError):
                continue
            if max_rss and rss > max_rss:
                self._replace(w, f"RSS {rss >> 20} MiB exceeds max_worker_memory {max_rss >> 20} MiB")
            elif soft > 0 and fds > 0.9 * soft:
                self._replace(w, f"{fds} open fds, above 90% of its limit {soft}")

    # --- signals ----------------------------------------------------------------

    def handle_reload(self) -> None:
        self.notifier.reloading()
        log.info("reloading (HUP)")
        try:
            new = self.app.load_config(self.argv)
        except (ConfigError, SystemExit) as exc:
            log.error("reload failed, keeping generation %d: %s", self.gen, exc)
            self.notifier.ready(self._status())
            return
        except Exception as exc:  # a bug in validation must not take the master down
            log.exception("reload failed, keeping generation %d: %s", self.gen, exc)
            self.notifier.ready(self._status())
            return
        fixed = [name for name, s in new.settings.items() if not s.reload
                 and getattr(new, name) != getattr(self.cfg, name)]
        if fixed:
            log.error("reload failed, keeping generation %d: %s cannot change at a reload; restart %s",
                      self.gen, ", ".join(fixed), self.app.name)
            self.notifier.ready(self._status())
            return
        try:
            removed = self._listen(new)
        except OSError as exc:
            log.error("reload failed, keeping generation %d: cannot listen: %s", self.gen, exc)
            self.notifier.ready(self._status())
            return
        for s in removed:
            self.draining.append((s, self.gen))
        self.prev_cfg = self.cfg
        self.cfg = new
        try:
            self.app.setup_logging(new)
        except OSError as exc:
            log.error("cannot open logs: %s", exc)
        self.gen += 1
        self.nworkers = new.workers
        self.reloading = True
        self.boot_failures = 0
        old_by_slot = {w.slot: w for w in self._old_workers()}
        for slot in range(1, self.nworkers + 1):
            old = old_by_slot.get(slot)
            self._spawn(slot, successor_of=old.pid if old else None)
        log.info("generation %d starting (%d workers)", self.gen, self.nworkers)

    def _old_workers(self) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if w.gen != self.gen and not w.retiring]

    def _finish_reload(self) -> None:
        if not self.reloading or not self._all_ready():
            return
        for w in self._old_workers():
            self._retire(w)
        if any(w.gen != self.gen for w in self.workers.values()):
            return
        for s, _ in self.draining:
            s.close()
        self.draining.clear()
        self.reloading = False
        self.prev_cfg = None
        log.info("reload done: generation %d serving", self.gen)
        self.notifier.ready(self._status())

    def _abandon_reload(self, why: str) -> None:
        log.error("reload abandoned: %s; keeping generation %d", why, self.gen - 1)
        for w in list(self.workers.values()):
            if w.gen == self.gen:
                self._signal(w, signal.SIGKILL)
                w.retiring = True
        self.cfg = self.prev_cfg
        self.gen -= 1
        self.nworkers = self.cfg.workers
        for w in self.workers.values():
            if w.gen == self.gen:
                w.successor_of = None
        try:
            self._listen(self.cfg)
        except OSError as exc:
            log.critical("cannot listen again on generation %d's addresses: %s", self.gen, exc)
        self.draining.clear()
        self.reloading = False
        self.boot_failures = 0
        self.app.setup_logging(self.cfg)
        self.notifier.ready(self._status())

    def handle_stop(self) -> None:
        log.info("quick shutdown")
        self.notifier.stopping()
        self.stopping = "quick"
        self.stop_deadline = time.monotonic() + KILL_GRACE
        self._kill_all(signal.SIGTERM)

    def handle_graceful_stop(self) -> None:
        log.info("graceful shutdown (up to %gs)", self.cfg.graceful_timeout)
        self.notifier.stopping()
        self.stopping = "graceful"
        grace = self.cfg.graceful_timeout
        self.stop_deadline = time.monotonic() + grace + KILL_GRACE if grace else float("inf")
        self._kill_all(signal.SIGQUIT)

    def handle_incr(self) -> None:
        self.nworkers += 1
        log.info("TTIN: %d workers", self.nworkers)

    def handle_decr(self) -> None:
        if self.nworkers > 1:
            self.nworkers -= 1
        log.info("TTOU: %d workers", self.nworkers)

    def handle_reopen(self) -> None:
        logs.reopen()
        self._kill_all(signal.SIGUSR1)
        log.info("log files reopened")

    def handle_reap(self) -> None:
        self._reap()

    # --- status ---------------------------------------------------------------

    def _status(self) -> str:
        active = sum(w.active for w in self.workers.values())
        return f"gen={self.gen} workers={self.nworkers} conns={active}"

    def _refresh_title(self) -> None:
        now = time.monotonic()
        if now - self._last_title < 1.0:
            return
        self._last_title = now
        where = f" [{self.cfg.config_file}]" if getattr(self.cfg, "config_file", None) else ""
        active = sum(w.active for w in self.workers.values())
        total = sum(w.total for w in self.workers.values())
        set_title(f"{self.app.name}: master gen={self.gen} workers={self.nworkers} conns={active} total={total}{where}")
        if self.notifier.enabled:
            self.notifier.status(self._status())


def raise_nofile_limit() -> None:
    """Use the hard fd limit: every relayed connection costs two descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def preload_worker_modules() -> None:
    """Import what gevent loads lazily when a worker builds its hub.

    After a privilege drop the worker may no longer read the interpreter's
    files (a Python under /root, a chroot); resolving gevent's configured
    classes imports them without creating a hub in the master.
    """
    import encodings.idna  # noqa: F401  (name encoding in dialers and the resolver)

    import gevent
    import gevent.event

    for name in ("loop", "resolver", "threadpool"):
        getattr(gevent.config, name)


def drop_privileges(user: str | None, group: str | None) -> None:
    """setgid/setuid after binding, so workers never run as root."""
    if not user and not group:
        return
    gid = grp.getgrnam(group).gr_gid if group else None
    if user:
        pw = pwd.getpwnam(user)
        gid = gid if gid is not None else pw.pw_gid
        os.setgroups([])
        os.setgid(gid)
        os.setuid(pw.pw_uid)
    elif gid is not None:
        os.setgroups([])
        os.setgid(gid)


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"killed by {signal.Signals(sig).name}"
    return f"exit code {os.WEXITSTATUS(status)}"


def serve(app: App, argv: Sequence[str]) -> int:
    """Load the configuration, then run the master until it stops."""
    try:
        cfg = app.load_config(argv)
    except ConfigError as exc:
        print(f"{app.name}: error: {exc}", file=sys.stderr)
        return 2
    if cfg.check_config:
        print(f"{app.name}: configuration ok ({cfg.config_file or 'built-in defaults'})")
        return 0
    if cfg.print_config:
        print(cfg.format())
        return 0
    try:
        app.setup_logging(cfg)
    except OSError as exc:
        print(f"{app.name}: error: cannot open log: {exc}", file=sys.stderr)
        return 1
    set_title(f"{app.name}: master starting")
    return Master(app, cfg, argv).run()

