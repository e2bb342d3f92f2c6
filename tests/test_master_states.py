"""Master state with a stand-in daemon (tests/lab/standin.py) in the client namespace:
abandoned reloads, recycled workers whose successor fails, signals that must not hurt, crash loops,
a master out of descriptors, a failed upgrade and a failed start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO_ROOT
from tests.test_runtime import wait_for
from transocks.runtime import control

pytestmark = pytest.mark.netns

PORT = 18931


class Standin:
    def __init__(self, lab, tmp_path: Path, conf: str, args: tuple[str, ...] = (), env: dict | None = None) -> None:
        self.lab = lab
        self.conf = tmp_path / "standin.conf"
        self.conf.write_text(conf)
        self.flag = tmp_path / "fail"
        self.log_path = tmp_path / "standin.log"
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), STANDIN_FAIL=str(self.flag), PYTHONUNBUFFERED="1",
                   **(env or {}))
        with open(self.log_path, "ab") as log:
            self.proc = lab.popen(lab.client, [sys.executable, "-m", "tests.lab.standin", "-c", str(self.conf), *args],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        self.pid = self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[psutil.Process]:
        try:
            return [p for p in psutil.Process(self.pid).children() if p.status() != psutil.STATUS_ZOMBIE]
        except psutil.Error:
            return []

    def ask(self, host: str = "127.0.0.1", timeout: float = 5.0) -> int:
        """Open a connection; returns the pid of the worker that served it."""
        with self.lab.netns(self.lab.client):
            s = socket.create_connection((host, PORT), timeout=timeout)
        with s:
            return int(s.makefile().readline().split()[0])

    def listeners(self) -> list[str]:
        out = self.lab.run(self.lab.client, ["ss", "-Hltn", f"sport = :{PORT}"]).stdout
        return sorted(line.split()[3] for line in out.splitlines() if line.strip())


@pytest.fixture
def standin(lab, tmp_path):
    started = []

    def start(conf: str, *args: str, env: dict | None = None) -> Standin:
        s = Standin(lab, tmp_path, conf, args, env)
        started.append(s)
        wait_for(lambda: s.proc.poll() is not None or "ready (generation" in s.log_text(), 20, "standin ready")
        assert s.proc.poll() is None, s.log_text()
        return s

    yield start
    for s in started:
        lab.stop(s.proc, signal.SIGTERM, 10)
        print(f"--- standin {s.pid} rc={s.proc.returncode} ---\n{s.log_text()[-4000:]}")


def test_abandoned_reload_never_binds_an_address_twice(standin):
    s = standin(f"listen = 127.0.0.1:{PORT}\nworkers = 2\n")
    before = {p.pid for p in s.workers()}
    s.flag.touch()
    s.conf.write_text(f"listen = 127.0.0.2:{PORT}\nworkers = 2\n")
    os.kill(s.pid, signal.SIGHUP)
    wait_for(lambda: "reload abandoned" in s.log_text(), 20, "abandoned reload")
    assert s.listeners() == [f"127.0.0.1:{PORT}"]
    # With a second socket on the address (nobody accepting on it) about half would hang.
    assert {s.ask() for _ in range(40)} <= before
    wait_for(lambda: {p.pid for p in s.workers()} == before, 10, "failed workers gone")
    assert s.proc.poll() is None


def test_recycled_worker_whose_successor_fails_stays_supervised(standin):
    s = standin(f"listen = 127.0.0.1:{PORT}\nworkers = 1\nmax_worker_memory = 1M\n")
    first = s.workers()[0].pid
    s.flag.touch()
    wait_for(lambda: "died" in s.log_text(), 15, "a successor failing to boot")
    most = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        most = max(most, len(s.workers()))
        assert s.ask() == first
        time.sleep(0.1)
    s.flag.unlink()
    # A successor boots now, serves, and the first worker retires: one slot, one worker.
    wait_for(lambda: first not in {p.pid for p in s.workers()}, 30, "first worker retired")
    wait_for(lambda: len(s.workers()) <= 2, 5, "no stray worker")
    assert most <= 2
    for _ in range(5):
        assert s.ask() != first


def test_usr1_with_unwritable_log_keeps_master_serving(standin, tmp_path):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    s = standin(f"listen = 127.0.0.1:{PORT}\nworkers = 1\naccess_log = {logdir}/access.log\n")
    kids = {p.pid for p in s.workers()}
    (logdir / "access.log").unlink()
    logdir.rmdir()
    os.kill(s.pid, signal.SIGUSR1)
    wait_for(lambda: "handling SIGUSR1 failed; still serving" in s.log_text() or s.proc.poll() is not None, 10,
             "the failed reopen logged")
    assert s.proc.poll() is None, s.log_text()
    assert "handling SIGUSR1 failed; still serving" in s.log_text()
    assert s.ask() in kids
    os.kill(s.pid, signal.SIGHUP)  # and it still reloads
    wait_for(lambda: "reload done" in s.log_text(), 15, "reload after the failed reopen")


def test_hup_during_graceful_stop_is_ignored(standin):
    s = standin(f"listen = 127.0.0.1:{PORT}\nworkers = 1\ngraceful_timeout = 0\n")
    with s.lab.netns(s.lab.client):
        held = socket.create_connection(("127.0.0.1", PORT), timeout=5)
    held.makefile().readline()
    os.kill(s.pid, signal.SIGQUIT)
    time.sleep(0.3)
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        os.kill(s.pid, sig)
    time.sleep(0.5)
    held.close()
    assert s.proc.wait(15) == 0
    text = s.log_text()
    assert "SIGHUP ignored: shutting down" in text and "SIGTTIN ignored" in text and "SIGTTOU ignored" in text
    assert "generation 2" not in text


def test_signals_while_a_worker_boots_wait_for_its_handlers(standin):
    """USR1 (logrotate) landing while a worker boots must not kill it."""
    s = standin(f"listen = 127.0.0.1:{PORT}\nworkers = 1\n", env={"STANDIN_BOOT_DELAY": "1.5"})
    first = {p.pid for p in s.workers()}
    os.kill(s.pid, signal.SIGTTIN)
    booting = wait_for(lambda: [p for p in s.workers() if p.pid not in first], 5, "a booting worker")[0]
    for _ in range(3):
        time.sleep(0.2)
        booting.send_signal(signal.SIGUSR1)
    def serving_or_dead():
        try:
            return "conns=" in " ".join(booting.cmdline()) or booting.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    wait_for(serving_or_dead, 10, "boot or death")
    assert "died" not in s.log_text()
    assert booting.is_running() and booting.status() != psutil.STATUS_ZOMBIE


def test_worker_exiting_right_after_boot_is_backed_off_like_a_boot_failure(standin):
    """Workers that say ready and leave half a second later: backed off, then the master gives up
    (on main they were respawned at once, for ever)."""
    s = standin(f"listen = 127.0.0.1:{PORT}\nworkers = 1\n", env={"STANDIN_EXIT_AFTER": "0.5"})
    assert s.proc.wait(30) == 3
    text = s.log_text()
    assert text.count("after it said ready") == 5, text[-3000:]
    assert "workers failed to boot 5 times in a row; exiting" in text


def _lowest_free_fd(pid: int) -> int:
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(n for n in range(len(used) + 1) if n not in used)


def test_socketpair_failing_in_the_master_backs_off_and_serves_on(standin):
    """No descriptor left for a new worker's socketpair: logged, retried, and the master serves on."""
    s = standin(f"listen = 127.0.0.1:{PORT}\nworkers = 1\n")
    first = {p.pid for p in s.workers()}
    master = psutil.Process(s.pid)
    limit = master.rlimit(psutil.RLIMIT_NOFILE)
    low = _lowest_free_fd(s.pid)
    master.rlimit(psutil.RLIMIT_NOFILE, (low, limit[1]))  # every descriptor below the soft limit is taken
    try:
        os.kill(s.pid, signal.SIGTTIN)
        wait_for(lambda: s.log_text().count("socketpair failed") >= 2, 10, "socketpair failures, retried")
        assert s.proc.poll() is None, s.log_text()[-3000:]
        assert s.ask() in first
    finally:
        master.rlimit(psutil.RLIMIT_NOFILE, limit)
    wait_for(lambda: len(s.workers()) == 2, 10, "the second worker, once descriptors are back")
    assert "Traceback" not in s.log_text()
    assert s.proc.poll() is None


def test_failed_usr2_leaves_the_old_master_its_control_socket_and_pidfile(standin, tmp_path):
    pidfile, ctl = tmp_path / "standin.pid", tmp_path / "control.sock"
    s = standin(f"listen = 127.0.0.1:{PORT}\nworkers = 1\npidfile = {pidfile}\ncontrol_socket = {ctl}\n")
    before = {p.pid for p in s.workers()}
    wait_for(lambda: ctl.exists(), 10, "control socket")
    s.flag.touch()  # the new master's workers cannot boot: it gives up (exit code 3)
    os.kill(s.pid, signal.SIGUSR2)
    wait_for(lambda: "upgrade failed: new master" in s.log_text(), 30, "upgrade failure")
    assert "exit code 3" in s.log_text()
    assert pidfile.read_text().strip() == str(s.pid)
    assert not (tmp_path / "standin.pid.oldbin").exists()
    assert control.query(str(ctl))["master"] == s.pid
    assert {p.pid for p in s.workers()} == before and s.ask() in before


def test_failed_start_removes_what_it_created(lab, tmp_path):
    """A start that fails after the pidfile and the control socket exist (its metrics address is
    taken) removes both."""
    pidfile, ctl = tmp_path / "standin.pid", tmp_path / "control.sock"
    with lab.netns(lab.client):
        taken = socket.socket()
    with taken:
        taken.bind(("127.0.0.1", PORT + 1))
        taken.listen(1)
        s = Standin(lab, tmp_path, f"listen = 127.0.0.1:{PORT}\nworkers = 1\npidfile = {pidfile}\n"
                                   f"control_socket = {ctl}\nmetrics_listen = 127.0.0.1:{PORT + 1}\n")
        assert s.proc.wait(30) == 1
    text = s.log_text()
    assert "cannot listen for metrics" in text and "Traceback" not in text, text
    assert not pidfile.exists() and not ctl.exists()


# --- descriptors ------------------------------------------------------------------------


def _hold(s: Standin, n: int) -> list[socket.socket]:
    held = []
    for _ in range(n):
        try:
            with s.lab.netns(s.lab.client):
                c = socket.create_connection(("127.0.0.1", PORT), timeout=2)
            c.recv(100)
            held.append(c)
        except OSError:
            break
    return held


def test_descriptors_held_by_connections_do_not_recycle_the_worker(standin):
    """A worker at RLIMIT_NOFILE 64 full of connections: a successor would have the same limit, so
    it is not recycled (on main: a new worker every watch, each keeping its connections, a respawn
    loop); it serves again once connections end."""
    s = standin(f"listen = 127.0.0.1:{PORT}\nworkers = 1\n")
    worker = s.workers()[0]
    worker.rlimit(psutil.RLIMIT_NOFILE, (64, 64))
    held = _hold(s, 70)
    try:
        assert worker.num_fds() > 0.9 * 64
        time.sleep(5.0)  # two of the master's resource watches
        assert "recycling worker" not in s.log_text()
        assert [w.pid for w in s.workers()] == [worker.pid]
    finally:
        for c in held:
            c.close()
    assert wait_for(lambda: _try_ask(s), 10, "a connection once descriptors are free") == worker.pid


def test_a_worker_that_leaks_descriptors_is_recycled(standin):
    s = standin(f"listen = 127.0.0.1:{PORT}\nworkers = 1\n", env={"STANDIN_LEAK": "11"})
    worker = s.workers()[0]
    worker.rlimit(psutil.RLIMIT_NOFILE, (64, 64))
    for _ in range(5):
        s.ask()  # each connection closes, its eleven leaked descriptors stay
    wait_for(lambda: "recycling worker" in s.log_text() and not worker.is_running(), 15, "the recycle")
    assert "open fds, above 90% of its limit 64, for 0 connections" in s.log_text()


def _try_ask(s: Standin) -> int | None:
    try:
        return s.ask(timeout=2)
    except OSError:
        return None
