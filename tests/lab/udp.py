"""UDP in the lab: a recording echo listener, `iperf3 -u`, TPROXY diversion of a namespace's own
UDP, and redsocks' `redudp` as the C peer.

`UdpRecorder` is the UDP twin of recorder.Recorder: every datagram that reaches one of its
addresses is kept with its peer (so a test decides what reached which address, from whom, by
the server's record) and is answered with ``seen <peer ip> <peer port> `` plus the payload,
from the address it was sent to.  A datagram ``stream`` starts a stream of answers instead
(``tick N`` every STREAM_INTERVAL until `stop_streams()`, STREAM_LIMIT at most): answers that
keep coming while the proxy in between reloads or is replaced.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .netns import INET_NET_V4, INET_NET_V6, TPROXY_MARKS, Lab, Redirect
from .services import Service, _spawn, redsocks_conf
from .upstreams import Upstream, _workdir

STREAM_INTERVAL = 0.2
STREAM_LIMIT = 60.0  # seconds a stream lasts at most, should a test forget to stop it


@dataclass(frozen=True)
class Datagram:
    """One datagram received: the address and port it reached, its peer, its bytes."""

    host: str
    port: int
    peer: str
    peer_port: int
    data: bytes


class UdpRecorder:
    """UDP listeners on `endpoints` (host, port) in `ns` that record every datagram and, when
    `echo`, answer it."""

    def __init__(self, lab: Lab, ns: str, endpoints: Sequence[tuple[str, int]], echo: bool = True) -> None:
        self.received: list[Datagram] = []
        self.echo = echo
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._streaming = threading.Event()
        try:
            for host, port in endpoints:
                with lab.netns(ns):
                    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((host, port))
                self._socks.append(sock)
                threading.Thread(target=self._serve, args=(sock, host, port), daemon=True).start()
        except BaseException:
            self.close()
            raise

    def _serve(self, sock: socket.socket, host: str, port: int) -> None:
        while True:
            try:
                data, peer = sock.recvfrom(65535)
            except OSError:
                return
            if peer is None:  # shut down by close()
                return
            with self._lock:
                self.received.append(Datagram(host, port, peer[0], peer[1], data))
            if not self.echo:
                continue
            if data == b"stream":
                self._streaming.set()
                threading.Thread(target=self._stream, args=(sock, peer), daemon=True).start()
                continue
            with contextlib.suppress(OSError):
                sock.sendto(f"seen {peer[0]} {peer[1]} ".encode() + data, peer)

    def _stream(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        deadline = time.monotonic() + STREAM_LIMIT
        n = 0
        while self._streaming.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                sock.sendto(f"tick {n}".encode(), peer)
            n += 1
            time.sleep(STREAM_INTERVAL)

    def stop_streams(self) -> None:
        """End every stream of answers."""
        self._streaming.clear()

    def at(self, host: str, port: int) -> list[Datagram]:
        """The datagrams that reached host:port so far."""
        with self._lock:
            return [d for d in self.received if (d.host, d.port) == (host, port)]

    def close(self) -> None:
        self.stop_streams()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@contextlib.contextmanager
def recording(lab: Lab, ns: str, endpoints: Sequence[tuple[str, int]], echo: bool = True) -> Iterator[UdpRecorder]:
    """A `UdpRecorder` for the length of a with block."""
    recorder = UdpRecorder(lab, ns, endpoints, echo)
    try:
        yield recorder
    finally:
        recorder.close()


def send_and_receive(lab: Lab, ns: str, dest: tuple[str, int], payload: bytes, timeout: float = 5.0,
                     source: tuple[str, int] | None = None) -> tuple[bytes, tuple[str, int]]:
    """One datagram from `ns` (from `source`, if given) on an unconnected socket; the first reply
    and the address it came from (a reply from the wrong address is seen, not filtered)."""
    family = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
    with lab.netns(ns):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        if source is not None:
            sock.bind(source)
        sock.settimeout(timeout)
        sock.sendto(payload, dest)
        reply, peer = sock.recvfrom(65535)
        return reply, (peer[0], peer[1])


def port_unreachable_after(lab: Lab, ns: str, dest: tuple[str, int], timeout: float = 5.0) -> float:
    """Seconds from sending one datagram on a connected socket to the ICMP port unreachable that
    the kernel reports as ECONNREFUSED on the next receive; raises TimeoutError if none comes.

    A REJECT in the sender's own OUTPUT chain also fails the send itself (EPERM) and queues
    the ICMP error for the receive; from a router only the ICMP error comes back."""
    family = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
    with lab.netns(ns):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(timeout)
        sock.connect(dest)
        started = time.monotonic()
        with contextlib.suppress(PermissionError):
            sock.send(b"\xc0" + bytes(1199))  # the size of a QUIC Initial
        try:
            sock.recv(65535)
        except ConnectionRefusedError:
            return time.monotonic() - started
        except TimeoutError:
            raise TimeoutError(f"no ICMP port unreachable from {dest} within {timeout} s") from None
        raise AssertionError(f"{dest} answered instead of being unreachable")


@dataclass(frozen=True)
class IperfUdp:
    """`iperf3 -u` as the server counted it: datagrams sent and lost, the rate received."""

    mbps: float
    packets: int
    lost: int
    lost_percent: float
    jitter_ms: float
    peers: tuple[str, ...]  # the client addresses the server saw (its control and data connections)


class IperfError(RuntimeError):
    """iperf3 failed or printed no result."""


def iperf3_udp(lab: Lab, ns: str, host: str, port: int, rate: str = "20M", seconds: float = 3,
               length: int = 1200, streams: int = 1) -> IperfUdp:
    """`iperf3 -u -b RATE -l LENGTH` from `ns` to the iperf3 server at host:port (its TCP control
    connection goes the way TCP goes); the loss is what the server counted, and `peers` whom it
    saw (`--get-server-output`: the server's own report)."""
    argv = ["iperf3", "-c", host, "-p", str(port), "-u", "-b", rate, "-l", str(length), "-t", f"{seconds:g}",
            "-P", str(streams), "-J", "--get-server-output"]
    res = lab.run(ns, argv, check=False, timeout=seconds + 30)
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise IperfError(f"iperf3 -u failed ({res.returncode}): {res.stderr or res.stdout}") from None
    if data.get("error") or res.returncode != 0:
        raise IperfError(f"iperf3 -u failed: {data.get('error') or res.stderr}")
    total = data["end"]["sum"]
    received = data["end"].get("sum_received", total)
    # "Accepted connection from 192.0.2.2, port 44030" (control), "... connected to 192.0.2.2 port 58740" (data)
    peers = re.findall(r"(?:Accepted connection from|connected to) ([0-9a-fA-F.:]+),? port",
                       data.get("server_output_text", ""))
    return IperfUdp(mbps=received["bits_per_second"] / 1e6, packets=int(total["packets"]),
                    lost=int(total["lost_packets"]), lost_percent=float(total["lost_percent"]),
                    jitter_ms=float(total["jitter_ms"]), peers=tuple(dict.fromkeys(peers)))


def tproxy_udp(lab: Lab, ns: str, port: int, v4_dst: str | None = INET_NET_V4,
               v6_dst: str | None = INET_NET_V6) -> Redirect:
    """Divert `ns`'s own UDP to the inet networks to `port` on loopback with TPROXY: mark it in
    mangle OUTPUT, route marked packets to `lo`, TPROXY them in mangle PREROUTING on `lo` (the
    routing trick ipt2socks and hev-socks5-tproxy document).  Replies from the proxy's transparent
    sockets go to the client's own address and are not marked; the proxy's upstream (the gw) is
    outside the diverted networks."""
    mark, table = TPROXY_MARKS["udp"]
    redirect = Redirect(lab, ns)
    lab.add_cleanup(redirect.remove)
    tag = f"{hex(mark)}/{hex(mark)}"
    with redirect.undone_on_error():
        for tool, ip, dst in (("iptables", "-4", v4_dst), ("ip6tables", "-6", v6_dst)):
            if dst is None:
                continue
            redirect.deliver_marked_locally(ip, mark, table)
            out = ["OUTPUT", "-p", "udp", "-d", dst, "-j", "MARK", "--set-xmark", tag]
            redirect.add([tool, "-w", "-t", "mangle", "-A", *out], [tool, "-w", "-t", "mangle", "-D", *out])
            pre = ["PREROUTING", "-i", "lo", "-p", "udp", "-d", dst, "-j", "TPROXY", "--on-port", str(port),
                   "--tproxy-mark", tag]
            redirect.add([tool, "-w", "-t", "mangle", "-A", *pre], [tool, "-w", "-t", "mangle", "-D", *pre])
    return redirect


def start_redudp(lab: Lab, upstream: Upstream, port: int = 10053, timeout: int = 30,
                 workdir: Path | None = None) -> Service:
    """redsocks 0.5's `redudp` in the client namespace on 127.0.0.1:port (TPROXY, IPv4 only),
    relaying through `upstream`'s SOCKS5 UDP ASSOCIATE; the diversion is the caller's
    (`tproxy_udp(..., v6_dst=None)`).  A TCP `redsocks` section is needed for redsocks to start;
    it listens on port + 1 and gets no traffic."""
    svc = Service("redudp", lab.client, port, _workdir(lab, "redudp", workdir))
    conf = svc.workdir / "redsocks.conf"
    conf.write_text(redsocks_conf(port + 1, upstream) + f"""\
redudp {{
    local_ip = 127.0.0.1;
    local_port = {port};
    ip = {upstream.host};
    port = {upstream.port};
    udp_timeout = {timeout};
}}
""")
    _spawn(lab, svc, ["redsocks", "-c", str(conf)], "redsocks.log")
    deadline = time.monotonic() + 10
    while f"127.0.0.1:{port} " not in lab.run(lab.client, ["ss", "-Hlun"]).stdout:
        if svc.procs[0].poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"redudp not listening (rc={svc.procs[0].poll()}):\n{svc.log_text()}")
        time.sleep(0.05)
    return svc
