"""transocks through HTTP CONNECT proxies that send interim (1xx) responses or status lines with
non-ASCII digits, over real iptables REDIRECT in the lab: a tunnel, or an outcome with its
access-log line (never a traceback)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.lab import servers
from tests.lab.netns import GW_V4, INET_V4, TEST_PORT
from tests.test_datapath import (
    FakeUpstream,
    connect,
    expect_reset_on_connect,
    stop_accepting,
    wait_log,
)

pytestmark = pytest.mark.netns

INTERIM = [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
           b"HTTP/1.1 102 Processing\r\n\r\n"]


class InterimProxy:
    """An HTTP CONNECT proxy in the gw namespace that sends 1xx responses (one segment each)
    before its 200, then relays to the requested destination."""

    def __init__(self, lab, port: int) -> None:
        self.lab = lab
        with lab.netns(lab.gw):
            self.sock = socket.create_server((GW_V4, port), backlog=16)
        self.port = port
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            target = head.split(b" ", 2)[1].decode()
            host, _, port = target.rpartition(":")
            with self.lab.netns(self.lab.gw):
                upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
            with upstream:
                for reply in INTERIM:
                    conn.sendall(reply)
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                pump = threading.Thread(target=_copy, args=(upstream, conn), daemon=True)
                pump.start()
                _copy(conn, upstream)
                pump.join(10)

    def close(self) -> None:
        stop_accepting(self.sock, self.thread)


def _copy(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def access_lines(d) -> list[dict]:
    """The access-log lines of redirected connections (not the start-up probe's)."""
    lines = [json.loads(ln) for ln in d.log_text().splitlines() if ln.startswith("{")]
    return [line for line in lines if line["dest"] == f"{INET_V4}:{TEST_PORT}"]


def test_interim_responses_before_the_final_status_are_skipped(lab, daemon):
    proxy = InterimProxy(lab, 1994)
    try:
        d = daemon(["--proxy-url", f"http://{GW_V4}:{proxy.port}", "--access-log-format", "json"])
        for size in (1000, 200_000):
            s = connect(lab, INET_V4)
            assert servers.get(s, size) == (servers.expected_sha(size), size)
            s.close()
        deadline = time.monotonic() + 5
        while len(access_lines(d)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [line["outcome"] for line in access_lines(d)] == ["ok", "ok"]
    finally:
        proxy.close()


BAD_DIGITS = [b"HTTP/1.1 \xb2\xb2\xb2 OK\r\n\r\n", "HTTP/1.1 \u0662\u0660\u0660 OK\r\n\r\n".encode(),
              "HTTP/1.1 \uff12\uff10\uff10 OK\r\n\r\n".encode(), b"HTTP/1.1 100 Continue\r\n\r\n" * 9]


def test_status_lines_with_non_ascii_digits_are_protocol_errors(lab, daemon):
    fake = FakeUpstream(lab, 1993, BAD_DIGITS)
    try:
        d = daemon(["--proxy-url", f"http://{GW_V4}:1993", "--handshake-timeout", "2", "--access-log-format", "json",
                    "--health-interval", "0"])  # a health probe would take one of the canned replies
        for _ in BAD_DIGITS:
            expect_reset_on_connect(lab, INET_V4, TEST_PORT, within=3.0)
        wait_log(d, "more than 8 interim responses")
        deadline = time.monotonic() + 5
        while len(access_lines(d)) < len(BAD_DIGITS) and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = access_lines(d)
        assert [line["outcome"] for line in lines] == ["protocol_error"] * len(BAD_DIGITS), lines
        assert sum("http bad status line" in line.get("reason", "") for line in lines) == 3
        assert "Traceback" not in d.log_text()
        assert d.proc.poll() is None
    finally:
        fake.close()
