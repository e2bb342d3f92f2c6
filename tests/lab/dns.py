"""A real DNS server for the "Internet": dnsmasq in the inet namespace, and what reached it.

dnsmasq answers only the names it is given (no upstream, no hosts file, no
cache of anything else) and logs every query with its source address and port
(`--log-queries=extra`), so a test decides where a client's query came from by
dnsmasq's own record of it, not by the proxy's log.  `query`/`exchange` build
and send one raw query from a namespace, for byte-exact comparisons of what a
proxy relays against what the server answers directly.
"""

from __future__ import annotations

import re
import secrets
import socket
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .netns import INET_V4, INET_V6, Lab
from .services import Service, _spawn, wait_listening
from .udp import send_and_receive
from .upstreams import _workdir

DNS_PORT = 53
QTYPES = {"A": 1, "AAAA": 28, "TXT": 16}
# "1 198.51.100.1/40113 query[A] www.example from 198.51.100.1" (--log-queries=extra)
_QUERY_LINE = re.compile(r"dnsmasq\[\d+\]: (\d+) ([0-9a-fA-F.:]+)/(\d+) query\[(\w+)\] (\S+) from ")


@dataclass(frozen=True)
class Query:
    """One query dnsmasq received: from which address and port, for which name and type."""

    source: str
    port: int
    qtype: str
    name: str


@dataclass
class Dnsmasq:
    """dnsmasq serving `records` on `hosts` in the inet namespace."""

    service: Service
    hosts: tuple[str, ...]
    port: int
    log_path: Path

    def queries(self) -> list[Query]:
        """Every query received so far, oldest first."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [Query(m.group(2), int(m.group(3)), m.group(4), m.group(5)) for m in _QUERY_LINE.finditer(text)]

    def wait_queries(self, count: int, name: str | None = None, timeout: float = 5.0) -> list[Query]:
        """The queries (for `name`, if given) once there are at least `count` of them."""
        deadline = time.monotonic() + timeout
        while True:
            got = [q for q in self.queries() if name is None or q.name == name]
            if len(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.05)


def start_dnsmasq(lab: Lab, records: Mapping[str, Sequence[str]], *, txt: Mapping[str, str] | None = None,
                  hosts: Iterable[str] = (INET_V4, INET_V6), port: int = DNS_PORT, ttl: int = 300,
                  log_queries: bool = True, workdir: Path | None = None) -> Dnsmasq:
    """dnsmasq in the inet namespace answering `records` (name -> addresses, both families) and
    `txt` (name -> text) with `ttl`, nothing else (REFUSED/NXDOMAIN for the rest), on UDP and TCP.
    Without `log_queries` (a load's server) `queries()` stays empty."""
    hosts = tuple(hosts)
    svc = Service("dnsmasq", lab.inet, port, _workdir(lab, "dnsmasq", workdir))
    log = svc.workdir / "queries.log"
    argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--no-poll", "--bind-interfaces", "--user=nobody", "--group=nogroup", f"--port={port}",
            f"--pid-file={svc.workdir / 'dnsmasq.pid'}", f"--log-facility={log}", f"--local-ttl={ttl}",
            "--cache-size=0", *(["--log-queries=extra", "--log-async=0"] if log_queries else [])]
    argv += [f"--listen-address={h}" for h in hosts]
    argv += [f"--host-record={name},{','.join(addrs)},{ttl}" for name, addrs in records.items()]
    argv += [f"--txt-record={name},{text}" for name, text in (txt or {}).items()]
    _spawn(lab, svc, argv, "dnsmasq.stderr")
    svc.log_paths.append(log)
    wait_listening(lab, svc)
    return Dnsmasq(svc, hosts, port, log)


def query(name: str, qtype: str = "A", qid: int | None = None) -> bytes:
    """A standard recursive query for `name` (no EDNS): what `dig +noedns` sends."""
    qid = secrets.randbits(16) if qid is None else qid
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack("!HH", QTYPES[qtype], 1)


def answer_addresses(reply: bytes) -> list[str]:
    """The A and AAAA addresses in a reply's answer section (names compressed or not)."""
    qd, an = struct.unpack("!HH", reply[4:8])
    pos = 12
    for _ in range(qd):
        pos = _skip_name(reply, pos) + 4
    out = []
    for _ in range(an):
        pos = _skip_name(reply, pos)
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", reply[pos:pos + 10])
        rdata = reply[pos + 10:pos + 10 + rdlen]
        if rtype == QTYPES["A"]:
            out.append(socket.inet_ntop(socket.AF_INET, rdata))
        elif rtype == QTYPES["AAAA"]:
            out.append(socket.inet_ntop(socket.AF_INET6, rdata))
        pos += 10 + rdlen
    return out


def _skip_name(msg: bytes, pos: int) -> int:
    while msg[pos]:
        if msg[pos] & 0xC0 == 0xC0:
            return pos + 2
        pos += 1 + msg[pos]
    return pos + 1


def exchange(lab: Lab, ns: str, server: str, payload: bytes, port: int = DNS_PORT,
             timeout: float = 5.0) -> tuple[bytes, tuple[str, int]]:
    """Send one datagram from `ns` on an unconnected socket and return the first reply and the
    address it came from (`udp.send_and_receive`: a reply from the wrong source shows up here
    instead of being filtered by the kernel)."""
    return send_and_receive(lab, ns, (server, port), payload, timeout)


@dataclass(frozen=True)
class Dig:
    """What `dig` printed: the answers and the server it says replied."""

    status: str
    answers: list[str]
    server: str
    stdout: str


def dig(lab: Lab, ns: str, server: str, name: str, qtype: str = "A", port: int = DNS_PORT,
        timeout: float = 3, tries: int = 1, extra: Sequence[str] = ()) -> Dig:
    """`dig @server name qtype` from `ns` over UDP (bind9-dnsutils; dig drops replies from any other
    address than the one it asked)."""
    argv = ["dig", f"@{server}", "-p", str(port), name, qtype, "+notcp", f"+time={timeout}", f"+tries={tries}",
            "+nocookie", *extra]
    res = lab.run(ns, argv, check=False, timeout=timeout * tries + 10)
    status = re.search(r"status: (\w+)", res.stdout)
    srv = re.search(r";; SERVER: (\S+)", res.stdout)
    answers = []
    section = re.search(r";; ANSWER SECTION:\n(.*?)\n\n", res.stdout, re.S)
    if section:
        answers = [line.split()[-1] for line in section.group(1).splitlines() if line and not line.startswith(";")]
    return Dig(status.group(1) if status else "", answers, srv.group(1) if srv else "", res.stdout + res.stderr)
