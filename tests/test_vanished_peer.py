"""A client that vanishes mid-download (its packets dropped) is let go within tcp_user_timeout."""

from __future__ import annotations

import contextlib
import time

import pytest

from tests.lab.netns import CLIENT_V4
from tests.test_runtime import MiB, connect, serving_workers, wait_for

pytestmark = pytest.mark.netns

USER_TIMEOUT = 3.0


def test_vanished_client_mid_download_is_reset_within_user_timeout(lab, upstreams, daemon, tmp_path):
    access = tmp_path / "access.log"
    d = daemon(["--proxy-url", upstreams.dante.url, "--access-log", str(access),
                "--tcp-user-timeout", str(USER_TIMEOUT)], workers=1)
    serving_workers(d, 1)
    s = connect(lab, timeout=30)
    port = s.getsockname()[1]
    s.sendall(f"GET {500 * MiB} gone\n".encode())
    assert s.recv(65536)
    rules = [["OUTPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"],
             ["OUTPUT", "-p", "tcp", "--sport", str(port), "-j", "DROP"]]
    for rule in rules:
        lab.iptables(d.ns, "-I", *rule)
    dropped = time.monotonic()
    try:
        s.settimeout(1.0)
        with contextlib.suppress(TimeoutError):  # what was in flight, if anything; then nothing is acknowledged
            s.recv(1 << 20)
        line = wait_for(lambda: [ln for ln in access.read_text().splitlines() if f"client={CLIENT_V4}:{port} " in ln]
                        if access.exists() else None, USER_TIMEOUT + 15, "the relay to end")
        took = time.monotonic() - dropped
        assert "outcome=reset" in line[0], line
        assert took < USER_TIMEOUT + 15
        out = lab.run(d.ns, ["ss", "-Htn", "state", "established", f"dport = :{port}"]).stdout
        assert not out.strip(), out
    finally:
        for rule in rules:
            lab.iptables(d.ns, "-D", *rule, check=False)
        s.close()
