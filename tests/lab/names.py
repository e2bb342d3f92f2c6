"""Host names for one namespace from an /etc overlay: hosts, plus nsswitch "files" only and a
resolv.conf pointing at the namespace's own loopback, so no lookup can become DNS traffic.

`ip netns exec` bind-mounts /etc/netns/<ns>/<file> over /etc/<file> for the
processes it starts, so only processes started while the overlay exists see it.
A running process sees a later rewrite of a file in place (same inode):
`rewrite_hosts` and `dns_lookups` change answers and lookup paths that way.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from .netns import Lab

FILES_ONLY = "hosts: files"
NO_DNS = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"


def _hosts_text(names: Mapping[str, Sequence[str]]) -> str:
    lines = [Path("/etc/hosts").read_text(), ""]
    lines += [f"{addr} {name}" for name, addrs in names.items() for addr in addrs]
    return "\n".join(lines) + "\n"


def _nsswitch_text(hosts_line: str) -> str:
    return "\n".join((hosts_line if ln.startswith("hosts:") else ln)
                     for ln in Path("/etc/nsswitch.conf").read_text().splitlines()) + "\n"


@contextlib.contextmanager
def hosts_overlay(lab: Lab, ns: str, names: Mapping[str, Sequence[str]]) -> Iterator[None]:
    """Resolve `names` (name -> addresses) in `ns` while the block runs."""
    etc = lab.etc_dir(ns)
    files = {"hosts": _hosts_text(names), "nsswitch.conf": _nsswitch_text(FILES_ONLY), "resolv.conf": NO_DNS}
    written = []
    try:
        for name, text in files.items():
            path = etc / name
            assert not path.exists(), f"{path} exists already"
            path.write_text(text)
            path.chmod(0o644)
            written.append(path)
        yield
    finally:
        for path in written:
            path.unlink(missing_ok=True)


def _rewrite(path: Path, text: str) -> None:
    """In place, so the bind mounts of running processes show it."""
    with open(path, "w") as f:
        f.write(text)


def rewrite_hosts(lab: Lab, ns: str, names: Mapping[str, Sequence[str]]) -> None:
    """Replace the answers of a `hosts_overlay` of `ns` (for rotating round-robin answers)."""
    _rewrite(lab.etc_dir(ns) / "hosts", _hosts_text(names))


@contextlib.contextmanager
def dns_lookups(lab: Lab, ns: str, server: str, timeout: int = 2) -> Iterator[None]:
    """Within a `hosts_overlay` of `ns`: names missing from the hosts file are asked of the DNS
    server `server` (one try, `timeout` seconds) while the block runs."""
    etc = lab.etc_dir(ns)
    _rewrite(etc / "nsswitch.conf", _nsswitch_text("hosts: files dns"))
    _rewrite(etc / "resolv.conf", f"nameserver {server}\noptions timeout:{timeout} attempts:1\n")
    try:
        yield
    finally:
        _rewrite(etc / "nsswitch.conf", _nsswitch_text(FILES_ONLY))
        _rewrite(etc / "resolv.conf", NO_DNS)


class SilentDns:
    """A UDP "DNS server" on `host`:53 in `ns` that counts the queries it gets and never answers."""

    def __init__(self, lab: Lab, ns: str, host: str = "127.0.0.1") -> None:
        self.host = host
        self.queries = 0
        self._open = True
        with lab.netns(ns):
            self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, 53))
        self._sock.settimeout(0.1)  # a blocked recv is not woken by close: poll for it
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._sock:
            while self._open:
                try:
                    self._sock.recv(4096)
                except TimeoutError:
                    continue
                self.queries += 1

    def close(self) -> None:
        self._open = False
        self._thread.join(5)
