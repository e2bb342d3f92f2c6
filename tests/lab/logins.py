"""A distributed wrong-password flood on usocksd and the uncached logins of a good client during it.

Shared by the suite (tests/test_usocksd.py) and the bench (`python -m bench.logins`).  The flood's
sources are extra addresses on the client namespace's interface (FLOOD_V4, inside the client
network usocksd allows); each source runs `per_source` connections in a loop, each sending a new
wrong password, as fast as usocksd answers; bounded by `seconds`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import psutil

from tests.usocksd_fixtures import recv_exact

from .netns import CLIENT_IF, GW_V4, Lab
from .threads import ThreadedLoad

FLOOD_V4 = [f"192.0.2.{n}" for n in range(100, 200)]  # 100 sources


@contextlib.contextmanager
def flood_addresses(lab: Lab, addrs: list[str] = FLOOD_V4) -> Iterator[list[str]]:
    """The flood's source addresses on the client's interface, removed afterwards (one `ip -batch`
    each way: a process per address cost seconds)."""
    try:
        lab.run(lab.client, ["ip", "-batch", "-"], input="".join(f"addr add {a}/24 dev {CLIENT_IF}\n" for a in addrs))
        yield addrs
    finally:
        lab.run(lab.client, ["ip", "-force", "-batch", "-"], check=False,
                input="".join(f"addr del {a}/24 dev {CLIENT_IF}\n" for a in addrs))


def login(lab: Lab, port: int, user: bytes, password: bytes, source: str | None = None,
          timeout: float = 10.0) -> tuple[int, float]:
    """One SOCKS5 user/password login from the client namespace: (RFC 1929 status, seconds from
    connect to the status)."""
    with lab.netns(lab.client):
        s = socket.create_connection((GW_V4, port), timeout=timeout, source_address=(source, 0) if source else None)
    with s:
        started = time.monotonic()
        s.sendall(b"\x05\x01\x02")
        if recv_exact(s, 2) != b"\x05\x02":
            raise EOFError("no user/password method")
        s.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
        status = recv_exact(s, 2)[1]
        return status, time.monotonic() - started


class LoginFlood(ThreadedLoad):
    """Wrong passwords from every source in `sources`, `per_source` connections each."""

    join_timeout = 15.0

    def __init__(self, lab: Lab, port: int, sources: list[str], per_source: int = 2, seconds: float = 30.0) -> None:
        super().__init__()
        self.lab, self.port, self.seconds = lab, port, seconds
        self.refused = 0  # wrong password answered (status 1)
        self.errors = 0  # closed, reset or timed out
        self.threads = [threading.Thread(target=self._run, args=(src, n), daemon=True)
                        for src in sources for n in range(per_source)]

    def _run(self, source: str, n: int) -> None:
        deadline = time.monotonic() + self.seconds
        attempt = 0
        while not self.stop.is_set() and time.monotonic() < deadline:
            attempt += 1
            try:
                status, _ = login(self.lab, self.port, b"alice", f"wrong-{source}-{n}-{attempt}".encode(), source)
                self.refused += status != 0
            except (OSError, EOFError):
                self.errors += 1
                time.sleep(0.05)


class PeakRSS:
    """The highest RSS of a process, sampled every 50 ms while in the block."""

    def __init__(self, proc: psutil.Process) -> None:
        self.proc = proc
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def good_logins(lab: Lab, port: int, users: dict[str, str], source: str, interval: float = 0.1,
                until: float = float("inf")) -> list[float]:
    """Each user logs in once (so every login is uncached), one after another until the monotonic
    time `until`: the seconds each took; a login that fails or is refused counts as infinity."""
    out: list[float] = []
    for user, password in users.items():
        if time.monotonic() > until:
            break
        try:
            status, took = login(lab, port, user.encode(), password.encode(), source)
            out.append(took if status == 0 else float("inf"))
        except (OSError, EOFError):
            out.append(float("inf"))
        time.sleep(interval)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
