"""Privilege and post-mortem hardening with the real daemon: capabilities, pidfile, hung workers."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import psutil
import pytest

from tests.lab import servers
from tests.lab.netns import INET_V4
from tests.test_runtime import connect, serving_workers, wait_for

pytestmark = pytest.mark.netns

CAP_NET_ADMIN = 12


def caps(pid: int, which: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(which + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {which} for {pid}")


def test_tproxy_workers_hold_no_cap_net_admin(lab, upstreams, daemon):
    port = 1093
    d = daemon(["--proxy-url", upstreams.dante.url, "--tproxy", "true"], port, redirect=False, ns=lab.gw,
               listens=[f"[::]:{port}"], workers=2)
    d.redirects.append(lab.tproxy(port))
    assert caps(d.pid, "CapEff") >> CAP_NET_ADMIN & 1  # the master binds (a reload may add an address)
    for generation in (1, 2):
        procs = wait_for(lambda: [p for p in serving_workers(d, 2) if f"gen={generation}" in " ".join(p.cmdline())]
                         if len(serving_workers(d, 2)) == 2 else None, 15, f"generation {generation}")
        for p in procs:
            for which in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
                assert not caps(p.pid, which) >> CAP_NET_ADMIN & 1, (p.pid, which)
        s = connect(lab, INET_V4)
        assert servers.get(s, 100_000, seed="cap") == (servers.expected_sha(100_000, "cap"), 100_000)
        s.close()
        if generation == 1:
            d.send_signal(signal.SIGHUP)
            wait_for(lambda: "reload done" in d.log_text(), 15, "reload")


def test_pidfile_does_not_outlive_a_master_that_dropped_privileges(lab, upstreams, daemon):
    run_dir = Path(tempfile.mkdtemp(prefix="tsk-run-", dir="/tmp"))  # root-owned 0755, like /run
    try:
        run_dir.chmod(0o755)
        pidfile = run_dir / "transocks.pid"
        d = daemon(["--proxy-url", upstreams.dante.url, "--pidfile", str(pidfile), "--user", "nobody",
                    "--group", "nogroup"], workers=1)
        serving_workers(d, 1)
        assert int(pidfile.read_text()) == d.pid
        assert d.stop(signal.SIGQUIT, 15) == 0
        # Gone, or emptied: a process that later gets the same pid must not block the next start.
        assert not pidfile.exists() or pidfile.read_text() == ""
        again = daemon(["--proxy-url", upstreams.dante.url, "--pidfile", str(pidfile)], workers=1)
        assert int(pidfile.read_text()) == again.pid
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_worker_aborted_for_hanging_leaves_its_python_stack(lab, upstreams, daemon):
    d = daemon(["--proxy-url", upstreams.dante.url, "--worker-timeout", "2"], workers=1)
    victim = serving_workers(d, 1)[0]
    victim.suspend()  # hung: no heartbeats; the ABRT waits until it runs again
    try:
        wait_for(lambda: "silent for" in d.log_text(), 8, "abort")
    finally:
        victim.resume()
    wait_for(lambda: "Fatal Python error: Aborted" in d.log_text(), 8, "faulthandler's dump")
    text = d.log_text()
    assert "(most recent call first)" in text and 'File "' in text
    wait_for(lambda: "killed by SIGABRT" in d.log_text() or not psutil.pid_exists(victim.pid), 8, "victim gone")
    assert os.path.exists(f"/proc/{d.pid}")
