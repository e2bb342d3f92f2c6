"""`transocks status` against a real master: text, --json, no daemon, and a caller without permission."""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.lab.names import hosts_overlay
from tests.lab.netns import INET_V4, TEST_PORT
from tests.test_datapath import wait_log
from tests.test_runtime import serving_workers, wait_for

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parent.parent

# Run as another user after the interpreter and transocks are loaded: this Python lives under /root
# (mode 0700), where setpriv/runuser could not even exec it as nobody.
AS_USER = """
import os, sys
from transocks.redirector.cli import main
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([]); os.setgid(gid); os.setuid(uid)
sys.exit(main(sys.argv[3:]))
"""


def status(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if user is None:
        argv = [sys.executable, "-m", "transocks", "status", *args]
    else:
        pw = pwd.getpwnam(user)
        argv = [sys.executable, "-c", AS_USER, str(pw.pw_uid), str(pw.pw_gid), "status", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30, cwd="/")


@pytest.fixture
def sockdir():
    """A directory anyone may enter, so that only the socket's own mode keeps `nobody` out."""
    d = tempfile.mkdtemp(prefix="transocks-status-")
    os.chmod(d, 0o755)
    yield Path(d)
    for p in Path(d).iterdir():
        p.unlink()
    os.rmdir(d)


def test_status_text_and_json(lab, upstreams, daemon, sockdir):
    sock = sockdir / "control.sock"
    d = daemon(["--proxy-url", upstreams.dante.url, "--control-socket", str(sock)], workers=2)
    procs = serving_workers(d, 2)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    lab.run(lab.client, ["curl", "-sS", "-o", "/dev/null", "--max-time", "20", f"http://{INET_V4}:{TEST_PORT}/x"],
            timeout=30)

    def members_reported():
        r = status("--json", "--control-socket", str(sock))
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        return s if s["members"] and s["total"] >= 2 else None  # the readiness probe and the curl

    s = wait_for(members_reported, 10, "a heartbeat with the members")
    assert s["master"] == d.pid
    assert s["generation"] == 1
    assert sorted(w["pid"] for w in s["workers"]) == sorted(p.pid for p in procs)
    for w in s["workers"]:
        assert w["state"] == "serving" and w["generation"] == 1
        assert w["rss"] > 0 and w["fds"] > 0 and w["age"] >= 0
    default = [m for m in s["members"] if m["pool"] == "default"]
    assert [m["member"] for m in default] == [upstreams.dante.url]
    assert default[0]["health"] == "up" and default[0]["dials"] == 1

    r = status("--control-socket", str(sock))
    assert r.returncode == 0, r.stderr
    assert f"master {d.pid}  generation 1" in r.stdout
    for p in procs:
        assert str(p.pid) in r.stdout
    assert upstreams.dante.url in r.stdout

    d.stop()
    assert not sock.exists()  # the master removes its socket at exit


def test_status_without_daemon(sockdir):
    r = status("--control-socket", str(sockdir / "none.sock"))
    assert r.returncode == 1
    assert "no daemon running" in r.stderr


def test_status_permission_denied(lab, upstreams, daemon, sockdir):
    sock = sockdir / "control.sock"
    daemon(["--proxy-url", upstreams.dante.url, "--control-socket", str(sock)])
    wait_for(lambda: sock.exists(), 10, "control socket")
    r = status("--control-socket", str(sock), user="nobody")
    assert r.returncode == 1, r.stdout
    assert "permission denied" in r.stderr and "root" in r.stderr


def test_status_lists_every_member_of_a_5000_member_pool(lab, daemon, sockdir):
    """One member name behind 5,000 addresses (the namespace's hosts file): the workers' heartbeats
    carry them all to `status`, and the workers stay (on main the report was one datagram: cut at
    64 KiB, refused above ~208 KiB, and a refused heartbeat stopped the worker as if its master had gone)."""
    sock = sockdir / "control.sock"
    addrs = [f"2001:db8:5000::{i:x}" for i in range(1, 5001)]
    with hosts_overlay(lab, lab.client, {"edges.test": addrs}):
        # A short health timeout: the first round's checks (which change all 5000 entries) fail sooner.
        d = daemon(["--proxy-url", "socks5://edges.test:1080", "--control-socket", str(sock),
                    "--health-timeout", "1"], workers=2)
        wait_log(d, "edges.test resolves to", timeout=30)
        first = {p.pid for p in serving_workers(d, 2, timeout=30)}

        def every_check_reported():
            """All 5000 members in status, each with its failed first check (one status call per
            poll: each costs a second or two here)."""
            r = status("--json", "--control-socket", str(sock))
            assert r.returncode == 0, r.stderr
            s = json.loads(r.stdout)
            edges = [m for m in s["members"] if m["pool"] == "default"]
            return (s, edges) if len(edges) == 5000 and all(m["last_error"] for m in edges) else None

        s, edges = wait_for(every_check_reported, 30, "5000 members, each with its failed health check, in status")
        assert {m["member"] for m in edges} == {f"socks5://[{a}]:1080" for a in addrs}
        assert sorted(w["pid"] for w in s["workers"]) == sorted(first)
        time.sleep(3)
        assert {p.pid for p in serving_workers(d, 2)} == first, d.log_text()[-3000:]
        text = d.log_text()
        assert "is gone" not in text and "died" not in text and "Traceback" not in text, text[-3000:]
        r = status("--control-socket", str(sock))
        assert r.returncode == 0 and r.stdout.count("socks5://[2001:db8:5000::") == 5000
