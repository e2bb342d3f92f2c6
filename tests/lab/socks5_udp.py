"""UDP through a SOCKS5 server in the lab: a small RFC 1928 UDP client, a recording UDP
listener, and dnsmasq as the Internet's DNS server.

The client is ours (curl cannot do UDP and dante is a server); everything it
sends is built by the shared codec in `transocks.wire.socks5`, or by hand for
what well-behaved clients never send.  Security tests decide by what reached
the `DatagramRecorder` (and from which source address), never by usocksd's log.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tests.lab.netns import Lab
from transocks.core.netutil import Endpoint
from transocks.wire import socks5

RECV_TIMEOUT = 3.0


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {buf!r}")
        buf += chunk
    return buf


class Socks5Udp:
    """One UDP association from the client namespace: a TCP control connection and a UDP socket.

    `send` wraps a payload for a destination (host or name); `recv` unwraps what
    comes back: (source endpoint, payload), or None when nothing arrives in time.
    """

    def __init__(self, lab: Lab, ns: str, proxy: tuple[str, int], source: str | None = None,
                 request: Endpoint | None = None, udp_source: str | None = None) -> None:
        with lab.netns(ns):
            self.control = socket.create_connection(proxy, timeout=10,
                                                    source_address=(source, 0) if source else None)
            self.control.sendall(socks5.greeting(bytes([socks5.NO_AUTH])))
            assert _recv_exact(self.control, 2) == b"\x05\x00"
            local = self.control.getsockname()[0]
            self.control.sendall(socks5.udp_associate_request(request or Endpoint(
                "0.0.0.0" if "." in local else "::", 0)))
            ver, self.rep, _, atyp = _recv_exact(self.control, 4)
            assert ver == 5
            self.bound = socks5.read_address(lambda n: _recv_exact(self.control, n), atyp)
            host = udp_source or local
            self.udp = socket.socket(_family(host), socket.SOCK_DGRAM)
            self.udp.bind((host, 0))
        self.udp.settimeout(RECV_TIMEOUT)

    @property
    def relay(self) -> tuple[str, int]:
        return self.bound.host, self.bound.port

    def send_raw(self, datagram: bytes) -> None:
        self.udp.sendto(datagram, self.relay)

    def send(self, host: str, port: int, payload: bytes, frag: int = 0) -> None:
        datagram = socks5.udp_datagram(socks5.encode_address(Endpoint(host, port)), payload)
        self.send_raw(datagram[:2] + bytes([frag]) + datagram[3:])

    def recv(self, timeout: float = RECV_TIMEOUT) -> tuple[Endpoint, bytes] | None:
        self.udp.settimeout(timeout)
        try:
            data, _ = self.udp.recvfrom(65536)
        except TimeoutError:
            return None
        frag, source, offset = socks5.parse_udp_datagram(data)
        assert frag == 0
        return source, data[offset:]

    def close(self) -> None:
        self.control.close()
        self.udp.close()


@dataclass(frozen=True)
class Datagram:
    """One datagram that reached a recorder: where (host, port), from whom, what."""

    host: str
    port: int
    peer: str
    peer_port: int
    data: bytes


class DatagramRecorder:
    """UDP sockets on `endpoints` in `ns` that record every datagram and answer ``seen <peer>``
    (when `echo`), so a test knows what reached which address from which source."""

    def __init__(self, lab: Lab, ns: str, endpoints: list[tuple[str, int]], echo: bool = True) -> None:
        self.got: list[Datagram] = []
        self.echo = echo
        self._lock = threading.Lock()
        self._open = True
        self.socks: list[socket.socket] = []
        self._threads = []
        for host, port in endpoints:
            with lab.netns(ns):
                s = socket.socket(_family(host), socket.SOCK_DGRAM)
            s.bind((host, port))
            s.settimeout(0.1)  # a blocked recv is not woken by close: poll
            self.socks.append(s)
            t = threading.Thread(target=self._run, args=(s, host, port), daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self, sock: socket.socket, host: str, port: int) -> None:
        while self._open:
            try:
                data, peer = sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.got.append(Datagram(host, port, peer[0], peer[1], data))
            if self.echo:
                with contextlib.suppress(OSError):
                    sock.sendto(b"seen " + peer[0].encode() + b" " + data, peer[:2])

    def at(self, host: str, port: int | None = None) -> list[Datagram]:
        with self._lock:
            return [d for d in self.got if d.host == host and port in (None, d.port)]

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Datagram]:
        deadline = time.monotonic() + timeout
        while len(self.got) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            return list(self.got)

    def close(self) -> None:
        self._open = False
        for t in self._threads:
            t.join(5)
        for s in self.socks:
            s.close()


@contextlib.contextmanager
def recording(lab: Lab, ns: str, endpoints: list[tuple[str, int]], echo: bool = True) -> Iterator[DatagramRecorder]:
    recorder = DatagramRecorder(lab, ns, endpoints, echo)
    try:
        yield recorder
    finally:
        recorder.close()


# --- DNS: dnsmasq in the Internet namespace, and a query built by hand ----------------------


@contextlib.contextmanager
def dnsmasq(lab: Lab, ns: str, addresses: list[str], records: dict[str, list[str]]) -> Iterator[subprocess.Popen]:
    """dnsmasq answering `records` (name -> addresses) on port 53 of `addresses`, and nothing
    else: no upstream servers, no /etc/hosts, no resolv.conf; stopped by pid."""
    argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--bind-interfaces", "--pid-file=", "--user=root", "--port=53", "--log-facility=-"]
    argv += [f"--listen-address={a}" for a in addresses]
    argv += [f"--host-record={name},{','.join(addrs)}" for name, addrs in records.items()]
    proc = lab.popen(ns, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        probe = dns_query("ready.probe", 1, 0)
        while True:  # ready once it answers (an NXDOMAIN is an answer)
            if proc.poll() is not None:
                raise AssertionError(f"dnsmasq exited with {proc.returncode}")
            try:
                ask_directly(lab, ns, addresses[0], probe, timeout=0.2)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
        yield proc
    finally:
        lab.stop(proc)


def dns_query(name: str, qtype: int = 1, qid: int = 0x5353) -> bytes:
    """A recursive query for `name` (qtype 1 is A, 28 AAAA), class IN."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", qtype, 1)


def ask_directly(lab: Lab, ns: str, server: str, query: bytes, timeout: float = RECV_TIMEOUT) -> bytes:
    """The server's answer to `query`, asked from `ns` without any proxy: the reference bytes."""
    with lab.netns(ns):
        s = socket.socket(_family(server), socket.SOCK_DGRAM)
    with s:
        s.settimeout(timeout)
        s.sendto(query, (server, 53))
        return s.recvfrom(65536)[0]
