"""TLS for the lab: a CA made by the test with openssl, and `openssl s_server` as the HTTPS server.

The CA and the server certificate (one certificate whose subjectAltName lists
every test name) live in a lab temp dir; clients trust only that CA
(`curl --cacert`, `openssl s_client -CAfile`), so a successful handshake proves
the name reached the server and the bytes arrived whole: a ClientHello with a
byte lost, duplicated or reordered fails the handshake transcript.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .netns import INET_V4, INET_V6, Lab
from .services import Service, _spawn, wait_listening

OPENSSL_DAYS = "2"
T = TypeVar("T")


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA certificate clients trust
    cert: Path  # the server certificate (all names in subjectAltName)
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, text=True)


def make_certs(workdir: Path, names: Sequence[str]) -> Certs:
    """A P-256 CA and a server certificate for `names`, signed by it."""
    workdir.mkdir(parents=True, exist_ok=True)
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _openssl("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.crt", "-days", OPENSSL_DAYS,
             "-subj", "/CN=transocks lab CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign", cwd=workdir)
    _openssl("req", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={names[0]}", cwd=workdir)
    (workdir / "san.ext").write_text("subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n"
                                     "extendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", OPENSSL_DAYS, "-extfile", "san.ext", cwd=workdir)
    for f in workdir.iterdir():
        f.chmod(0o644)
    return Certs(workdir / "ca.crt", workdir / "server.crt", workdir / "server.key")


def start_s_server(lab: Lab, certs: Certs, port: int = 443, hosts: Iterable[str] = (INET_V4, INET_V6),
                   workdir: Path | None = None) -> list[Service]:
    """`openssl s_server -www` in the inet namespace, one per address (it serves one
    connection at a time and answers `GET /` with a status page over HTTP/1.0)."""
    services = []
    for host in hosts:
        wd = workdir or lab.tempdir("s_server")
        svc = Service("s_server", lab.inet, port, wd)
        accept = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        _spawn(lab, svc, ["openssl", "s_server", "-quiet", "-www", "-accept", accept,
                          "-cert", str(certs.cert), "-key", str(certs.key)], f"s_server-{len(services)}.log")
        wait_listening(lab, svc)
        services.append(svc)
    return services


def _step(obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, sock: socket.socket,
          op: Callable[[], T]) -> T:
    """Run one SSLObject operation, moving records over `sock` until it completes."""
    while True:
        try:
            return op()
        except ssl.SSLWantReadError:
            pass
        pending = outgoing.read()
        if pending:
            sock.sendall(pending)
        data = sock.recv(65536)
        if not data:
            raise EOFError("server closed during TLS")
        incoming.write(data)


def reframe(first_flight: bytes, record_cuts: Sequence[int]) -> bytes:
    """The ClientHello record split into several handshake records at `record_cuts`
    (offsets into the handshake message), as RFC 8446 5.1 allows."""
    head, message = first_flight[:3], first_flight[5:]
    assert first_flight[0] == 0x16 and len(message) == int.from_bytes(first_flight[3:5], "big")
    points = [0, *sorted(c for c in record_cuts if 0 < c < len(message)), len(message)]
    return b"".join(head + (b - a).to_bytes(2, "big") + message[a:b] for a, b in zip(points, points[1:]))


def start_client(name: str, ca: Path | None = None) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
    """A TLS client for `name` over memory BIOs, and the first flight (the ClientHello) it sends."""
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return obj, incoming, outgoing, outgoing.read()


def https_get_split(sock: socket.socket, name: str, ca: Path, record_cuts: Sequence[int] = (),
                    segment_cuts: Sequence[int] = (), gap: float = 0.05) -> bytes:
    """`GET /` over TLS on a connected socket, with the ClientHello split into records at
    `record_cuts` and sent in TCP segments cut at `segment_cuts` (`gap` seconds apart);
    returns the whole response."""
    obj, incoming, outgoing, first = start_client(name, ca)
    hello = reframe(first, record_cuts)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    points = [0, *sorted(c for c in segment_cuts if 0 < c < len(hello)), len(hello)]
    for a, b in zip(points, points[1:]):
        sock.sendall(hello[a:b])
        time.sleep(gap)
    _step(obj, incoming, outgoing, sock, obj.do_handshake)
    obj.write(b"GET / HTTP/1.0\r\n\r\n")
    response = b""
    while True:
        try:
            chunk = _step(obj, incoming, outgoing, sock, lambda: obj.read(65536))
        except (EOFError, ssl.SSLZeroReturnError):
            return response
        if not chunk:
            return response
        response += chunk
