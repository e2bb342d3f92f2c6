"""Host names for one namespace from an /etc overlay: hosts, plus nsswitch "files" only and a
resolv.conf pointing at the namespace's own loopback, so no lookup can become DNS traffic.

`ip netns exec` bind-mounts /etc/netns/<ns>/<file> over /etc/<file> for the
processes it starts, so only processes started while the overlay exists see it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from .netns import Lab


@contextlib.contextmanager
def hosts_overlay(lab: Lab, ns: str, names: Mapping[str, Sequence[str]]) -> Iterator[None]:
    """Resolve `names` (name -> addresses) in `ns` while the block runs."""
    etc = lab.etc_dir(ns)
    lines = [Path("/etc/hosts").read_text(), ""]
    lines += [f"{addr} {name}" for name, addrs in names.items() for addr in addrs]
    nsswitch = [("hosts: files" if ln.startswith("hosts:") else ln)
                for ln in Path("/etc/nsswitch.conf").read_text().splitlines()]
    files = {
        "hosts": "\n".join(lines) + "\n",
        "nsswitch.conf": "\n".join(nsswitch) + "\n",
        "resolv.conf": "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    }
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
