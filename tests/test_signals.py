"""Stopping the real daemon under REDIRECT: what TERM does to relayed transfers."""

from __future__ import annotations

import signal
import time

import pytest

from tests.test_runtime import MiB, connect, serving_workers

pytestmark = pytest.mark.netns


def test_term_resets_relayed_transfers_and_logs_them(lab, upstreams, daemon, tmp_path):
    access = tmp_path / "access.log"
    d = daemon(["--proxy-url", upstreams.dante.url, "--access-log", str(access), "--graceful-timeout", "30"],
               workers=2)
    serving_workers(d, 2)
    cut = []
    for i in range(3):
        s = connect(lab, timeout=15)
        s.sendall(f"GET {200 * MiB} term{i}\n".encode())
        assert s.recv(65536)
        cut.append(s)
    d.send_signal(signal.SIGTERM)
    started = time.monotonic()
    for s in cut:
        with pytest.raises(ConnectionResetError):
            while s.recv(1 << 20):
                pass
        s.close()
    assert d.proc.wait(10) == 0
    assert time.monotonic() - started < 5, "TERM must not wait for connections"
    lines = [ln for ln in access.read_text().splitlines() if "outcome=" in ln]
    shutdown = [ln for ln in lines if "outcome=shutdown" in ln]
    assert len(shutdown) == 3, lines
    assert all("sent=" in ln and "received=" in ln for ln in shutdown)


def test_quit_refuses_new_connections_while_old_ones_drain(lab, upstreams, daemon):
    """During a graceful stop nobody accepts any more: a new connection must be
    refused at once, not left waiting in a queue until the last transfer ends."""
    d = daemon(["--proxy-url", upstreams.dante.url, "--graceful-timeout", "30"], workers=2)
    serving_workers(d, 2)
    held = connect(lab, timeout=30)
    held.sendall(b"HOLD\n")
    time.sleep(0.2)
    d.send_signal(signal.SIGQUIT)
    time.sleep(0.5)
    with pytest.raises(ConnectionRefusedError):
        connect(lab, timeout=5)
    assert d.proc.poll() is None  # still draining the held connection
    held.close()
    assert d.proc.wait(15) == 0
