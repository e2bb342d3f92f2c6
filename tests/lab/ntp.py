"""A real NTP exchange that can never touch this machine's clock: chronyd serving in the inet
namespace, and `chronyd -Q` (query only) as the client.

Both sides are chrony 4 and neither may adjust the clock, three times over: the server runs
with `-x` (no control of the system clock; it serves from its `local stratum`), the client with
`-Q` (print the offset, never correct it), and both start with CAP_SYS_TIME out of their
bounding set (`setpriv`), the client moreover as `nobody` with no capabilities at all, so a
wrong flag would meet EPERM rather than the clock.  Which addresses reached the server, and
how many requests each sent, is read from the server itself (`chronyc clients` over its
private command socket), not from any proxy's log.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .netns import INET_V4, INET_V6, Lab
from .services import Service, _spawn
from .upstreams import _workdir

NTP_PORT = 123
STARTUP_TIMEOUT = 10.0
# chronyd must never be able to set or slew the clock, whatever its flags say.
NO_CLOCK = ["setpriv", "--bounding-set=-sys_time"]
UNPRIVILEGED = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all"]
_OFFSET = re.compile(r"System clock wrong by (-?[\d.]+) seconds \(ignored\)")


@dataclass(frozen=True)
class NtpClient:
    """One address the server has heard from (`chronyc clients`): NTP requests and drops."""

    address: str
    requests: int
    dropped: int


@dataclass
class Chronyd:
    """chronyd serving NTP (never setting the clock) on `hosts` in the inet namespace."""

    service: Service
    hosts: tuple[str, ...]
    socket: Path

    def clients(self, lab: Lab) -> dict[str, NtpClient]:
        """Who sent NTP requests so far, by address."""
        res = lab.run(self.service.ns, ["chronyc", "-h", str(self.socket), "-n", "-c", "clients"], check=False)
        out = {}
        for line in res.stdout.splitlines():
            fields = line.split(",")
            if len(fields) >= 3 and fields[1].isdigit():
                out[fields[0]] = NtpClient(fields[0], int(fields[1]), int(fields[2]))
        return out


def start_chronyd(lab: Lab, hosts: Iterable[str] = (INET_V4, INET_V6), stratum: int = 8,
                  workdir: Path | None = None) -> Chronyd:
    """chronyd -x in the inet namespace, answering NTP on `hosts` port 123 from its local clock."""
    hosts = tuple(hosts)
    svc = Service("chronyd", lab.inet, NTP_PORT, _workdir(lab, "chronyd", workdir))
    run = svc.workdir / "run"  # chronyd wants its socket directory private (no group/other write)
    run.mkdir(mode=0o750)
    sock = run / "chronyd.sock"
    conf = svc.workdir / "chrony.conf"
    conf.write_text("\n".join([
        f"port {NTP_PORT}",
        *(f"bindaddress {h}" for h in hosts),
        f"local stratum {stratum}",
        "allow all",
        "cmdport 0",
        f"bindcmdaddress {sock}",
        f"pidfile {svc.workdir / 'chronyd.pid'}",
    ]) + "\n")
    _spawn(lab, svc, [*NO_CLOCK, "chronyd", "-d", "-x", "-u", "root", "-f", str(conf)], "chronyd.log")
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not sock.exists():
        if svc.procs[0].poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"chronyd not ready (rc={svc.procs[0].poll()}):\n{svc.log_text()}")
        time.sleep(0.05)
    return Chronyd(svc, hosts, sock)


@dataclass(frozen=True)
class NtpQuery:
    """What `chronyd -Q` reported: the offset it measured (None when it got no answer)."""

    offset: float | None
    returncode: int
    output: str


def ntp_query(lab: Lab, ns: str, server: str, timeout: int = 8, workdir: Path | None = None) -> NtpQuery:
    """One NTP request/response from `ns` to `server` by `chronyd -Q` run as nobody without
    capabilities (`iburst maxsamples 1`: one request, one answer); never touches the clock."""
    where = workdir or lab.tempdir("chronyq")
    pidfile = where / f"q-{time.monotonic_ns()}.pid"
    argv = [*UNPRIVILEGED, "chronyd", "-Q", "-t", str(timeout), f"server {server} iburst maxsamples 1",
            f"pidfile {pidfile}"]
    res = lab.run(ns, argv, check=False, timeout=timeout + 10)
    text = res.stdout + res.stderr
    m = _OFFSET.search(text)
    return NtpQuery(float(m.group(1)) if m else None, res.returncode, text)
