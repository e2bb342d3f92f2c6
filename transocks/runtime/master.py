"""The master: binds, forks workers, supervises them, reloads without dropping a connection.

It uses no gevent (gevent's fork and child watchers would fight our waitpid):
signals are queued by tiny handlers and woken through set_wakeup_fd, and the
main loop selects on that pipe and on the workers' control sockets.

Signals: HUP reload, TERM/INT quick stop, QUIT graceful stop, TTIN/TTOU one
worker more/fewer, USR1 reopen logs, USR2 upgrade, CHLD reap (and replace).
Who serves is decided by the generation and worker states of `generation`.
"""

from __future__ import annotations

import enum
import grp
import json
import logging
import os
import pwd
import resource
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil

from ..core import logs
from ..core.config import ConfigError
from ..core.netutil import Endpoint
from . import capabilities, control, heartbeat, upgrade
from . import metrics as metrics_mod
from . import worker as worker_mod
from .app import App
from .generation import Generation, GenerationState, Worker, WorkerState
from .listeners import (
    Groups,
    Listeners,
    activate,
    check_not_served,
    exclusive,
    held,
    per_slot_mode,
    slot_sockets,
)
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
    signal.SIGUSR2: "upgrade",
    signal.SIGCHLD: "reap",
}
IGNORED_WHILE_STOPPING = {signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR2}
MAX_BOOT_FAILURES = 5
SETTLE = 10.0  # a worker that dies sooner after saying ready failed its boot (a crash loop is backed off)
SPAWN_RETRY = 1.0  # after a failed fork, socketpair or pipe (out of processes or descriptors)
KILL_GRACE = 5.0
WATCH_INTERVAL = 2.0
FDS_PER_CONNECTION = 4  # at most: client, upstream and a splice pipe's two ends


class Stop(enum.Enum):
    QUICK = "quick"  # TERM/INT: workers reset their connections and exit
    GRACEFUL = "graceful"  # QUIT: workers finish their connections (graceful_timeout)
    HALT = "halt"  # the master gave up (workers cannot boot)


class Master:
    def __init__(self, app: App, cfg: Any, argv: Sequence[str]) -> None:
        self.app = app
        self.argv = list(argv)
        self.listeners = Listeners(app.prepare_listener(cfg))
        self.datagrams = Listeners(_datagram_hook(app, "prepare_datagram", cfg), datagram=True)  # the app's UDP
        self.per_slot = False  # one listening socket per address and worker slot (see listeners); fixed at start
        self.serving = Generation(1, cfg, {}, cfg.workers, GenerationState.STARTING)
        self.starting: Generation | None = None  # a reload's generation, booting beside `serving`
        self.retiring: list[Generation] = []  # replaced or abandoned, until their workers are gone
        self.workers: dict[int, Worker] = {}  # every live worker, by pid
        self.signals: list[int] = []
        self.selector = selectors.DefaultSelector()
        self.notifier = Notifier()
        self.pidfile: Pidfile | None = None
        self.stopping: Stop | None = None
        self.stop_deadline = 0.0
        self.ready_announced = False
        self._last_title = 0.0
        self._last_watch = 0.0
        self._step_failed: dict[str, float] = {}  # loop step -> when its failure was last logged
        self.exit_code = 0
        self.cwd = os.getcwd()  # an upgrade re-executes the command line from here
        self.upgrade: upgrade.Upgrade | None = None  # a new master this one is starting (USR2)
        self.upgrade_pipe: int | None = None  # we are that new master: tell the old one when we serve
        self.servers: list[control.Server] = []  # the control socket and /metrics, on our selector
        self.control: tuple[str, tuple[int, int]] | None = None  # its path and identity: remove only ours at exit
        self.metrics: metrics_mod.MasterMetrics | None = None
        self.started = time.monotonic()

    @property
    def cfg(self) -> Any:
        """The configuration in force: the newest generation's (logging follows it)."""
        return (self.starting or self.serving).cfg

    @property
    def generations(self) -> list[Generation]:
        return [self.serving, *([self.starting] if self.starting else []), *self.retiring]

    def _take_sockets(self, cfg: Any, nworkers: int) -> Groups:
        return self.listeners.take(self.app.listen(cfg), getattr(cfg, "tcp_user_timeout", 0.0),
                                   nworkers if self.per_slot else 1)

    def _take_datagrams(self, cfg: Any, nworkers: int) -> Groups:
        """The app's UDP sockets (`listen_datagram`), always one per slot: a flow stays on one worker."""
        return self.datagrams.take(_datagram_hook(self.app, "listen_datagram", cfg) or [], per_address=nworkers)

    def _release_sockets(self) -> None:
        """Close the master's copy of every socket no slot of a starting or serving generation uses."""
        gens = [g for g in (self.serving, self.starting) if g is not None]
        keep = [s for g in gens for s in held(g.sockets, g.nworkers)]
        for ep in self.listeners.release(keep):
            log.info("closed listener %s (retiring workers accept what it has queued)", ep)
        for ep in self.datagrams.release([s for g in gens for s in held(g.datagrams, g.nworkers)]):
            log.info("closed udp sockets of %s", ep)

    # --- start-up -----------------------------------------------------------

    def run(self) -> int:
        raise_nofile_limit()
        os.environ.pop(metrics_mod.ENV, None)  # an upgrade's old master's directory: never ours
        sockets, self.upgrade_pipe, old_master = upgrade.inherited()
        for ep, group in sockets.items():
            self.listeners.adopt(ep, group)
        for ep, group in upgrade.inherited_datagrams().items():
            self.datagrams.adopt(ep, group)
        allowed = {os.getpid()}
        if old_master is not None:
            log.info("upgrading master %d: %d listening sockets inherited", old_master, len(sockets))
            allowed |= {old_master, *_children(old_master)}
        self.per_slot, why = per_slot_mode()
        log.info("listening sockets: %s (%s)", "one per worker slot" if self.per_slot else "one shared by the workers",
                 why)
        try:
            self.serving.sockets = self._take_sockets(self.serving.cfg, self.serving.nworkers)
            self.serving.datagrams = self._take_datagrams(self.serving.cfg, self.serving.nworkers)
            self._release_sockets()  # inherited ones this configuration no longer wants
            check_not_served(self.serving.sockets, allowed)
            for sock in held(self.serving.sockets, self.serving.nworkers):
                # Nothing competes with the first generation: connections wait in the queue while it boots.
                activate(sock, self.serving.cfg.backlog)
        except OSError as exc:
            log.error("cannot listen: %s", exc)
            self.listeners.close()
            self.datagrams.close()
            return 1
        try:
            if not self._start():
                return 1
            addrs = " ".join(str(ep) for ep in self.serving.sockets)
            log.info("master %d listening on %s, %d workers", os.getpid(), addrs, self.serving.nworkers)
            self.serving.move(GenerationState.SERVING)
            self._loop()
        finally:
            # A start that failed half-way removes what it created, like a stop.
            self.listeners.close()
            self.datagrams.close()
            if self.pidfile:
                self.pidfile.unlink()
            self._close_operator_sockets()
        log.info("master %d exiting", os.getpid())
        return self.exit_code

    def _start(self) -> bool:
        """Pidfile, control socket and /metrics, privilege drop, signals; False (logged) when one fails."""
        if self.cfg.pidfile:
            pidfile = Pidfile(self.cfg.pidfile)
            try:
                target = privilege_target(self.cfg.user, self.cfg.group)
                pidfile.create(os.getpid(), target and (target[0], target[1]))
            except (PidfileError, OSError, KeyError) as exc:
                log.error("%s", exc)
                return False
            self.pidfile = pidfile
        preload_worker_modules()
        try:
            operator = self._bind_operator_sockets()
            drop_privileges(self.cfg.user, self.cfg.group,
                            tuple(_datagram_hook(self.app, "worker_capabilities", self.cfg) or ()))
        except (KeyError, PermissionError) as exc:
            log.error("cannot drop privileges: %s", exc)
            return False
        except OSError as exc:
            log.error("cannot listen for metrics: %s", exc)
            return False
        try:
            self._serve_operator_sockets(*operator)
            self._install_signals()
        except OSError as exc:
            log.error("cannot start: %s", exc)
            return False
        return True

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
                self._guarded("waiting", self._wait)
            first = False
            while self.signals:
                self._dispatch(self.signals.pop(0))
            self._guarded("reaping", self._reap)
            if self.stopping:
                if not self.workers:
                    return
                if time.monotonic() > self.stop_deadline:
                    self._guarded("killing", self._kill_all, signal.SIGKILL)
                continue
            if self.exit_code:
                self.stopping = Stop.HALT
                self.stop_deadline = time.monotonic() + KILL_GRACE
                self._guarded("stopping", self._kill_all, signal.SIGTERM)
                continue
            for gen in (self.serving, self.starting):
                if gen is not None:
                    self._guarded("supervising", self._supervise, gen)
            self._guarded("checking timeouts", self._check_timeouts)
            self._guarded("watching resources", self._watch_resources)
            self._guarded("promoting", self._promote)
            self._guarded("checking the upgrade", self._check_upgrade)
            self.retiring = [g for g in self.retiring if g.workers]
            self._guarded("setting the title", self._refresh_title)
            self._guarded("notifying", self.notifier.watchdog)
            for server in self.servers:
                self._guarded("expiring sessions", server.expire, time.monotonic())

    def _guarded(self, step: str, fn: Callable[..., None], *args: Any) -> None:
        """One step of the loop: a failure is logged (once a minute per step) and the master serves on."""
        try:
            fn(*args)
        except Exception:
            now = time.monotonic()
            if now - self._step_failed.get(step, -60.0) >= 60.0:
                self._step_failed[step] = now
                log.exception("master: %s failed; still serving", step)

    def _dispatch(self, sig: int) -> None:
        """Run one signal's handler; a failing handler is logged and the master keeps serving."""
        name = signal.Signals(sig).name
        if self.stopping and sig in IGNORED_WHILE_STOPPING:
            log.warning("%s ignored: shutting down", name)
            return
        try:
            getattr(self, "handle_" + SIGNALS[sig])()
        except Exception:
            log.exception("handling %s failed; still serving", name)

    def _wait(self) -> None:
        busy = self.stopping or self.starting or any(g.respawn_at for g in self.generations)
        try:
            events = self.selector.select(0.25 if busy else 1.0)
        except OSError:
            time.sleep(0.25)  # a loop that cannot wait must not spin
            raise
        for key, mask in events:
            self._guarded("reading events", self._on_event, key, mask)

    def _on_event(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data is None:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        elif isinstance(key.data, upgrade.Upgrade):
            self._upgrade_readable(key.data)
        elif isinstance(key.data, control.Served):
            key.data.on_event(mask)
        else:
            self._read_ctrl(key.data)

    def _read_ctrl(self, w: Worker) -> None:
        """Everything the worker sent (see `heartbeat`): any datagram shows it alive."""
        while True:
            try:
                msg = w.ctrl.recv(heartbeat.MAX_DATAGRAM)
            except OSError:
                return
            if not msg:
                return
            w.last_beat = time.monotonic()
            if msg == heartbeat.READY:
                self._worker_ready(w)
            elif msg.startswith(heartbeat.MEMBERS):
                heartbeat.apply(w.members, msg[len(heartbeat.MEMBERS):])
            elif msg.startswith(heartbeat.BEAT):
                parts = msg.split()
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    w.active, w.total = int(parts[1]), int(parts[2])

    def _worker_ready(self, w: Worker) -> None:
        if w.state is not WorkerState.BOOTING:
            return  # told to retire while booting: it accepts what is queued and leaves
        w.move(WorkerState.SERVING)
        gen = w.generation
        gen.respawn_at = 0.0  # boot failures are forgotten once it has served SETTLE seconds (_supervise)
        if gen is self.serving:
            for old in gen.occupants(w.slot):
                if old is not w:
                    self._retire(old)  # recycled: the successor serves now
        if not self.ready_announced and self.serving.all_serving():
            self.ready_announced = True
            self.notifier.ready(self._status())
            log.info("%d workers ready (generation %d)", self.serving.nworkers, self.serving.number)
            if self.upgrade_pipe is not None:
                ctrl_sock = self._bind_control()  # the old master's, from now on ours
                if ctrl_sock is not None:
                    self._serve_control(ctrl_sock)
                upgrade.announce_ready(self.upgrade_pipe)
                self.upgrade_pipe = None

    # --- workers --------------------------------------------------------------

    def _supervise(self, gen: Generation) -> None:
        """Keep one worker per slot: spawn into empty slots, retire those beyond nworkers."""
        for w in gen.surplus():
            self._retire(w)
        if gen.boot_failures and gen.steady_since(gen.failed_at, SETTLE):
            gen.boot_failures = 0
        empty = gen.empty_slots()
        if not empty or time.monotonic() < gen.respawn_at:
            return
        gen.respawn_at = 0.0
        for slot in empty:
            self._spawn(gen, slot)

    def _spawn(self, gen: Generation, slot: int) -> Worker | None:
        try:
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError as exc:
            self._spawn_failed(gen, "socketpair", exc)
            return None
        parent.setblocking(False)
        child.setblocking(False)
        listeners = slot_sockets(gen.sockets, slot)
        datagrams = slot_sockets(gen.datagrams, slot)
        burst = exclusive(gen.sockets, gen.nworkers)
        # Signals wait until the child has its own handlers (the worker unblocks them).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            parent.close()
            child.close()
            self._spawn_failed(gen, "fork", exc)
            return None
        if pid == 0:
            self._in_child(listeners + datagrams, parent)
            worker_mod.boot(self.app, gen.cfg, slot, gen.nworkers, gen.number, listeners, child, os.getppid(),
                            unblock=set(SIGNALS) - set(blocked), burst=burst, datagrams=datagrams)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.close()
        w = Worker(pid, slot, gen, parent, time.monotonic())
        gen.workers[pid] = w
        self.workers[pid] = w
        try:
            self.selector.register(parent, selectors.EVENT_READ, w)
        except OSError as exc:  # unheard, it is aborted after worker_timeout and replaced
            log.error("cannot watch worker %d: %s", pid, exc)
        log.debug("spawned worker %d (slot %d, generation %d)", pid, slot, gen.number)
        return w

    def _spawn_failed(self, gen: Generation, what: str, exc: OSError) -> None:
        """Out of processes or descriptors: try again in a while, serving on meanwhile."""
        log.error("cannot start a worker: %s failed: %s; retrying in %gs", what, exc.strerror or exc, SPAWN_RETRY)
        gen.respawn_at = time.monotonic() + SPAWN_RETRY

    def _in_child(self, listeners: list[tuple[Endpoint, socket.socket]], parent: socket.socket) -> None:
        """Right after fork: drop what only the master uses, and every socket but the slot's own.

        A copy of another slot's socket kept here would keep that socket open
        after the master closed it for a TTOU, with a queue nobody serves."""
        parent.close()
        self.selector.close()
        for w in self.workers.values():
            w.ctrl.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        for server in self.servers:
            server.abandon()
        for fd in (self.upgrade_pipe, self.upgrade.pipe_r if self.upgrade else None):
            if fd is not None and fd >= 0:
                os.close(fd)
        mine = {id(s) for _, s in listeners}
        for s in self.listeners.all() + self.datagrams.all():
            if id(s) not in mine:
                s.close()

    def _retire(self, w: Worker) -> None:
        """Graceful stop of one worker: it accepts what is queued, then finishes its connections."""
        if w.state in (WorkerState.BOOTING, WorkerState.SERVING):
            w.move(WorkerState.RETIRING)
            self._signal(w, signal.SIGQUIT)

    def _kill(self, w: Worker, sig: int) -> None:
        if w.state is not WorkerState.KILLED:
            w.move(WorkerState.KILLED)
        self._signal(w, sig)

    def _signal(self, w: Worker, sig: int) -> None:
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
                if self.upgrade is not None and pid == self.upgrade.pid:
                    self._upgrade_exited(status)
                continue
            w.generation.workers.pop(pid, None)
            try:
                self.selector.unregister(w.ctrl)
            except (KeyError, ValueError):
                pass  # never registered (see _spawn)
            w.ctrl.close()
            was = w.state
            w.move(WorkerState.GONE)
            self._worker_exited(w, was, status)
            if self.metrics:
                self._guarded("merging a worker's metrics", self.metrics.worker_gone, pid)

    def _worker_exited(self, w: Worker, was: WorkerState, status: int) -> None:
        how = describe_status(status)
        gen = w.generation
        if self.stopping or was in (WorkerState.RETIRING, WorkerState.KILLED) or gen.state is GenerationState.RETIRING:
            log.info("worker %d (slot %d) exited: %s", w.pid, w.slot, how)
            return
        self._count_restart("died")
        now = time.monotonic()
        if was is WorkerState.SERVING and now - w.since >= SETTLE:
            log.error("worker %d (slot %d, generation %d) died: %s", w.pid, w.slot, gen.number, how)
            return  # its slot is empty: supervision spawns a successor at once
        if was is WorkerState.SERVING:
            log.error("worker %d (slot %d, generation %d) died: %s, %.1fs after it said ready (counted as a "
                      "boot failure)", w.pid, w.slot, gen.number, how, now - w.since)
        else:
            log.error("worker %d (slot %d, generation %d) died: %s, while booting", w.pid, w.slot, gen.number, how)
        gen.boot_failures += 1
        gen.failed_at = now
        if gen.boot_failures < MAX_BOOT_FAILURES:
            gen.respawn_at = time.monotonic() + min(0.1 * 2 ** (gen.boot_failures - 1), 10.0)
            return
        if gen is self.starting:
            self._abandon_reload("workers of the new generation failed to boot")
        elif gen.serving_count():
            log.critical("workers failed to boot %d times in a row; %d workers keep serving",
                         gen.boot_failures, gen.serving_count())
            gen.respawn_at = time.monotonic() + 10.0
        else:
            log.critical("workers failed to boot %d times in a row; exiting", gen.boot_failures)
            self.exit_code = 3

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for w in list(self.workers.values()):
            cfg = w.generation.cfg
            timeout = cfg.worker_timeout
            if w.state is WorkerState.KILLED:
                if now - w.since > KILL_GRACE:
                    self._signal(w, signal.SIGKILL)
            elif timeout and now - w.last_beat > timeout:
                log.error("worker %d silent for %.0fs; aborting it", w.pid, now - w.last_beat)
                self._count_restart("hung")
                self._kill(w, signal.SIGABRT)
            elif w.state is WorkerState.RETIRING and cfg.graceful_timeout and \
                    now - w.since > cfg.graceful_timeout + max(timeout, KILL_GRACE):
                log.error("retiring worker %d did not exit; killing it", w.pid)
                self._kill(w, signal.SIGKILL)

    def _watch_resources(self) -> None:
        now = time.monotonic()
        if now - self._last_watch < WATCH_INTERVAL:
            return
        self._last_watch = now
        gen = self.serving
        max_rss = gen.cfg.max_worker_memory
        for w in list(gen.workers.values()):
            if w.state is not WorkerState.SERVING or gen.recycling(w.slot) or now < gen.respawn_at:
                continue
            try:
                p = psutil.Process(w.pid)
                rss = p.memory_info().rss
                fds = p.num_fds()
                soft = p.rlimit(psutil.RLIMIT_NOFILE)[0]
            except (psutil.Error, OSError):
                continue
            if max_rss and rss > max_rss:
                self._recycle(w, f"RSS {rss >> 20} MiB exceeds max_worker_memory {max_rss >> 20} MiB")
            elif soft > 0 and fds > 0.9 * soft and fds - FDS_PER_CONNECTION * w.active > soft // 2:
                # Only a leak: descriptors its connections hold would hold the successor's too
                # (same limit), and recycling it every watch was a respawn loop.
                self._recycle(w, f"{fds} open fds, above 90% of its limit {soft}, for {w.active} connections")

    def _recycle(self, w: Worker, why: str) -> None:
        """Boot a successor in w's slot; w keeps serving (and being supervised) until it is ready."""
        log.warning("recycling worker %d: %s", w.pid, why)
        self._count_restart("recycled")
        self._spawn(w.generation, w.slot)

    # --- reload -----------------------------------------------------------------

    def handle_reload(self) -> None:
        ok = self._reload()
        if self.metrics:
            self.metrics.reloads.labels("ok" if ok else "failed").inc()

    def _reload(self) -> bool:
        """Start a generation with the configuration read again; False when it cannot be."""
        self.notifier.reloading()
        log.info("reloading (HUP)")
        number = self.serving.number
        try:
            new = self.app.load_config(self.argv)
        except (ConfigError, SystemExit) as exc:
            log.error("reload failed, keeping generation %d: %s", number, exc)
            self.notifier.ready(self._status())
            return False
        except Exception as exc:  # a bug in validation must not take the master down
            log.exception("reload failed, keeping generation %d: %s", number, exc)
            self.notifier.ready(self._status())
            return False
        fixed = [name for name, s in new.settings.items() if not s.reload
                 and getattr(new, name) != getattr(self.cfg, name)]
        if fixed:
            log.error("reload failed, keeping generation %d: %s cannot change at a reload; restart %s",
                      number, ", ".join(fixed), self.app.name)
            self.notifier.ready(self._status())
            return False
        try:
            sockets = self._take_sockets(new, new.workers)
            datagrams = self._take_datagrams(new, new.workers)
            check_not_served(sockets, {os.getpid(), *self.workers})
        except OSError as exc:
            self._release_sockets()
            log.error("reload failed, keeping generation %d: cannot listen: %s", number, exc)
            self.notifier.ready(self._status())
            return False
        if self.starting is not None:
            self._abandon_reload("a newer reload supersedes it", announce=False)
        newest = max(g.number for g in self.generations)
        self.starting = Generation(newest + 1, new, sockets, new.workers, datagrams=datagrams)
        try:
            self.app.setup_logging(new)
        except OSError as exc:
            log.error("cannot open logs: %s", exc)
        for slot in range(1, new.workers + 1):
            self._spawn(self.starting, slot)
        log.info("generation %d starting (%d workers)", self.starting.number, new.workers)
        return True

    def _promote(self) -> None:
        """The starting generation serves in every slot: the serving one retires."""
        gen = self.starting
        if gen is None or not gen.all_serving():
            return
        old = self.serving
        old.move(GenerationState.RETIRING)
        gen.move(GenerationState.SERVING)
        self.serving, self.starting = gen, None
        self.retiring.append(old)
        # The master's copy of a socket the reload removed goes first: the retiring workers'
        # drain-and-close must be its last close.  Closed after them, its queue (connections
        # the kernel took while they finished draining) would be reset.
        self._release_sockets()
        for w in list(old.workers.values()):
            self._retire(w)
        log.info("reload done: generation %d serving", gen.number)
        self.notifier.ready(self._status())

    def _abandon_reload(self, why: str, announce: bool = True) -> None:
        """The starting generation retires; the serving one never stopped and keeps its sockets."""
        gen = self.starting
        assert gen is not None
        log.error("reload abandoned: %s; keeping generation %d", why, self.serving.number)
        gen.move(GenerationState.RETIRING)
        for w in list(gen.workers.values()):
            self._retire(w)
        self.starting = None
        self.retiring.append(gen)
        self._release_sockets()
        if announce:
            try:
                self.app.setup_logging(self.serving.cfg)
            except OSError as exc:
                log.error("cannot open logs: %s", exc)
            self.notifier.ready(self._status())

    # --- other signals ------------------------------------------------------------

    def handle_stop(self) -> None:
        if self.stopping in (Stop.QUICK, Stop.HALT):
            return
        log.info("quick shutdown")
        self.notifier.stopping()
        self.stopping = Stop.QUICK
        self.stop_deadline = time.monotonic() + KILL_GRACE
        self._kill_all(signal.SIGTERM)
        self.listeners.close()
        self.datagrams.close()

    def handle_graceful_stop(self) -> None:
        if self.stopping:
            log.warning("QUIT ignored: already stopping (%s)", self.stopping.value)
            return
        grace = self.cfg.graceful_timeout
        log.info("graceful shutdown (up to %gs)", grace)
        self.notifier.stopping()
        self.stopping = Stop.GRACEFUL
        self.stop_deadline = time.monotonic() + grace + KILL_GRACE if grace else float("inf")
        self._kill_all(signal.SIGQUIT)
        # Workers accept what is queued and close theirs: then new connections are refused
        # at once instead of waiting in a queue nobody serves.
        self.listeners.close()
        self.datagrams.close()

    def handle_incr(self) -> None:
        for gen in (self.serving, self.starting):
            if gen is not None:
                gen.nworkers += 1
                if self.per_slot:
                    self._take_sockets(gen.cfg, gen.nworkers)  # the new slot's sockets (listen when it serves)
                self._take_datagrams(gen.cfg, gen.nworkers)
        log.info("TTIN: %d workers", self.serving.nworkers)

    def handle_decr(self) -> None:
        for gen in (self.serving, self.starting):
            if gen is not None and gen.nworkers > 1:
                gen.nworkers -= 1
        # The surplus worker still holds its slot's socket: it accepts what is queued and closes it, and
        # migrate_req moves what arrives meanwhile to a sibling.
        self._release_sockets()
        log.info("TTOU: %d workers", self.serving.nworkers)

    def handle_reopen(self) -> None:
        """USR1: the workers reopen theirs even when the master cannot reopen its own."""
        try:
            logs.reopen()
        finally:
            self._kill_all(signal.SIGUSR1)
        log.info("log files reopened")

    def handle_upgrade(self) -> None:
        """USR2: start a new master of the installed program on our sockets (see `upgrade`)."""
        if self.upgrade is not None:
            log.warning("USR2 ignored: new master %d is starting", self.upgrade.pid)
            return
        if self.starting is not None:
            log.warning("USR2 ignored: a reload is in progress")
            return
        if self.pidfile:
            self.pidfile.rename(self.pidfile.path + upgrade.OLDBIN)
        try:
            self.upgrade = upgrade.Upgrade.spawn(self.serving.sockets, upgrade.notify_socket_env(self.notifier.addr),
                                                 self.cwd, self.serving.datagrams)
        except OSError as exc:  # no pipe or no fork: out of descriptors or processes
            log.error("upgrade failed: cannot start the new master: %s", exc)
            self._take_pidfile_back()
            return
        self.selector.register(self.upgrade.pipe_r, selectors.EVENT_READ, self.upgrade)
        log.info("upgrade (USR2): new master %d starting", self.upgrade.pid)

    def _upgrade_readable(self, up: upgrade.Upgrade) -> None:
        if up.state is not upgrade.UpgradeState.STARTING:
            return
        if not up.read():
            self._end_upgrade_pipe(up)  # EOF: its exit (reaped) says why
            return
        up.state = upgrade.UpgradeState.HANDED_OVER
        self._end_upgrade_pipe(up)
        log.info("upgrade: new master %d serves; draining generation %d and exiting", up.pid, self.serving.number)
        self.notifier.send(f"MAINPID={up.pid}", "READY=1", f"STATUS=upgraded to master {up.pid}")
        self.notifier.addr = None  # systemd listens to the new master from now on
        grace = self.cfg.graceful_timeout
        self.stopping = Stop.GRACEFUL
        self.stop_deadline = time.monotonic() + grace + KILL_GRACE if grace else float("inf")
        self._kill_all(signal.SIGQUIT)
        # Workers accept what is queued and close theirs: then new connections are refused
        # at once instead of waiting in a queue nobody serves.
        self.listeners.close()
        self.datagrams.close()

    def _end_upgrade_pipe(self, up: upgrade.Upgrade) -> None:
        if up.pipe_r >= 0:
            self.selector.unregister(up.pipe_r)
            up.close()

    def _upgrade_exited(self, status: int) -> None:
        up = self.upgrade
        assert up is not None
        self._end_upgrade_pipe(up)
        self.upgrade = None
        if up.state is upgrade.UpgradeState.STARTING:
            up.state = upgrade.UpgradeState.FAILED
            log.error("upgrade failed: new master %d %s before serving; generation %d keeps serving",
                      up.pid, describe_status(status), self.serving.number)
            self._take_pidfile_back()

    def _check_upgrade(self) -> None:
        up = self.upgrade
        if up is not None and up.state is upgrade.UpgradeState.STARTING and \
                time.monotonic() - up.started > upgrade.UPGRADE_TIMEOUT:
            log.error("upgrade: new master %d not serving after %gs; stopping it", up.pid, upgrade.UPGRADE_TIMEOUT)
            up.state = upgrade.UpgradeState.FAILED
            self._take_pidfile_back()
            try:
                os.kill(up.pid, signal.SIGQUIT)
            except ProcessLookupError:
                pass

    def _take_pidfile_back(self) -> None:
        if self.pidfile and self.pidfile.path.endswith(upgrade.OLDBIN):
            try:
                self.pidfile.rename(self.pidfile.path[: -len(upgrade.OLDBIN)])
                self.pidfile.create(os.getpid())
            except (OSError, PidfileError) as exc:
                log.error("cannot take the pidfile back: %s", exc)

    def handle_reap(self) -> None:
        self._reap()

    # --- status ---------------------------------------------------------------

    def _status(self) -> str:
        active = sum(w.active for w in self.workers.values())
        return f"gen={self.serving.number} workers={self.serving.nworkers} conns={active}"

    def status_report(self) -> dict[str, Any]:
        """What `status` prints: every worker (RSS and fds read now) and the members the workers reported."""
        now = time.monotonic()
        workers = []
        for w in sorted(self.workers.values(), key=lambda w: (w.generation.number, w.slot, w.pid)):
            try:
                p = psutil.Process(w.pid)
                rss, fds = p.memory_info().rss, p.num_fds()
            except (psutil.Error, OSError):
                rss = fds = None
            workers.append({"pid": w.pid, "generation": w.generation.number, "slot": w.slot, "state": w.state.value,
                            "age": round(now - w.started, 1), "active": w.active, "total": w.total,
                            "rss": rss, "fds": fds})
        serving = [list(w.members.values()) for w in self.serving.workers.values() if w.state is WorkerState.SERVING]
        return {"name": self.app.name, "master": os.getpid(), "generation": self.serving.number,
                "uptime": round(now - self.started, 1), "stopping": self.stopping.value if self.stopping else None,
                "active": sum(w["active"] for w in workers), "total": sum(w["total"] for w in workers),
                "workers": workers, "members": control.merge_members(serving)}

    # --- the control socket and /metrics ------------------------------------------

    def _bind_operator_sockets(self) -> tuple[socket.socket | None, socket.socket | None]:
        """Before the privilege drop: /metrics may use a low port, the control socket lives under /run,
        and the metrics library's files may be unreadable afterwards.

        A control socket that cannot be made is a warning (the daemon serves
        without `status`); a metrics address that cannot be bound is an error.
        The new master of an upgrade takes the control socket only once it
        serves (`_worker_ready`): until then the old master answers there, and
        an upgrade that fails leaves it in place.
        """
        cfg = self.cfg
        ctrl_sock = self._bind_control() if self.upgrade_pipe is None else None
        metrics_sock = control.bind_tcp(cfg.metrics_listen) if cfg.metrics_listen else None
        if metrics_sock is not None:
            metrics_mod.preload()
        return metrics_sock, ctrl_sock

    def _bind_control(self) -> socket.socket | None:
        cfg = self.cfg
        if not cfg.control_socket:
            return None
        try:
            target = privilege_target(cfg.user, cfg.group)
            ctrl_sock, identity = control.bind_control(cfg.control_socket, target)
        except (OSError, KeyError) as exc:
            log.warning("no control socket (status will not work): %s: %s", cfg.control_socket,
                        getattr(exc, "strerror", None) or exc)
            return None
        self.control = (cfg.control_socket, identity)
        return ctrl_sock

    def _serve_control(self, ctrl_sock: socket.socket) -> None:
        self.servers.append(control.Server(
            ctrl_sock, self.selector, lambda buf: b"\n" in buf,
            lambda _req: json.dumps(self.status_report()).encode() + b"\n"))

    def _serve_operator_sockets(self, metrics_sock: socket.socket | None, ctrl_sock: socket.socket | None) -> None:
        if ctrl_sock is not None:
            self._serve_control(ctrl_sock)
        if metrics_sock is not None:
            path = metrics_mod.enable(self.app.name)
            self.metrics = metrics_mod.MasterMetrics(self.app.name, path)
            scrape = self.metrics.scrape
            self.servers.append(control.Server(
                metrics_sock, self.selector, control.http_complete,
                control.http_answer(lambda: scrape(len(self.workers)))))
            log.info("metrics at http://%s/metrics", self.cfg.metrics_listen)

    def _close_operator_sockets(self) -> None:
        for server in self.servers:
            server.close()
        self.servers = []
        if self.control:
            control.unlink_control(*self.control)
        if self.metrics:
            metrics_mod.disable(self.metrics.path)

    def _count_restart(self, reason: str) -> None:
        if self.metrics:
            self.metrics.restarts.labels(reason).inc()

    def _refresh_title(self) -> None:
        now = time.monotonic()
        if now - self._last_title < 1.0:
            return
        self._last_title = now
        where = f" [{self.cfg.config_file}]" if getattr(self.cfg, "config_file", None) else ""
        active = sum(w.active for w in self.workers.values())
        total = sum(w.total for w in self.workers.values())
        set_title(f"{self.app.name}: master gen={self.serving.number} workers={self.serving.nworkers} "
                  f"conns={active} total={total}{where}")
        if self.notifier.enabled:
            self.notifier.status(self._status())


def _children(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children()]
    except psutil.Error:
        return []


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


def _datagram_hook(app: App, name: str, cfg: Any) -> Any:
    """An optional App method for UDP (`prepare_datagram`, `listen_datagram`, `worker_capabilities`);
    None without it."""
    fn = getattr(app, name, None)
    return fn(cfg) if fn is not None else None


def privilege_target(user: str | None, group: str | None) -> tuple[int, int] | None:
    """(uid, gid) to become after binding (-1: keep), or None to keep both."""
    if not user and not group:
        return None
    gid = grp.getgrnam(group).gr_gid if group else -1
    uid = -1
    if user:
        pw = pwd.getpwnam(user)
        uid = pw.pw_uid
        gid = gid if gid != -1 else pw.pw_gid
    return uid, gid


def drop_privileges(user: str | None, group: str | None, keep: tuple[int, ...] = ()) -> None:
    """setgid/setuid after binding, so workers never run as root; the capabilities in `keep`
    (what the app's workers need, e.g. CAP_NET_RAW for transocks' UDP replies) survive it."""
    target = privilege_target(user, group)
    if target is None:
        return
    uid, gid = target
    if (uid == -1 or os.getuid() == uid) and os.getgid() == gid and os.geteuid() == os.getuid():
        return  # already (the new master of an upgrade)
    os.setgroups([])
    os.setgid(gid)
    if uid != -1:
        if keep:
            capabilities.keep_across_setuid(True)
        os.setuid(uid)
        if keep:
            capabilities.keep_across_setuid(False)
            try:
                capabilities.retain(keep)
            except OSError:
                capabilities.retain(())  # hold none rather than all of root's that the setuid kept
                raise


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"killed by {signal.Signals(sig).name}"
    return f"exit code {os.WEXITSTATUS(status)}"


def main(app: App, argv: Sequence[str] | None = None) -> int:
    """A daemon's entry point: the command argv starts with (`rules`, `--hash-password`, ...)
    when it names one of the app's `config().commands`, else the master."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = app.config().run_command(args)
    except ConfigError as exc:
        print(f"{app.name}: error: {exc}", file=sys.stderr)
        return 2
    return serve(app, args) if code is None else code


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

