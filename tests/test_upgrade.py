"""USR2 upgrades in place under a load of new connections through REDIRECT."""

from __future__ import annotations

import os
import signal
import socket

import psutil
import pytest

from tests.lab import servers
from tests.lab.services import pid_in, stop_master
from tests.test_runtime import (
    LoadClient,
    connect,
    listening_sockets,
    serving_workers,
    wait_for,
)

pytestmark = pytest.mark.netns


def test_usr2_upgrade_loses_no_connection(lab, upstreams, daemon, tmp_path, layout):
    pidfile = tmp_path / "transocks.pid"
    sock_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(sock_path)
    notify.settimeout(20)
    new_pid = None
    try:
        d = daemon(["--proxy-url", upstreams.dante.url, "--pidfile", str(pidfile), "--graceful-timeout", "20"],
                   workers=2, env={"NOTIFY_SOCKET": sock_path})
        old_workers = {p.pid for p in serving_workers(d, 2)}
        with LoadClient(lab, max_seconds=60) as load:
            load.wait_ok(30)
            d.send_signal(signal.SIGUSR2)
            new_pid = wait_for(lambda: (p := pid_in(pidfile)) != d.pid and p, 20, "new master's pidfile")
            # The old master keeps its pidfile as .oldbin while it drains; a quick drain may
            # already have removed it, and then the old master is on its way out.
            assert (tmp_path / "transocks.pid.oldbin").exists() or d.proc.wait(10) == 0
            messages = []
            while not any(f"MAINPID={new_pid}" in m for m in messages):
                messages.append(notify.recv(4096).decode())
            assert d.proc.wait(30) == 0  # the old master drained and left by itself
            load.wait_ok(100, timeout=20)
        assert not load.failures, load.failures[:5]
        assert load.ok > 100
        assert not (tmp_path / "transocks.pid.oldbin").exists()
        new_workers = {p.pid for p in psutil.Process(new_pid).children()}
        assert len(new_workers) == 2 and not new_workers & old_workers
        assert "upgrade: new master" in d.log_text()
        assert len(listening_sockets(lab, d.ns, d.port)) == 2 * (2 if layout == "per-slot" else 1)
        s = connect(lab)
        assert servers.get(s, 1000) == (servers.expected_sha(1000), 1000)
        s.close()
    finally:
        notify.close()
        if new_pid:
            stop_master(new_pid)


def test_failed_upgrade_keeps_the_old_master_serving(lab, upstreams, daemon, tmp_path):
    conf = tmp_path / "transocks.conf"
    conf.write_text(f"proxy_url = {upstreams.dante.url}\n")
    pidfile = tmp_path / "transocks.pid"
    d = daemon(["-c", str(conf), "--pidfile", str(pidfile)], workers=2)
    before = {p.pid for p in serving_workers(d, 2)}
    conf.write_text("proxy_url = gopher://nowhere\n")  # the new master cannot start
    d.send_signal(signal.SIGUSR2)
    wait_for(lambda: "upgrade failed: new master" in d.log_text(), 20, "upgrade failure logged")
    assert "exit code 2" in d.log_text()
    assert pid_in(pidfile) == d.pid
    assert not (tmp_path / "transocks.pid.oldbin").exists()
    assert {p.pid for p in psutil.Process(d.pid).children()} == before
    s = connect(lab)
    assert servers.get(s, 1000) == (servers.expected_sha(1000), 1000)
    s.close()
    assert d.proc.poll() is None
    os.kill(d.pid, signal.SIGHUP)  # and it still reloads
    wait_for(lambda: "reload failed" in d.log_text(), 10, "reload after the failed upgrade")
