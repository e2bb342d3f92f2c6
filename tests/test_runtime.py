"""The pre-fork runtime with real processes: reloads, crashes, scaling, stops, titles, notify."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import psutil
import pytest

from tests.lab import servers
from tests.lab.netns import INET_V4, INET_V6
from tests.lab.threads import ThreadedLoad
from tests.test_datapath import connect as datapath_connect

pytestmark = pytest.mark.netns

MiB = 1 << 20


def connect(lab, host: str = INET_V4, timeout: float = 10.0) -> socket.socket:
    return datapath_connect(lab, host, timeout=timeout)


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def workers(d) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(d.pid).children() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


def titles(d) -> list[str]:
    out = []
    for p in workers(d):
        try:
            out.append(" ".join(p.cmdline()))
        except psutil.Error:
            pass
    return out


def serving_workers(d, n: int, timeout: float = 10.0) -> list[psutil.Process]:
    """Wait until n workers have set their serving title (they do once they accept)."""
    def ready():
        procs = workers(d)
        if len(procs) != n:
            return None
        try:
            if all("conns=" in " ".join(p.cmdline()) for p in procs):
                return procs
        except psutil.Error:
            return None
        return None

    return wait_for(ready, timeout, f"{n} serving workers")


def listening_sockets(lab, ns: str, port: int) -> list[str]:
    """Local addresses of the TCP sockets listening on `port` in `ns` (one line per socket)."""
    out = lab.run(ns, ["ss", "-Hltn", f"sport = :{port}"]).stdout
    return sorted(line.split()[3] for line in out.splitlines() if line.strip())


class LoadClient(ThreadedLoad):
    """Opens new connections through the redirect, one after another, until stopped.

    Bounded: at most `limit` connections and `max_seconds` of running time.
    """

    def __init__(self, lab, threads: int = 4, limit: int = 20000, max_seconds: float = 60.0) -> None:
        super().__init__()
        self.lab = lab
        self.limit = limit
        self.deadline = time.monotonic() + max_seconds
        self.ok = 0
        self.failures: list[str] = []
        self.failure_starts: list[float] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        host = INET_V4 if i % 2 == 0 else INET_V6
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            with self.lock:
                if self.ok + len(self.failures) >= self.limit:
                    return
            started = time.monotonic()
            try:
                s = connect(self.lab, host)
                try:
                    result = servers.get(s, 4096, seed="load")
                finally:
                    s.close()
                good = result == (servers.expected_sha(4096, "load"), 4096)
                err = None if good else f"bad data {result}"
            except OSError as exc:
                err = repr(exc)
            with self.lock:
                if err is None:
                    self.ok += 1
                else:
                    self.failures.append(err)
                    self.failure_starts.append(started)

    def wait_ok(self, n: int, timeout: float = 10.0) -> None:
        start = self.ok
        wait_for(lambda: self.ok >= start + n, timeout, f"{n} more successful connections")


def test_hup_reloads_five_times_under_load_without_failures(lab, upstreams, daemon, tmp_path, layout):
    conf = tmp_path / "transocks.conf"
    urls = [upstreams.dante.url, upstreams.microsocks.url]
    conf.write_text(f"proxy_url = {urls[0]}\ngraceful_timeout = 10\n")
    d = daemon(["-c", str(conf)], workers=2)
    first_workers = {p.pid for p in serving_workers(d, 2)}
    with LoadClient(lab) as load:
        load.wait_ok(20)
        for i in range(1, 6):
            conf.write_text(f"proxy_url = {urls[i % 2]}\ngraceful_timeout = 10\n")
            d.send_signal(signal.SIGHUP)
            wait_for(lambda n=i: d.log_text().count("reload done") >= n, 20, f"reload {i}")
            load.wait_ok(20)
    assert not load.failures, load.failures[:5]
    assert load.ok > 100
    wait_for(lambda: len(workers(d)) == 2, 10, "old generation gone")
    assert not first_workers & {p.pid for p in workers(d)}
    assert all("gen=6" in t for t in titles(d)), titles(d)
    # The last generation uses the last file: microsocks (odd reload count).
    s = connect(lab)
    servers.get(s, 100, seed="x")
    s.close()
    last = wait_for(lambda: [ln for ln in d.log_text().splitlines() if "outcome=ok" in ln][-1:], 5, "access line")
    assert f"upstream={urls[1]}" in last[0]


@pytest.mark.parametrize("new_conf, logged", [
    ("proxy_url = gopher://nowhere\nno_such_key = 1\n", "reload failed, keeping generation 1"),
    # Switching TPROXY needs privileges a master may have dropped: it takes a restart.
    ("proxy_url = {dante}\ntproxy = true\n", "tproxy cannot change at a reload; restart transocks"),
    ("proxy_url = {dante}\nbacklog = 64\npidfile = /run/other.pid\n",
     "backlog, pidfile cannot change at a reload; restart transocks"),
    ("proxy_url = {dante}\nuser = nobody\n", "user cannot change at a reload; restart transocks"),
], ids=["broken", "tproxy-change", "backlog-pidfile-change", "user-change"])
def test_refused_reload_keeps_old_generation(lab, upstreams, daemon, tmp_path, new_conf, logged):
    conf = tmp_path / "transocks.conf"
    conf.write_text(f"proxy_url = {upstreams.dante.url}\n")
    d = daemon(["-c", str(conf)], workers=2)
    before = {p.pid for p in serving_workers(d, 2)}
    conf.write_text(new_conf.format(dante=upstreams.dante.url))
    d.send_signal(signal.SIGHUP)
    wait_for(lambda: logged in d.log_text(), 10, "reload refusal")
    s = connect(lab)
    assert servers.get(s, 1000, seed="b") == (servers.expected_sha(1000, "b"), 1000)
    s.close()
    assert {p.pid for p in workers(d)} == before
    assert d.proc.poll() is None


@pytest.mark.parametrize("second_listen", ["127.0.0.1:1081", "[::]:1081"], ids=["same", "wildcard"])
def test_second_instance_on_a_served_address_refuses_to_start(lab, upstreams, daemon, second_listen):
    first = daemon(["--proxy-url", upstreams.dante.url], workers=2)
    serving_workers(first, 2)
    second = daemon(["--proxy-url", upstreams.dante.url], listen_port=1081, listens=[second_listen],
                    redirect=False, wait=False)
    assert second.proc.wait(20) == 1
    text = second.log_text()
    assert f"is already served by process {first.pid}" in text, text
    assert "127.0.0.1:1081" in text or "[::]:1081" in text
    s = connect(lab)
    assert servers.get(s, 1000) == (servers.expected_sha(1000), 1000)
    s.close()


def test_killed_worker_is_replaced_and_nothing_fails(lab, upstreams, daemon, layout):
    """In the per-slot layout the victim's queue waits in its socket (the master holds it) for the successor."""
    d = daemon(["--proxy-url", upstreams.dante.url], workers=2)
    serving_workers(d, 2)
    with LoadClient(lab) as load:
        load.wait_ok(20)
        victim = workers(d)[0]
        victim.kill()
        killed_at = time.monotonic()

        def replacement_serving():
            fresh = [t for p, t in zip(workers(d), titles(d)) if p.pid != victim.pid]
            return len(workers(d)) == 2 and victim.pid not in {p.pid for p in workers(d)} and \
                all("conns=" in t for t in fresh)

        wait_for(replacement_serving, 2.0, "replacement worker serving")
        assert time.monotonic() - killed_at < 1.0
        wait_for(lambda: "died: killed by SIGKILL" in d.log_text(), 5, "death logged")
        load.wait_ok(50)
    # Connections the victim was serving die with it; every connection opened after the kill succeeds.
    late = [f for f, t in zip(load.failures, load.failure_starts) if t >= killed_at]
    assert not late, late[:5]
    assert len(load.failures) <= 4


def test_ttin_ttou_change_worker_count(lab, upstreams, daemon, layout):
    d = daemon(["--proxy-url", upstreams.dante.url], workers=1)
    serving_workers(d, 1)
    per_address = {"shared": lambda n: 1, "per-slot": lambda n: n}[layout]
    with LoadClient(lab, max_seconds=60) as load:
        load.wait_ok(20)
        d.send_signal(signal.SIGTTIN)
        wait_for(lambda: len(workers(d)) == 2, 10, "two workers")
        d.send_signal(signal.SIGTTIN)
        wait_for(lambda: len(workers(d)) == 3, 10, "three workers")
        wait_for(lambda: any("worker 3/3" in t for t in titles(d)), 5, "title 3/3")
        wait_for(lambda: len(listening_sockets(lab, d.ns, d.port)) == 2 * per_address(3), 5, "slot sockets listening")
        load.wait_ok(50)
        # The surplus worker's socket closes after it accepted its queue; what arrives
        # meanwhile migrates to a sibling (tcp_migrate_req) instead of being reset.
        d.send_signal(signal.SIGTTOU)
        wait_for(lambda: len(workers(d)) == 2, 10, "back to two")
        wait_for(lambda: len(listening_sockets(lab, d.ns, d.port)) == 2 * per_address(2), 5, "a slot socket closed")
        load.wait_ok(50)
        d.send_signal(signal.SIGTTOU)
        wait_for(lambda: len(workers(d)) == 1, 10, "back to one")
        load.wait_ok(50)
    assert not load.failures, load.failures[:5]
    assert len(listening_sockets(lab, d.ns, d.port)) == 2
    s = connect(lab)
    assert servers.get(s, 1000) == (servers.expected_sha(1000), 1000)
    s.close()
    why = "tcp_migrate_req = 1" if layout == "per-slot" else "tcp_migrate_req = 0, not 1"
    assert f"(net.ipv4.{why})" in d.log_text()


def test_quit_finishes_transfer_in_flight(lab, upstreams, daemon):
    d = daemon(["--proxy-url", upstreams.dante.url, "--graceful-timeout", "30"], workers=2)
    s = connect(lab, timeout=30)
    size = 20 * MiB
    s.sendall(f"GET {size} quit\n".encode())
    received = bytearray(s.recv(65536))
    d.send_signal(signal.SIGQUIT)
    # Read slowly at first so the transfer is still in flight while workers stop.
    for _ in range(20):
        received += s.recv(65536)
        time.sleep(0.02)
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        received += chunk
    s.close()
    assert len(received) == size
    assert servers.sha256(bytes(received)) == servers.expected_sha(size, "quit")
    assert d.proc.wait(20) == 0
    assert "graceful shutdown" in d.log_text()


def test_master_killed_workers_exit(lab, upstreams, daemon):
    d = daemon(["--proxy-url", upstreams.dante.url], workers=2)
    kids = serving_workers(d, 2)
    os.kill(d.pid, signal.SIGKILL)
    gone, alive = psutil.wait_procs(kids, timeout=10)
    assert not alive, alive


def test_titles_pidfile_and_notify(lab, upstreams, daemon, tmp_path):
    sock_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(sock_path)
    notify.settimeout(15)
    pidfile = tmp_path / "transocks.pid"
    try:
        d = daemon(["--proxy-url", upstreams.dante.url, "--pidfile", str(pidfile)], workers=2,
                   env={"NOTIFY_SOCKET": sock_path})
        ready = ""
        while "READY=1" not in ready:
            ready = notify.recv(4096).decode()
        assert f"MAINPID={d.pid}" in ready
        assert int(pidfile.read_text()) == d.pid
        wait_for(lambda: "transocks: master gen=1 workers=2" in " ".join(psutil.Process(d.pid).cmdline()), 5, "master title")
        wait_for(lambda: sorted(t.split(" gen=")[0] for t in titles(d)) ==
                 ["transocks: worker 1/2", "transocks: worker 2/2"], 5, "worker titles")
        assert all("conns=" in t and "total=" in t for t in titles(d))
        for p in workers(d):
            assert "NOTIFY_SOCKET" not in p.environ()
        d.send_signal(signal.SIGHUP)
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(notify.recv(4096).decode())
        assert any("RELOADING=1" in m and "MONOTONIC_USEC=" in m for m in messages)
        d.send_signal(signal.SIGTERM)
        stopping = []
        while not any("STOPPING=1" in m for m in stopping):
            stopping.append(notify.recv(4096).decode())
        assert d.proc.wait(10) == 0
        assert not pidfile.exists()
    finally:
        notify.close()


def test_emfile_backs_off_without_spinning(lab, upstreams, daemon):
    d = daemon(["--proxy-url", upstreams.dante.url], workers=1, wrap=["prlimit", "--nofile=40:40"])
    worker = serving_workers(d, 1)[0]
    held = []
    try:
        for _ in range(40):
            s = connect(lab)
            s.sendall(b"HOLD\n")
            held.append(s)
        cpu_before = sum(worker.cpu_times()[:2])
        time.sleep(2.0)
        cpu_used = sum(worker.cpu_times()[:2]) - cpu_before
        assert cpu_used < 1.0, f"worker used {cpu_used:.2f}s CPU in 2s while out of fds"
        assert "pausing accepts" in d.log_text()
    finally:
        for s in held:
            s.close()
    s = connect(lab)
    assert servers.get(s, 1000) == (servers.expected_sha(1000), 1000)
    s.close()
    assert d.proc.poll() is None



def test_dialing_without_descriptors_is_resource_exhaustion_warned_once_a_second(lab, upstreams, daemon, tmp_path):
    access = tmp_path / "access.log"
    d = daemon(["--proxy-url", upstreams.dante.url, "--access-log", str(access)], workers=1,
               wrap=["prlimit", "--nofile=48:48"])
    serving_workers(d, 1)
    held = []
    started = time.monotonic()
    try:
        for _ in range(60):
            try:
                s = connect(lab, timeout=3)
                s.sendall(b"HOLD\n")
                held.append(s)
            except OSError:
                pass
        wait_for(lambda: access.exists() and "outcome=resource_exhausted" in access.read_text(), 10,
                 "resource_exhausted in the access log")
        elapsed = time.monotonic() - started
        text = d.log_text()
        warnings = [ln for ln in text.splitlines() if "warning:" in ln and
                    ("descriptor" in ln or "resource_exhausted" in ln or "pausing accepts" in ln)]
        assert warnings
        assert len(warnings) <= elapsed + 2, warnings
        assert "upstream_unreachable" not in access.read_text()
        assert "Traceback" not in text
    finally:
        for s in held:
            s.close()
    s = wait_for(lambda: _try_connect(lab), 10, "a connection once descriptors are free")
    assert servers.get(s, 1000) == (servers.expected_sha(1000), 1000)
    s.close()
    assert d.proc.poll() is None


def _try_connect(lab):
    try:
        s = connect(lab, timeout=3)
    except OSError:
        return None
    return s


def gone(p: psutil.Process) -> bool:
    """Exited: a zombie, or reaped already (also between two looks at it)."""
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_silent_worker_is_aborted_and_replaced(lab, upstreams, daemon):
    d = daemon(["--proxy-url", upstreams.dante.url, "--worker-timeout", "2"], workers=1)
    victim = serving_workers(d, 1)[0]
    victim.suspend()  # a worker stuck without heartbeats
    try:
        wait_for(lambda: "silent for" in d.log_text(), 6, "abort logged")
        fresh = wait_for(lambda: [p for p in serving_workers(d, 2) if p.pid != victim.pid], 6, "replacement")
        assert fresh
        s = connect(lab)
        assert servers.get(s, 1000) == (servers.expected_sha(1000), 1000)
        s.close()
        wait_for(lambda: gone(victim), 10, "victim killed")
    finally:
        if victim.is_running():
            victim.resume()


def test_worker_over_memory_limit_is_recycled_successor_first(lab, upstreams, daemon):
    d = daemon(["--proxy-url", upstreams.dante.url, "--max-worker-memory", "1M"], workers=1)
    first = serving_workers(d, 1)[0]
    with LoadClient(lab, threads=2) as load:
        wait_for(lambda: "recycling worker" in d.log_text() and not first.is_running(), 15, "recycle")
        load.wait_ok(10)
    assert not load.failures, load.failures[:5]
    assert "exceeds max_worker_memory" in d.log_text()


def test_usr1_reopens_logs(lab, upstreams, daemon, tmp_path):
    access = tmp_path / "access.log"
    d = daemon(["--proxy-url", upstreams.dante.url, "--access-log", str(access)], workers=1)
    serving_workers(d, 1)
    s = connect(lab)
    servers.get(s, 10)
    s.close()
    wait_for(lambda: access.exists() and "outcome=ok" in access.read_text(), 5, "first access line")
    access.rename(tmp_path / "access.log.1")
    d.send_signal(signal.SIGUSR1)
    wait_for(lambda: "log files reopened" in d.log_text(), 5, "reopen")
    wait_for(lambda: access.exists(), 5, "new access log")
    s = connect(lab)
    servers.get(s, 10)
    s.close()
    wait_for(lambda: "outcome=ok" in access.read_text(), 5, "access line in the new file")


def test_hup_with_changed_listen_address(lab, upstreams, tmp_path):
    """Listen addresses come from the file here: a HUP binds the new one and drains the old."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    conf = tmp_path / "transocks.conf"
    conf.write_text(f"proxy_url = {upstreams.dante.url}\nlisten = 127.0.0.1:1091\nworkers = 1\n")
    log_path = tmp_path / "transocks.log"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    with open(log_path, "wb") as log:
        proc = lab.popen(lab.client, [sys.executable, "-m", "transocks", "-c", str(conf)],
                         stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    redirect = lab.iptables_redirect(1091, v6_dst=None)
    try:
        lab.wait_tcp(lab.client, "127.0.0.1", 1091)
        s = connect(lab)
        assert servers.get(s, 100) == (servers.expected_sha(100), 100)
        s.close()
        conf.write_text(f"proxy_url = {upstreams.dante.url}\nlisten = 127.0.0.1:1092\nworkers = 1\n")
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: "reload done" in log_path.read_text(), 10, "reload")
        redirect.remove()
        redirect = lab.iptables_redirect(1092, v6_dst=None)
        s = connect(lab)
        assert servers.get(s, 100) == (servers.expected_sha(100), 100)
        s.close()
        with lab.netns(lab.client), pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", 1091), timeout=5)
    finally:
        redirect.remove()
        lab.stop(proc)


def test_privileges_dropped_after_binding(lab, upstreams, daemon):
    d = daemon(["--proxy-url", upstreams.dante.url, "--user", "nobody", "--group", "nogroup"], workers=2)
    procs = serving_workers(d, 2) + [psutil.Process(d.pid)]
    nobody = __import__("pwd").getpwnam("nobody").pw_uid
    assert all(p.uids().effective == nobody and p.uids().real == nobody for p in procs)
    s = connect(lab)
    assert servers.get(s, 1000) == (servers.expected_sha(1000), 1000)
    s.close()
